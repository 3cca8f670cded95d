"""`jaxllm preprocess --format chat`: chat examples (JSONL) into a packed dataset with a loss mask.

Each line of the input is `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI's shape). An
example is its conversation rendered with the checkpoint's chat template (`jaxllm.text.TextCodec`)
and tokenized; its loss mask keeps each assistant turn's content and end-of-turn token, not the role
header nor what the template writes after the end token. Templates carry no markers for that, so
the spans come from rendering turn by turn: assistant turn i spans the text between the render of
turns < i with the generation prompt (which ends with the assistant header) and the render of
turns <= i; a template that does not render a conversation as such prefixes is refused for it.

Whole examples are packed in file order into windows of `context + 1` tokens (a new window starts
when the next example does not fit; the rest is padding, masked out). An example longer than a
window is truncated or dropped (`overlong`). The train/val split is by example (as documents are
split for text). Files: see `jaxllm/data/meta.py` and docs/data.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from jaxllm.data.corpus import MAX_SKIP_WARNINGS
from jaxllm.data.meta import PACKED_ARRAYS, SPLITS, TOKENIZER_FILE, DataMeta, packed_file, split_file, token_dtype
from jaxllm.data.preprocess import PreprocessResult, Warn, _print_warning, split_documents, staged, write_meta
from jaxllm.data.tokenizer import sha256_hex
from jaxllm.errors import ConfigError, InputError
from jaxllm.text import TextCodec, check_messages

Overlong = Literal["truncate", "drop"]


@dataclass(frozen=True)
class Example:
    tokens: np.ndarray  # (n,) token ids of the rendered conversation
    loss_mask: np.ndarray  # (n,) uint8: 1 for assistant content and end-of-turn tokens


def assistant_spans(codec: TextCodec, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """(the whole conversation's text, [start, end) character spans of each assistant turn's text as the
    template writes it, from the end of its header)."""
    full = codec.render_chat(messages, add_generation_prompt=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        if i == 0:
            raise InputError("messages[0] is an assistant turn: a conversation starts with a prompt")
        before = codec.render_chat(messages[:i], add_generation_prompt=True)
        through = codec.render_chat(messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and full.startswith(through)):
            raise InputError(
                f"the chat template does not render messages[{i}] after the turns before it "
                "(its assistant tokens cannot be found by rendering turn by turn)"
            )
        spans.append((len(before), len(through)))
    if not spans:
        raise InputError("no assistant message: nothing to learn from")
    return full, spans


def encode_example(codec: TextCodec, messages: Any) -> Example:
    """The tokens and loss mask of one conversation; `InputError` names what is wrong with it."""
    full, spans = assistant_spans(codec, check_messages(messages))
    enc = codec.tokenizer.encode(full, add_special_tokens=False)
    tokens = np.asarray(enc.ids, dtype=np.int64)
    starts = np.array([start for start, _ in enc.offsets], dtype=np.int64)
    ends = set(codec.end_ids)
    mask = np.zeros(len(tokens), np.uint8)
    for a, b in spans:
        (inside,) = np.nonzero((starts >= a) & (starts < b))
        last = [j for j in inside if int(tokens[j]) in ends]
        if last:  # through the end-of-turn token, not what the template writes after it ("\n")
            inside = inside[inside <= last[-1]]
        mask[inside] = 1
    return Example(tokens, mask)


@dataclass
class _Counts:
    malformed: int = 0
    truncated: int = 0
    dropped: int = 0


def read_examples(
    files: Sequence[str | Path], codec: TextCodec, width: int, overlong: Overlong, strict: bool, warn: Warn
) -> tuple[list[Example], list[int], list[dict[str, Any]], _Counts]:
    """(examples, the input bytes behind each, the manifest: one entry per file, counts)."""
    examples: list[Example] = []
    sizes: list[int] = []
    manifest = []
    counts = _Counts()
    for file in files:
        path = Path(file)
        if not path.is_file():
            raise InputError(f"chat file not found: {path}")
        data = path.read_bytes()
        entry = {"path": str(path), "bytes": len(data), "sha256": sha256_hex(data), "lines": 0,
                 "examples": 0, "malformed": 0}  # fmt: skip
        for line_no, raw in enumerate(data.splitlines(), start=1):
            entry["lines"] += 1
            if not raw.strip():
                continue
            try:
                example = encode_example(codec, _messages(raw))
            except InputError as err:
                where = f"{path}:{line_no}: {err}"
                if strict:
                    raise InputError(f"{where} (without --strict such lines are skipped)") from None
                counts.malformed += 1
                entry["malformed"] += 1
                if counts.malformed <= MAX_SKIP_WARNINGS:
                    warn(f"{where}: line skipped")
                continue
            if len(example.tokens) > width:
                if overlong == "drop" or not example.loss_mask[:width].any():
                    counts.dropped += 1
                    continue
                counts.truncated += 1
                example = Example(example.tokens[:width], example.loss_mask[:width])
            examples.append(example)
            sizes.append(len(raw) + 1)
            entry["examples"] += 1
        manifest.append(entry)
    if counts.malformed > MAX_SKIP_WARNINGS:
        warn(f"{counts.malformed - MAX_SKIP_WARNINGS} more malformed lines skipped ({counts.malformed} in all)")
    return examples, sizes, manifest, counts


def _messages(raw: bytes) -> Any:
    try:
        line = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise InputError("not UTF-8 text") from None
    except json.JSONDecodeError as err:
        raise InputError(f"not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(line, dict) or "messages" not in line:
        raise InputError('expected an object {"messages": [...]}')
    return line["messages"]


def pack(examples: Sequence[Example], width: int, pad_id: int) -> dict[str, np.ndarray]:
    """Whole examples in order into windows of `width` tokens, a new window when the next one does not
    fit: {"tokens", "loss_mask", "segment_ids"} (1, 2, … per example of a window; 0 padding), flat."""
    window, used, place = 0, 0, []
    for ex in examples:
        if used + len(ex.tokens) > width:
            window, used = window + 1, 0
        place.append((window, used))
        used += len(ex.tokens)
    n_windows = window + 1 if examples else 0
    tokens = np.full(n_windows * width, pad_id, np.int64)
    mask = np.zeros(n_windows * width, np.uint8)
    segments = np.zeros(n_windows * width, np.int64)
    segment = 0
    for ex, (w, offset) in zip(examples, place, strict=True):
        segment = 1 if offset == 0 else segment + 1
        at = slice(w * width + offset, w * width + offset + len(ex.tokens))
        tokens[at], mask[at], segments[at] = ex.tokens, ex.loss_mask, segment
    return {"tokens": tokens, "loss_mask": mask, "segment_ids": segments}


def preprocess_chat(
    inputs: Sequence[str],
    out_dir: str | Path,
    *,
    tokenizer: str,
    context: int | None = None,
    overlong: Overlong = "drop",
    strict: bool = False,
    val_fraction: float = 0.05,
    seed: int = 0,
    overwrite: bool = False,
    on_warning: Warn | None = None,
) -> PreprocessResult:
    """Chat JSONL `inputs` into a packed dataset in `out_dir`, with the params directory `tokenizer`'s
    tokenizer and chat template; windows of `context` (default: the checkpoint's) + 1 tokens."""
    from jaxllm.base_checkpoint import checkpoint_model, is_params_dir
    from jaxllm.data.preprocess import _check_out_dir, checkpoint_tokenizer
    from jaxllm.data.tokenizer import eot_of, vocab_size_of
    from jaxllm.text import load_codec

    start = time.perf_counter()
    warn = on_warning or _print_warning
    if not is_params_dir(tokenizer):
        raise ConfigError("--format chat needs --tokenizer CK: a params directory with a chat template")
    if not inputs:
        raise ConfigError("--format chat needs one or more FILE.jsonl inputs")
    if overlong not in ("truncate", "drop"):
        raise ConfigError(f"--overlong must be truncate or drop, got {overlong!r}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    cfg = checkpoint_model(tokenizer)
    context = context or cfg.context_length
    if context < 1:
        raise ConfigError(f"--context must be positive, got {context}")
    out = Path(out_dir)
    _check_out_dir(out, overwrite)
    file, tok = checkpoint_tokenizer(tokenizer)
    codec = load_codec(tokenizer, cfg.vocab_size)
    if not codec.chat_template:
        raise InputError(f"{tokenizer} has no chat template (tokenizer_config.json or chat_template.jinja)")
    width = context + 1
    examples, sizes, manifest, counts = read_examples(inputs, codec, width, overlong, strict, warn)
    if not examples:
        raise InputError(f"no usable example in {', '.join(map(str, inputs))}")
    is_val = split_documents(len(examples), val_fraction, seed)
    eot_token, pad_id = eot_of(tok)
    vocab_size = vocab_size_of(tok)
    seg_dtype = token_dtype(width + 1)
    packed, splits = {}, {}
    for split in SPLITS:
        chosen = [i for i in range(len(examples)) if is_val[i] == (split == "val")]
        packed[split] = pack([examples[i] for i in chosen], width, pad_id)
        splits[split] = {"file": split_file(split), "tokens": len(packed[split]["tokens"]), "documents": len(chosen),
                         "bytes": sum(sizes[i] for i in chosen)}  # fmt: skip
    meta = DataMeta.model_validate({
        "format": "jaxllm-tokens", "version": 1, "vocab_size": vocab_size, "dtype": token_dtype(vocab_size).name,
        "eot_id": pad_id, "eot_token": eot_token,
        "tokenizer": {"kind": "file", "file": TOKENIZER_FILE, "sha256": sha256_hex(file.read_bytes()),
                      "source": str(Path(tokenizer).absolute())},
        "splits": splits, "val_fraction": val_fraction, "seed": seed, "documents": len(examples),
        "input_bytes": sum(e["bytes"] for e in manifest), "bad_utf8_bytes": 0,
        "corpus": f"chat: {', '.join(str(p) for p in inputs)}", "inputs": manifest,
        "packing": {
            "kind": "chat", "context": context, "pad_id": pad_id, "segment_dtype": seg_dtype.name,
            "overlong": overlong, "examples": len(examples), "truncated": counts.truncated,
            "dropped": counts.dropped, "malformed": counts.malformed,
            "windows": {s: len(packed[s]["tokens"]) // width for s in SPLITS},
            "loss_tokens": {s: int(packed[s]["loss_mask"].sum()) for s in SPLITS},
            "chat_template_sha256": sha256_hex(codec.chat_template.encode("utf-8")),
        },
    })  # fmt: skip
    dtypes = {"tokens": np.dtype(meta.dtype), **{k: np.dtype(v or seg_dtype) for k, v in PACKED_ARRAYS.items()}}
    names = {s: {"tokens": split_file(s), **{k: packed_file(s, k) for k in PACKED_ARRAYS}} for s in SPLITS}
    with staged(out, [*(n for s in SPLITS for n in names[s].values()), TOKENIZER_FILE]) as tmp:
        for split in SPLITS:
            for key, name in names[split].items():
                packed[split][key].astype(dtypes[key]).tofile(tmp[name])
        tmp[TOKENIZER_FILE].write_bytes(file.read_bytes())
        write_meta(tmp["meta.json"], meta)
    return PreprocessResult(out, meta, time.perf_counter() - start, "tokenizers")
