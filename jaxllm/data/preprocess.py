"""`jaxllm preprocess`: text in, a DATA_DIR out (train.bin, val.bin, tokenizer.json, meta.json).

Steps: find the documents (corpus.py); split them into train/val by a seeded hash of their index;
get a tokenizer (train a byte-level BPE on a sample of the train documents, the byte tokenizer,
or a given tokenizer.json); encode every document on `workers` threads (the fast encoders release
the GIL) in file order, each followed by the end-of-text id, streaming into temporary files; then
rename the files into place with meta.json last. Output is identical for any worker count.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from jaxllm.data.corpus import MAX_SKIP_WARNINGS, Corpus, Source, decode_utf8, find_inputs
from jaxllm.data.index import epoch_key, splitmix64
from jaxllm.data.meta import (
    FORMAT,
    FORMAT_VERSION,
    META_FILE,
    SPLITS,
    TOKENIZER_FILE,
    DataMeta,
    split_file,
    token_dtype,
)
from jaxllm.data.tokenizer import (
    Encoder,
    byte_tokenizer,
    eot_of,
    load_tokenizer,
    make_encoder,
    reference_encoder,
    sha256_hex,
    tokenizer_bytes,
    train_bpe,
    vocab_size_of,
)
from jaxllm.errors import ConfigError, InputError

DEFAULT_VOCAB_SIZE = 1000  # the `mini` preset's
DEFAULT_VAL_FRACTION = 0.05
CHUNK_BYTES = 1 << 20  # documents are handed to the workers in chunks of about this size
CHECK_CHARS = 1 << 16  # the fast encoder is checked against `tokenizers` on this much text
_VAL_SALT = 0x5EED_0F_5A1  # keeps the split's hash stream apart from the loader's

Warn = Callable[[str], None]


@dataclass(frozen=True)
class PreprocessResult:
    out_dir: Path
    meta: DataMeta
    seconds: float  # wall time of the whole run
    encoder: str  # which encoder ran: "bytes", "tiktoken" or "tokenizers"

    @property
    def mb_per_s(self) -> float:
        return self.meta.input_bytes / 1e6 / self.seconds

    def summary(self) -> str:
        m = self.meta
        return (
            f"wrote {self.out_dir}: {m.tokens('train'):,} train + {m.tokens('val'):,} val tokens "
            f"from {m.documents:,} documents ({_size(m.input_bytes)}), vocab {m.vocab_size}, "
            f"{m.dtype}\n{_size(m.input_bytes)} in {self.seconds:.2f} s: "
            f"{_size(m.input_bytes / self.seconds)}/s ({self.encoder} encoder)"
        ) + (self._packing_summary() if m.packing else "")

    def _packing_summary(self) -> str:
        p = self.meta.packing
        assert p is not None
        return (
            f"\n{p.examples:,} examples in {p.windows['train']:,} train + {p.windows['val']:,} val windows of "
            f"{p.context + 1} tokens ({p.loss_tokens['train']:,} + {p.loss_tokens['val']:,} tokens in the loss); "
            f"{p.truncated} truncated, {p.dropped} dropped as too long ({p.overlong}), "
            f"{p.malformed} malformed lines skipped"
        )


def _size(n_bytes: float) -> str:
    """Bytes as MB, or kB below 1 MB (a chat file is often a few kB)."""
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:.1f} kB"


def preprocess(
    inputs: Sequence[str],
    out_dir: str | Path,
    *,
    tokenizer: str = "bpe",
    vocab_size: int | None = None,
    val_fraction: float = DEFAULT_VAL_FRACTION,
    workers: int | None = None,
    seed: int = 0,
    glob: str = "*",
    overwrite: bool = False,
    progress: bool = False,
    on_warning: Warn | None = None,
    stdin: bytes | None = None,
) -> PreprocessResult:
    """Tokenize `inputs` (the default corpus when empty) into the dataset directory `out_dir`.

    tokenizer: "bpe" (train a byte-level BPE of `vocab_size`, default 1000), "byte", or the path of
    a tokenizer.json. workers: encoding threads (default: the usable cores). An existing dataset
    in `out_dir` is replaced only with `overwrite`. Warnings (skipped binaries, invalid UTF-8) go
    to `on_warning` (default: stderr).
    """
    start = time.perf_counter()
    warn = on_warning or _print_warning
    _check_args(tokenizer, vocab_size, val_fraction, workers, seed)
    out = Path(out_dir)
    _check_out_dir(out, overwrite)

    corpus = find_inputs(inputs, warn, glob=glob, stdin=stdin, skip_dir=out)
    is_val = split_documents(len(corpus.sources), val_fraction, seed)
    choice = _get_tokenizer(tokenizer, vocab_size, corpus, is_val, warn)
    encoder = _checked_encoder(choice.tok, choice.dtype, corpus, warn)

    with staged(out, [*map(split_file, SPLITS), TOKENIZER_FILE]) as tmp:
        with open(tmp[split_file("train")], "wb") as ftrain, open(tmp[split_file("val")], "wb") as fval:
            manifest = _write_tokens(corpus, is_val, encoder, workers, (ftrain, fval), progress, warn)
            for f in (ftrain, fval):
                f.flush()
                os.fsync(f.fileno())
        meta = _make_meta(manifest, corpus, choice, val_fraction, seed)
        tmp[TOKENIZER_FILE].write_bytes(choice.json)
        write_meta(tmp[META_FILE], meta)
    return PreprocessResult(out, meta, time.perf_counter() - start, encoder.name)


@contextmanager
def staged(out: Path, names: Sequence[str]) -> Iterator[dict[str, Path]]:
    """Temporary paths in `out` for `names` and meta.json, renamed into place when the block succeeds.

    The old meta.json goes first and the new one comes last, so at every instant the directory is
    either the old complete dataset, incomplete, or the new complete dataset. On failure the
    temporary files (and `out`, if created here and left empty) are removed."""
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    tmp = {name: out / f".{name}.tmp" for name in (*names, META_FILE)}
    committed = False
    try:
        yield tmp
        (out / META_FILE).unlink(missing_ok=True)
        for name, path in tmp.items():
            os.replace(path, out / name)
        committed = True
    finally:
        if not committed:
            for path in tmp.values():
                path.unlink(missing_ok=True)
            if created and not any(out.iterdir()):
                out.rmdir()


def write_meta(path: Path, meta: DataMeta) -> None:
    """meta.json (a flat dataset's without the `packing` key, as before packed datasets existed)."""
    data = meta.model_dump(exclude={"packing"} if meta.packing is None else None)
    path.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")


def split_documents(n_docs: int, val_fraction: float, seed: int) -> np.ndarray:
    """Which documents are validation: bool (n_docs,), exactly round(f * n) of them (at least 1
    when f > 0), chosen by a seeded hash of the document index."""
    if val_fraction == 0:
        return np.zeros(n_docs, dtype=bool)
    if n_docs < 2:
        raise InputError(
            f"the corpus has {n_docs} document: a validation split needs at least 2 documents "
            "(give more files, or --val-fraction 0)"
        )
    n_val = min(max(round(val_fraction * n_docs), 1), n_docs - 1)
    keys = splitmix64(np.arange(n_docs, dtype=np.uint64) ^ np.uint64(epoch_key(seed, _VAL_SALT)))
    is_val = np.zeros(n_docs, dtype=bool)
    is_val[np.argsort(keys, kind="stable")[:n_val]] = True
    return is_val


def bpe_sample_bytes(vocab_size: int) -> int:
    """How much train text the BPE is trained on: 2 MiB, more for large vocabularies."""
    return max(2 << 20, 2048 * vocab_size)


def sample_texts(corpus: Corpus, is_val: np.ndarray, budget: int) -> Iterator[str]:
    """Train documents in a fixed hash order (spread over the corpus), up to `budget` bytes."""
    train = np.flatnonzero(~is_val)
    order = train[np.argsort(splitmix64(train.astype(np.uint64)), kind="stable")]
    for i in order:
        if budget <= 0:
            return
        data = corpus.sources[i].read_bytes()[:budget]
        budget -= len(data)
        yield decode_utf8(data)[0]


def default_workers() -> int:
    """The cores this process may use."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# Internals -------------------------------------------------------------------------------------


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _check_args(tokenizer: str, vocab_size: int | None, val_fraction: float, workers: int | None, seed: int) -> None:
    if vocab_size is not None and tokenizer != "bpe":
        raise ConfigError("--vocab-size applies only to a trained BPE (--tokenizer bpe)")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if seed < 0:
        raise ConfigError(f"--seed must be non-negative, got {seed}")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a directory")
    if (out / META_FILE).exists() and not overwrite:
        raise InputError(f"{out} already holds a dataset ({META_FILE}); pass --overwrite to replace it")


@dataclass(frozen=True)
class _TokenizerChoice:
    tok: Any  # tokenizers.Tokenizer
    kind: str  # "bpe", "byte" or "file"
    json: bytes  # the tokenizer.json to write
    source: str | None  # the given file, for kind "file"

    @property
    def vocab_size(self) -> int:
        return vocab_size_of(self.tok)

    @property
    def dtype(self) -> np.dtype:
        return token_dtype(self.vocab_size)


def _get_tokenizer(
    choice: str, vocab_size: int | None, corpus: Corpus, is_val: np.ndarray, warn: Warn
) -> _TokenizerChoice:
    if choice == "byte":
        tok = byte_tokenizer()
        return _TokenizerChoice(tok, "byte", tokenizer_bytes(tok), None)
    if choice == "bpe":
        size = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
        tok = train_bpe(sample_texts(corpus, is_val, bpe_sample_bytes(size)), size)
        if vocab_size_of(tok) < size:
            warn(f"the corpus supports a vocabulary of only {vocab_size_of(tok)} (asked for {size})")
        return _TokenizerChoice(tok, "bpe", tokenizer_bytes(tok), None)
    if Path(choice).is_dir():  # a params directory: its own tokenizer
        file, tok = checkpoint_tokenizer(choice)
        return _TokenizerChoice(tok, "file", file.read_bytes(), str(Path(choice).absolute()))
    return _TokenizerChoice(load_tokenizer(choice), "file", Path(choice).read_bytes(), str(choice))


def checkpoint_tokenizer(ck: str | Path) -> tuple[Path, Any]:
    """(its tokenizer.json, the tokenizer) of a params directory, checked to fit the model's vocabulary."""
    from jaxllm.base_checkpoint import checkpoint_model, checkpoint_tokenizer_file

    cfg = checkpoint_model(ck)
    file = checkpoint_tokenizer_file(ck)
    if file is None:
        raise InputError(f"--tokenizer {ck}: this params directory has no {TOKENIZER_FILE}")
    tok = load_tokenizer(file)
    if (n := vocab_size_of(tok)) > cfg.vocab_size:
        raise InputError(f"{file} has {n} tokens, more than the model's vocabulary of {cfg.vocab_size}")
    return file, tok


def _checked_encoder(tok: Any, dtype: np.dtype, corpus: Corpus, warn: Warn) -> Encoder:
    """The fast encoder, if it agrees with `tokenizers` on a sample of the corpus."""
    encoder = make_encoder(tok, dtype)
    if encoder.name == "tokenizers":
        warn("no fast encoder fits this tokenizer: encoding with `tokenizers` (several times slower)")
        return encoder
    sample = "".join(sample_texts(corpus, np.zeros(len(corpus.sources), bool), CHECK_CHARS))[:CHECK_CHARS]
    reference = reference_encoder(tok, dtype)
    if not np.array_equal(encoder(sample), reference(sample)):
        warn(f"the {encoder.name} encoder disagrees with `tokenizers` on this tokenizer: using `tokenizers`")
        return reference
    return encoder


@dataclass(frozen=True)
class _Doc:
    tokens: np.ndarray  # the document's ids followed by the end-of-text id
    n_bytes: int
    bad_bytes: int
    sha256: str


def _encode_docs(sources: Sequence[Source], encoder: Encoder) -> list[_Doc]:
    docs = []
    eot = np.array([encoder.eot_id], encoder.dtype)
    for src in sources:
        data = src.read_bytes()
        text, bad = decode_utf8(data)
        tokens = np.concatenate([encoder(text), eot])
        docs.append(_Doc(tokens, len(data), bad, hashlib.sha256(data).hexdigest()))
    return docs


def _chunks(sources: Sequence[Source]) -> Iterator[list[Source]]:
    chunk: list[Source] = []
    size = 0
    for src in sources:
        chunk.append(src)
        size += src.size
        if size >= CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _ordered_map(fn: Callable[[Any], Any], items: Iterator[Any], workers: int) -> Iterator[Any]:
    """fn over items on `workers` threads, results in input order, at most 2*workers in flight."""
    if workers == 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers, thread_name_prefix="jaxllm-encode") as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _write_tokens(
    corpus: Corpus,
    is_val: np.ndarray,
    encoder: Encoder,
    workers: int | None,
    files: tuple[BinaryIO, BinaryIO],
    progress: bool,
    warn: Warn,
) -> list[dict[str, Any]]:
    """Encode every document into the train/val files in order; returns the manifest."""
    from tqdm import tqdm

    n_workers = workers or default_workers()
    manifest: list[dict[str, Any]] = []
    bad_files: list[int] = []  # invalid bytes of each file that had some
    bar = tqdm(
        total=corpus.total_bytes,
        unit="B",
        unit_scale=True,
        desc="tokenizing",
        disable=not progress,
        file=sys.stderr,
        leave=False,
    )
    with bar:
        chunks = _ordered_map(lambda c: _encode_docs(c, encoder), _chunks(corpus.sources), n_workers)
        for doc in (d for chunk in chunks for d in chunk):
            i = len(manifest)
            doc.tokens.tofile(files[int(is_val[i])])
            entry = {
                "path": corpus.sources[i].name,
                "bytes": doc.n_bytes,
                "sha256": doc.sha256,
                "split": "val" if is_val[i] else "train",
                "tokens": len(doc.tokens),
            }
            if doc.bad_bytes:
                entry["bad_utf8_bytes"] = doc.bad_bytes
                bad_files.append(doc.bad_bytes)
                if len(bad_files) <= MAX_SKIP_WARNINGS:
                    with tqdm.external_write_mode(file=sys.stderr):  # keep the bar off the warning's line
                        warn(f"{corpus.sources[i].name}: {doc.bad_bytes} invalid UTF-8 byte(s) replaced by U+FFFD")
            manifest.append(entry)
            bar.update(doc.n_bytes)
    if len(bad_files) > MAX_SKIP_WARNINGS:
        more = bad_files[MAX_SKIP_WARNINGS:]
        warn(f"{len(more)} more files had invalid UTF-8: {sum(more)} byte(s) replaced by U+FFFD")
    return manifest


def _make_meta(
    manifest: list[dict[str, Any]], corpus: Corpus, choice: _TokenizerChoice, val_fraction: float, seed: int
) -> DataMeta:
    eot_token, eot_id = eot_of(choice.tok)
    splits = {}
    for split in SPLITS:
        docs = [e for e in manifest if e["split"] == split]
        splits[split] = {
            "file": split_file(split),
            "tokens": sum(e["tokens"] for e in docs),
            "documents": len(docs),
            "bytes": sum(e["bytes"] for e in docs),
        }
    return DataMeta.model_validate(
        {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "vocab_size": choice.vocab_size,
            "dtype": choice.dtype.name,
            "eot_id": eot_id,
            "eot_token": eot_token,
            "tokenizer": {
                "kind": choice.kind,
                "file": TOKENIZER_FILE,
                "sha256": sha256_hex(choice.json),
                "source": choice.source,
            },
            "splits": splits,
            "val_fraction": val_fraction,
            "seed": seed,
            "documents": len(manifest),
            "input_bytes": sum(e["bytes"] for e in manifest),
            "bad_utf8_bytes": sum(e.get("bad_utf8_bytes", 0) for e in manifest),
            "corpus": corpus.description,
            "inputs": manifest,
        }
    )
