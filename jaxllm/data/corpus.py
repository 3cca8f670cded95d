"""Finding and reading the input text: files, directories, glob patterns, stdin, the default corpus.

A document is one input file (or all of stdin). Directories are walked recursively in sorted order
(hidden entries skipped); binary files met there are skipped with a warning, while a binary file
named explicitly is an error (the first few skipped files are named, then counted). `__pycache__`
directories are not walked. Text is UTF-8; invalid bytes become U+FFFD and are counted.
"""

from __future__ import annotations

import codecs
import fnmatch
import glob as globlib
import os
import platform
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from jaxllm.errors import InputError

STDIN = "-"
SNIFF_BYTES = 8192  # like git and grep: a NUL byte in the first 8 KB means binary
DEFAULT_CORPUS_GLOB = "*.py"
SKIPPED_DIRS = frozenset({"__pycache__"})  # besides hidden ones, never walked into
_NOT_STDLIB = frozenset({"site-packages", "dist-packages"})
MAX_SKIP_WARNINGS = 10  # then one line counts the rest

Warn = Callable[[str], None]


@dataclass(frozen=True)
class Source:
    """One document: a file (`path`) or stdin's bytes (`data`)."""

    name: str  # as shown in messages and in the manifest
    size: int  # bytes
    path: Path | None = None
    data: bytes | None = None

    def read_bytes(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        try:
            return self.path.read_bytes()
        except OSError as err:
            raise InputError(f"cannot read {self.name}: {err.strerror}") from None


@dataclass(frozen=True)
class Corpus:
    sources: tuple[Source, ...]
    description: str

    @property
    def total_bytes(self) -> int:
        return sum(s.size for s in self.sources)


def is_binary(head: bytes) -> bool:
    """True when the leading bytes of a file contain a NUL byte."""
    return b"\0" in head[:SNIFF_BYTES]


def decode_utf8(data: bytes) -> tuple[str, int]:
    """(text, number of invalid bytes): like `data.decode("utf-8", "replace")`, counting bad bytes."""
    try:
        return data.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    view, pieces, bad, pos = memoryview(data), [], 0, 0
    while True:
        try:
            pieces.append(codecs.utf_8_decode(view[pos:], "strict", True)[0])
            return "".join(pieces), bad
        except UnicodeDecodeError as err:
            pieces.append(codecs.utf_8_decode(view[pos : pos + err.start], "strict", True)[0])
            pieces.append("\ufffd")
            bad += err.end - err.start
            pos += err.end


def default_corpus_root() -> Path:
    """The running interpreter's standard library directory."""
    return Path(sysconfig.get_paths()["stdlib"])


def default_corpus(on_warning: Warn) -> Corpus:
    """The standard library's own `.py` sources (site-packages excluded): ~30 MB on any machine."""
    root = default_corpus_root()
    skipped: list[Path] = []
    sources = _walk(root, DEFAULT_CORPUS_GLOB, skipped, exclude=_NOT_STDLIB)
    _warn_skipped(skipped, on_warning)
    desc = f"default: the Python {platform.python_version()} standard library's .py files in {root}"
    return _checked(Corpus(tuple(sources), desc), [str(root)])


def find_inputs(
    inputs: Sequence[str],
    on_warning: Warn,
    glob: str = "*",
    stdin: bytes | None = None,
    skip_dir: Path | None = None,
) -> Corpus:
    """Resolve INPUT arguments (files, directories, glob patterns, `-`) into documents, in order.

    `glob` filters the files found inside directories. `stdin`: the bytes to use for `-` (read
    from sys.stdin when None). `skip_dir`: a directory never walked into (the output directory).
    """
    if not inputs:
        return default_corpus(on_warning)
    found: list[Source] = []
    skipped: list[Path] = []
    for item in inputs:
        path = Path(item)
        if item == STDIN:
            data = sys.stdin.buffer.read() if stdin is None else stdin
            if is_binary(data):
                raise InputError("stdin looks binary (a NUL byte in its first 8 KB); give text")
            found.append(Source("<stdin>", len(data), data=data))
        elif path.is_dir():
            found += _walk(path, glob, skipped, skip_dir=skip_dir)
        elif path.is_file():
            if _sniff(path):
                raise InputError(f"{item} looks binary (a NUL byte in its first 8 KB); give text files")
            found.append(Source(item, path.stat().st_size, path=path))
        elif globlib.has_magic(item):
            matches = sorted(m for m in globlib.glob(item, recursive=True) if Path(m).is_file())
            if not matches:
                raise InputError(f"no files match {item!r}")
            found += _text_files([Path(m) for m in matches], skipped)
        else:
            raise InputError(f"input not found: {item}")
    _warn_skipped(skipped, on_warning)
    return _checked(Corpus(tuple(_unique(found)), f"{len(inputs)} input(s): {' '.join(inputs)}"), inputs)


def _sniff(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return is_binary(f.read(SNIFF_BYTES))
    except OSError as err:
        raise InputError(f"cannot read {path}: {err.strerror}") from None


def _walk(
    root: Path,
    pattern: str,
    skipped: list[Path],
    exclude: frozenset[str] = frozenset(),
    skip_dir: Path | None = None,
) -> list[Source]:
    """Files under `root` whose name matches `pattern`, sorted by path; binaries go to `skipped`."""
    paths = []
    avoid = skip_dir.resolve() if skip_dir is not None else None
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".")
            and d not in SKIPPED_DIRS | exclude
            and (avoid is None or (Path(dirpath) / d).resolve() != avoid)
        )
        paths += [
            Path(dirpath) / f
            for f in filenames
            if not f.startswith(".") and fnmatch.fnmatch(f, pattern) and (Path(dirpath) / f).is_file()
        ]
    return _text_files(sorted(paths), skipped)


def _text_files(paths: list[Path], skipped: list[Path]) -> list[Source]:
    sources = []
    for path in paths:
        if _sniff(path):
            skipped.append(path)
        else:
            sources.append(Source(str(path), path.stat().st_size, path=path))
    return sources


def _warn_skipped(skipped: list[Path], on_warning: Warn) -> None:
    for path in skipped[:MAX_SKIP_WARNINGS]:
        on_warning(f"skipping binary file {path}")
    if len(skipped) > MAX_SKIP_WARNINGS:
        on_warning(f"skipping {len(skipped) - MAX_SKIP_WARNINGS} more binary files")


def _unique(sources: list[Source]) -> list[Source]:
    seen: set[Path] = set()
    out = []
    for s in sources:
        key = s.path.resolve() if s.path is not None else None
        if key is None or key not in seen:
            out.append(s)
            if key is not None:
                seen.add(key)
    return out


def _checked(corpus: Corpus, inputs: Sequence[str]) -> Corpus:
    """Drop empty documents; an InputError when no text is left."""
    sources = tuple(s for s in corpus.sources if s.size > 0)
    if not sources:
        raise InputError(f"empty corpus: no text found in {' '.join(inputs)}")
    return Corpus(sources, corpus.description)
