"""How a checkpoint turns text into token ids and back: tokenizer, BOS, end tokens, chat template.

Framework-free (`tokenizers` and `jinja2` are imported when used). A params directory written by
`import-hf`/`import-gguf` keeps Hugging Face's own files beside the weights (`tokenizer.json`,
`tokenizer_config.json`, `generation_config.json`, `chat_template.jinja`…, see
`jaxllm.pretrained.KEPT_FILES`); one trained by `jaxllm train` has only `tokenizer.json`. `TextCodec`
reads whichever is there:

- `encode(text)`: ids as transformers' tokenizer gives them for the model (BOS first where the model
  expects one: by the tokenizer's post-processor, or added here when `add_bos_token` says so and the
  post-processor does not; never twice); `encode_chat(messages)`: the chat template rendered as
  transformers' `apply_chat_template(..., add_generation_prompt=True)` renders it (sandboxed jinja2),
  then encoded without adding special tokens (the template writes its own BOS, as in transformers);
- `end_ids`: where generation stops by default (`generation_config.json`'s `eos_token_id`s and the
  tokenizer's EOS; for a checkpoint without those files, its end-of-text token).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from jaxllm.data.meta import TOKENIZER_FILE
from jaxllm.errors import InputError

ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass
class TextCodec:
    """A tokenizer with what the checkpoint says about BOS, end tokens and chat formatting."""

    tokenizer: Any  # tokenizers.Tokenizer
    bos_id: int | None = None
    add_bos: bool = False  # the model expects BOS at the start of every sequence
    end_ids: list[int] = field(default_factory=list)
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)  # bos_token, eos_token, … for templates

    @classmethod
    def wrap(cls, tokenizer: Any) -> TextCodec:
        """A bare tokenizer (a dataset's): no BOS, its end-of-text token ends generation."""
        if isinstance(tokenizer, TextCodec):
            return tokenizer
        from jaxllm.data.tokenizer import eot_of

        try:
            ends = [eot_of(tokenizer)[1]]
        except InputError:
            ends = []
        return cls(tokenizer, end_ids=ends)

    # Text -> ids ----------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Ids of a plain-text prompt, with BOS first when the model expects it (exactly once)."""
        return self._with_bos(self.tokenizer.encode(text).ids)

    def encode_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        """Ids of a conversation rendered with the chat template (see `render_chat`), encoded without
        adding special tokens: the template writes BOS itself where the model wants it."""
        text = self.render_chat(messages, add_generation_prompt)
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def render_chat(self, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """The chat template applied to `messages` as transformers applies it."""
        if not self.chat_template:
            raise InputError("this checkpoint has no chat template (its tokenizer_config.json names none)")
        checked = check_messages(messages)
        from jinja2 import TemplateError

        try:
            return _compiled(self.chat_template).render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except TemplateError as err:
            raise InputError(f"the chat template refused these messages: {err}") from None

    def _with_bos(self, ids: list[int]) -> list[int]:
        if not self.add_bos or self.bos_id is None or (ids and ids[0] == self.bos_id):
            return ids
        return [self.bos_id, *ids]

    def start_ids(self) -> list[int]:
        """What an empty prompt starts from: BOS, else the end-of-text token (unconditional samples)."""
        first = self.bos_id if self.bos_id is not None else next(iter(self.end_ids), None)
        if first is None:
            raise InputError("the prompt is empty and the tokenizer has neither a BOS nor an end-of-text token")
        return [first]

    # Ids -> text ----------------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def get_vocab_size(self, with_added_tokens: bool = True) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=with_added_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def check_messages(messages: Any) -> list[dict[str, str]]:
    """OpenAI-shaped messages: a non-empty list of {"role", "content"} with text content.

    `content` may be a string or a list of {"type": "text", "text": ...} parts (joined). Raises
    `InputError` naming the bad field (`messages[i].role`, …)."""
    if not isinstance(messages, list | tuple) or not messages:
        raise InputError("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InputError(f"messages[{i}] must be an object with role and content")
        role = m.get("role")
        if role not in ROLES:
            raise InputError(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}")
        out.append({"role": role, "content": message_text(m.get("content"), f"messages[{i}].content")})
    return out


def message_text(content: Any, where: str) -> str:
    """The text of a message's content: a string, or OpenAI's list of text parts (lone surrogates refused)."""
    if isinstance(content, str):
        return _encodable(content, where)
    if isinstance(content, list) and content:
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise InputError(f"{where}[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}")
            parts.append(_encodable(part["text"], f"{where}[{j}].text"))
        return "".join(parts)
    raise InputError(f"{where} must be a string or a non-empty list of text parts")


def _encodable(text: str, where: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise InputError(f"{where} is not valid Unicode text: a lone surrogate at position {err.start}") from None
    return text


@cache
def _compiled(template: str) -> Any:
    """The template compiled in jinja2's immutable sandbox, with the helpers transformers provides."""
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:  # fmt: skip
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        from datetime import datetime

        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as err:
        raise InputError(f"the checkpoint's chat template is not valid jinja2: {err}") from None


# Loading ------------------------------------------------------------------------------------------


def _check_same_tokenizer(tok: Any, file: Path, own: Path) -> None:
    """`InputError` unless `tok` (from `file`) is the tokenizer of the checkpoint's own `tokenizer.json`.

    Compared by the SHA-256 of their canonical JSON: another tokenizer that fits the vocabulary would
    still map ids to the wrong text."""
    from tokenizers import Tokenizer

    from jaxllm.data.tokenizer import canonical_sha256

    try:
        theirs = Tokenizer.from_file(str(own))
    except Exception:  # a broken own file: the given one replaces it
        return
    given, expected = canonical_sha256(tok), canonical_sha256(theirs)
    if given != expected:
        raise InputError(
            f"the tokenizer {file} (sha256 {given[:12]}) is not the checkpoint's own {own} (sha256 {expected[:12]}): "
            "the model was trained with that one; leave out --tokenizer to use it"
        )


def load_codec(checkpoint_dir: str | Path, vocab_size: int, tokenizer_path: str | Path | None = None) -> TextCodec:
    """The `TextCodec` of a params directory (or of the `tokenizer.json` at `tokenizer_path`).

    A tokenizer with more tokens than the model's `vocab_size` is refused (its ids would not fit).
    """
    from tokenizers import Tokenizer

    ck = Path(checkpoint_dir)
    file = Path(tokenizer_path) if tokenizer_path is not None else ck / TOKENIZER_FILE
    if not file.is_file():
        if tokenizer_path is not None:
            raise InputError(f"tokenizer file not found: {file}")
        raise InputError(
            f"{file} not found: this checkpoint has no tokenizer; pass --tokenizer PATH "
            f"(the {TOKENIZER_FILE} of the dataset it was trained on)"
        )
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a plain Exception for a bad file
        raise InputError(f"{file} is not a valid {TOKENIZER_FILE}: {err}") from None
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    if n_vocab > vocab_size:
        raise InputError(f"the tokenizer has {n_vocab} tokens, more than the model's vocabulary of {vocab_size}")
    own = ck / TOKENIZER_FILE
    if tokenizer_path is not None and own.is_file() and own.resolve() != file.resolve():
        _check_same_tokenizer(tok, file, own)
    tok_cfg = _read_json(ck / "tokenizer_config.json")
    gen_cfg = _read_json(ck / "generation_config.json")
    if tokenizer_path is not None or not tok_cfg:  # a dataset's tokenizer, or a checkpoint jaxllm trained
        codec = TextCodec.wrap(tok)
        codec.chat_template = _chat_template(ck, tok_cfg)
        return codec
    special = {k: _token_text(v) for k, v in tok_cfg.items() if k.endswith("_token") and _token_text(v)}
    bos = special.get("bos_token")
    bos_id = tok.token_to_id(bos) if bos else None
    if bos_id is None and isinstance(gen_cfg.get("bos_token_id"), int):
        bos_id = gen_cfg["bos_token_id"]
    ends = gen_cfg.get("eos_token_id")
    end_ids = [ends] if isinstance(ends, int) else [e for e in ends or [] if isinstance(e, int)]
    eos = special.get("eos_token")
    if eos and tok.token_to_id(eos) is not None:
        end_ids.append(tok.token_to_id(eos))
    return TextCodec(
        tok,
        bos_id=bos_id,
        add_bos=bool(tok_cfg.get("add_bos_token", False)) and not _post_processor_adds_bos(tok, bos_id),
        end_ids=sorted({e for e in end_ids if 0 <= e < vocab_size}),
        chat_template=_chat_template(ck, tok_cfg),
        special_tokens=special,
    )


def _post_processor_adds_bos(tok: Any, bos_id: int | None) -> bool:
    """True when tokenizer.json's post-processor already puts BOS first (as Llama's files do)."""
    if bos_id is None:
        return False
    ids = tok.encode("a").ids
    return bool(ids) and ids[0] == bos_id


def _chat_template(ck: Path, tok_cfg: dict[str, Any]) -> str | None:
    """The default chat template: chat_template.jinja (transformers 5), .json, or tokenizer_config.json."""
    if (ck / "chat_template.jinja").is_file():
        return (ck / "chat_template.jinja").read_text()
    template = _read_json(ck / "chat_template.json").get("chat_template") or tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template else None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json gives it: a string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from None
    return data if isinstance(data, dict) else {}
