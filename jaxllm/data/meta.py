"""The on-disk format of a DATA_DIR and its validation (numpy + pydantic only: torch_ref uses it).

A DATA_DIR holds `train.bin` and `val.bin` (flat token ids, native-endian uint16 or uint32, each
document followed by the end-of-text id), `tokenizer.json` (Hugging Face `tokenizers` format) and
`meta.json`, written last: a directory without a valid `meta.json` is not a dataset.

A packed dataset (chat examples, `meta.json` has `packing`; see docs/data.md) holds windows of
`packing.context + 1` tokens back to back in `{split}.bin`, and beside them, one entry per token:
`{split}.loss_mask.bin` (uint8: 1 where the token is a target that counts in the loss) and
`{split}.segment_ids.bin` (`packing.segment_dtype`: 1, 2, … for the examples of a window, 0 padding).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, NonNegativeInt, PositiveInt, ValidationError

from jaxllm.config import format_validation_error
from jaxllm.errors import InputError

META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
SPLITS = ("train", "val")
FORMAT = "jaxllm-tokens"
FORMAT_VERSION = 1


def split_file(split: str) -> str:
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    return f"{split}.bin"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits in 16 bits, else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class SplitMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    tokens: NonNegativeInt
    documents: NonNegativeInt
    bytes: NonNegativeInt  # UTF-8 bytes of input text behind these tokens


class SplitsMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: SplitMeta
    val: SplitMeta


class TokenizerMeta(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["bpe", "byte", "file"]
    file: str
    sha256: str
    source: str | None = None  # the tokenizer.json given by the user (kind "file")


class PackingMeta(BaseModel):
    """How a packed dataset was made: whole examples in windows of `context + 1` tokens."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["chat"]
    context: PositiveInt
    pad_id: NonNegativeInt  # the token of padding (loss mask 0, segment id 0)
    segment_dtype: Literal["uint16", "uint32"]
    overlong: Literal["truncate", "drop"]  # what happened to examples longer than context + 1 tokens
    examples: NonNegativeInt  # packed (truncated ones included)
    truncated: NonNegativeInt
    dropped: NonNegativeInt  # too long, with overlong "drop"
    malformed: NonNegativeInt  # input lines skipped with a warning
    windows: dict[str, NonNegativeInt]  # per split
    loss_tokens: dict[str, NonNegativeInt]  # per split: tokens with loss mask 1
    chat_template_sha256: str


PACKED_ARRAYS = {"loss_mask": "uint8", "segment_ids": None}  # name -> dtype (None: packing.segment_dtype)


def packed_file(split: str, name: str) -> str:
    return f"{split_file(split).removesuffix('.bin')}.{name}.bin"


class DataMeta(BaseModel):
    """Fields of `meta.json` (see docs/data.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["jaxllm-tokens"]
    version: Literal[1]
    vocab_size: PositiveInt
    dtype: Literal["uint16", "uint32"]
    eot_id: NonNegativeInt
    eot_token: str
    tokenizer: TokenizerMeta
    splits: SplitsMeta
    val_fraction: float
    seed: int
    documents: NonNegativeInt
    input_bytes: NonNegativeInt
    bad_utf8_bytes: NonNegativeInt
    corpus: str
    inputs: list[dict[str, Any]]  # the manifest: one entry per document (per input file, when packed)
    packing: PackingMeta | None = None  # None: flat documents

    def tokens(self, split: str) -> int:
        return getattr(self.splits, split).tokens


def read_meta(data_dir: str | Path) -> DataMeta:
    """Parse and validate `DATA_DIR/meta.json`; an `InputError` names the file and the field."""
    path = Path(data_dir) / META_FILE
    if not Path(data_dir).is_dir():
        raise InputError(f"data directory not found: {data_dir} (create it with `jaxllm preprocess`)")
    if not path.is_file():
        raise InputError(
            f"{path} is missing: {data_dir} is not a complete dataset "
            "(run `jaxllm preprocess`; an interrupted run leaves no meta.json)"
        )
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path} is corrupt: not valid JSON ({err})") from None
    if not isinstance(raw, dict):
        raise InputError(f"{path} is corrupt: expected a JSON object")
    try:
        meta = DataMeta.model_validate(raw)
    except ValidationError as err:
        raise InputError(format_validation_error(err, DataMeta, str(path))) from None
    if np.dtype(meta.dtype) != token_dtype(meta.vocab_size):
        raise InputError(f"{path}: dtype {meta.dtype} does not fit vocab_size {meta.vocab_size}")
    if meta.eot_id >= meta.vocab_size:
        raise InputError(f"{path}: eot_id {meta.eot_id} is not below vocab_size {meta.vocab_size}")
    if meta.packing is not None and any(meta.tokens(s) % (meta.packing.context + 1) for s in SPLITS):
        raise InputError(f"{path}: a split's tokens are not whole windows of packing.context + 1")
    return meta


def open_tokens(data_dir: str | Path, split: str, meta: DataMeta | None = None) -> np.ndarray:
    """Read-only memmap of one split's tokens, checked against the count in meta.json."""
    meta = meta or read_meta(data_dir)
    path = Path(data_dir) / split_file(split)
    dtype = np.dtype(meta.dtype)
    expected = meta.tokens(split) * dtype.itemsize
    if not path.is_file():
        raise InputError(f"{path} is missing (meta.json lists {meta.tokens(split)} tokens)")
    if path.stat().st_size != expected:
        raise InputError(
            f"{path} has {path.stat().st_size} bytes; meta.json expects {expected} "
            f"({meta.tokens(split)} {meta.dtype} tokens): the file is truncated or not from this run"
        )
    if expected == 0:  # np.memmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def open_split(data_dir: str | Path, split: str, meta: DataMeta | None = None) -> dict[str, np.ndarray]:
    """Read-only memmaps of a packed split: {"tokens", "loss_mask", "segment_ids"}, each checked to hold
    one entry per token."""
    meta = meta or read_meta(data_dir)
    if meta.packing is None:
        raise InputError(f"{data_dir} is not a packed dataset (its meta.json has no packing)")
    arrays = {"tokens": open_tokens(data_dir, split, meta)}
    n = meta.tokens(split)
    for name, dtype in PACKED_ARRAYS.items():
        dtype = np.dtype(dtype or meta.packing.segment_dtype)
        path = Path(data_dir) / packed_file(split, name)
        if not path.is_file() or path.stat().st_size != n * dtype.itemsize:
            raise InputError(f"{path} is missing or not {n} {dtype.name} entries (one per token, as meta.json says)")
        arrays[name] = np.memmap(path, dtype=dtype, mode="r") if n else np.zeros(0, dtype)
    return arrays
