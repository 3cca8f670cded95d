"""Tokenizers: train a byte-level BPE, a plain byte tokenizer, or load a `tokenizer.json`; encode fast.

Every tokenizer is a Hugging Face `tokenizers.Tokenizer` saved as `tokenizer.json`: that file is
the reference for encoding and decoding. `make_encoder` picks the fastest exact way to produce the
same ids: raw UTF-8 bytes for the byte tokenizer, `tiktoken` for GPT-2-style byte-level BPE
(several times faster than `tokenizers` here, and releasing the GIL so threads run in parallel),
else `tokenizers` itself. A literal end-of-text string in the text becomes the end-of-text id, as
`Tokenizer.encode` does.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxllm.data.meta import TOKENIZER_FILE
from jaxllm.errors import ConfigError, InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOT = "<|endoftext|>"
_EOT_NAMES = (EOT, "</s>", "<|end_of_text|>", "<eos>")  # looked up in this order in a given file
# The pre-tokenizer regex of `tokenizers.pre_tokenizers.ByteLevel(use_regex=True)` (GPT-2's).
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
MIN_BPE_VOCAB = 257  # 256 bytes + end-of-text


@cache
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: each byte as a printable character."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(extra)}}


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenizer) trained on `texts`; id 0 is the end-of-text token.

    Deterministic for given texts. A small corpus may support fewer merges than asked for.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < MIN_BPE_VOCAB:
        raise ConfigError(f"vocab size must be at least {MIN_BPE_VOCAB} (256 bytes + end-of-text), got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


def byte_tokenizer() -> Tokenizer:
    """Plain bytes: id b is byte b, id 256 is end-of-text (a byte-level BPE with no merges)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A `tokenizer.json` file; an InputError names the file when it cannot be used."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise InputError(f"tokenizer file not found: {path}")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises plain Exception for bad files
        raise InputError(f"{path} is not a valid tokenizer.json: {err}") from None
    eot_of(tok, source=str(path))
    return tok


def checkpoint_tokenizer(checkpoint_dir: str | Path, vocab_size: int, path: str | Path | None = None) -> Tokenizer:
    """The `tokenizer.json` stored with a checkpoint (or the file at `path`), checked against the model.

    A tokenizer with more tokens than the model's `vocab_size` is refused (its ids would not fit).
    """
    file = Path(path) if path is not None else Path(checkpoint_dir) / TOKENIZER_FILE
    if path is None and not file.is_file():
        raise InputError(
            f"{file} not found: this checkpoint has no tokenizer; pass --tokenizer PATH "
            f"(the {TOKENIZER_FILE} of the dataset it was trained on)"
        )
    tok = load_tokenizer(file)
    n_vocab = tok.get_vocab_size(with_added_tokens=True)
    if n_vocab > vocab_size:
        raise InputError(f"the tokenizer has {n_vocab} tokens, more than the model's vocabulary of {vocab_size}")
    return tok


def eot_of(tok: Tokenizer, source: str = "tokenizer") -> tuple[str, int]:
    """(end-of-text token, its id): the first of <|endoftext|>, </s>, <|end_of_text|>, <eos>."""
    vocab = tok.get_vocab(with_added_tokens=True)
    for name in _EOT_NAMES:
        if name in vocab:
            return name, vocab[name]
    raise InputError(f"{source} has no end-of-text token (looked for {', '.join(_EOT_NAMES)})")


def vocab_size_of(tok: Tokenizer) -> int:
    """One more than the largest id (ids may be sparse in a hand-made file)."""
    return max(tok.get_vocab(with_added_tokens=True).values()) + 1


def tokenizer_bytes(tok: Tokenizer) -> bytes:
    """The canonical `tokenizer.json` contents."""
    return tok.to_str(pretty=True).encode("utf-8")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical_sha256(tok: Tokenizer) -> str:
    """SHA-256 of the canonical JSON: equal for two files of the same tokenizer however they are formatted."""
    return sha256_hex(tokenizer_bytes(tok))


def same_tokenizer_file(a: str | Path, b: str | Path) -> bool:
    """Whether two tokenizer.json files are the same tokenizer (same bytes, or same canonical JSON)."""
    if Path(a).read_bytes() == Path(b).read_bytes():
        return True
    from tokenizers import Tokenizer

    return canonical_sha256(Tokenizer.from_file(str(a))) == canonical_sha256(Tokenizer.from_file(str(b)))


@dataclass(frozen=True)
class Encoder:
    """text -> token ids (numpy, `dtype`), equal to `tok.encode(text).ids`; safe to share across threads."""

    name: str  # "bytes", "tiktoken" or "tokenizers"
    eot_token: str
    eot_id: int
    dtype: np.dtype
    _encode: Callable[[str], Any]  # text -> ids
    split_eot: bool = True  # `_encode` needs text without the end-of-text string

    def __call__(self, text: str) -> np.ndarray:
        if not self.split_eot:
            return self._as_array(self._encode(text))
        parts = text.split(self.eot_token)
        arrays = [self._as_array(self._encode(p)) for p in parts]
        if len(arrays) == 1:
            return arrays[0]
        eot = np.array([self.eot_id], self.dtype)
        return np.concatenate([x for a in arrays[:-1] for x in (a, eot)] + [arrays[-1]])

    def _as_array(self, ids: Any) -> np.ndarray:
        if isinstance(ids, np.ndarray):
            return ids.astype(self.dtype, copy=False)
        return np.fromiter(ids, self.dtype, len(ids))


def make_encoder(tok: Tokenizer, dtype: np.dtype) -> Encoder:
    """The fastest exact encoder for `tok` (see the module docstring)."""
    eot_token, eot_id = eot_of(tok)
    spec = json.loads(tok.to_str())
    ranks = _byte_level_ranks(spec, eot_token)
    if ranks is not None and _is_identity_bytes(ranks) and not spec["model"]["merges"]:
        return Encoder("bytes", eot_token, eot_id, dtype, _utf8_bytes)
    if ranks is not None:
        try:
            import tiktoken
        except ImportError:
            pass
        else:
            core = tiktoken.Encoding("jaxllm", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={})
            return Encoder("tiktoken", eot_token, eot_id, dtype, core.encode_ordinary)
    return reference_encoder(tok, dtype)


def reference_encoder(tok: Tokenizer, dtype: np.dtype) -> Encoder:
    """`tokenizers` itself (which handles the end-of-text string): the definition of the ids."""
    eot_token, eot_id = eot_of(tok)

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    return Encoder("tokenizers", eot_token, eot_id, dtype, encode, split_eot=False)


def _utf8_bytes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8)


def _is_identity_bytes(ranks: dict[bytes, int]) -> bool:
    return len(ranks) == 256 and all(ranks.get(bytes([b])) == b for b in range(256))


def _byte_level_ranks(spec: dict[str, Any], eot_token: str) -> dict[bytes, int] | None:
    """{token bytes: id} when `spec` is a GPT-2-style byte-level BPE that tiktoken encodes exactly.

    Needs: no normalizer; the ByteLevel pre-tokenizer with its regex and no prefix space; a plain
    BPE model over all 256 byte symbols; merges whose results have increasing ids (tiktoken merges
    by id, BPE by merge order); no added tokens but end-of-text. Else None.
    """
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    if spec.get("normalizer") is not None or pre.get("type") != "ByteLevel":
        return None
    if pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None
    if model.get("type") != "BPE" or model.get("dropout") or model.get("byte_fallback"):
        return None
    if model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None
    if any(t["content"] != eot_token for t in spec.get("added_tokens", [])):
        return None
    decode = {ch: b for b, ch in byte_to_unicode().items()}
    vocab: dict[str, int] = {k: v for k, v in model["vocab"].items() if k != eot_token}
    try:
        ranks = {bytes(decode[c] for c in token): i for token, i in vocab.items()}
    except KeyError:  # a symbol outside the byte-level alphabet
        return None
    if len(ranks) != len(vocab) or any(bytes([b]) not in ranks for b in range(256)):
        return None
    merged = [vocab.get("".join(m) if isinstance(m, list) else m.replace(" ", "", 1)) for m in model["merges"]]
    if any(i is None for i in merged) or any(a >= b for a, b in itertools.pairwise(merged)):
        return None
    return ranks
