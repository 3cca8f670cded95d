"""`jaxllm preprocess`: outputs, determinism, the split, atomic writes, and bad input at the CLI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

import jaxllm.data.preprocess as pp
from jaxllm.cli import main
from jaxllm.data.corpus import default_corpus, default_corpus_root
from jaxllm.data.meta import read_meta, token_dtype
from jaxllm.data.tokenizer import EOT, byte_to_unicode
from jaxllm.errors import InputError

from data_corpus import write_corpus

OUTPUT_FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")


def run(inputs, out, **kwargs):
    """preprocess() collecting warnings instead of printing them."""
    warnings: list[str] = []
    kwargs.setdefault("vocab_size", 300)
    if kwargs.get("tokenizer", "bpe") != "bpe":
        kwargs.pop("vocab_size")
    result = pp.preprocess([str(i) for i in inputs], out, on_warning=warnings.append, **kwargs)
    return result, warnings


def documents(data_dir: Path, split: str) -> list[str]:
    """The texts of a split, decoded with the dataset's own tokenizer and cut at end-of-text."""
    meta = read_meta(data_dir)
    tok = Tokenizer.from_file(str(data_dir / "tokenizer.json"))
    ids = np.fromfile(data_dir / f"{split}.bin", dtype=meta.dtype).tolist()
    docs, current = [], []
    for i in ids:
        if i == meta.eot_id:
            docs.append(tok.decode(current))
            current = []
        else:
            current.append(i)
    assert current == [], "every document ends with the end-of-text id"
    return docs


@pytest.fixture
def root(tmp_path) -> Path:
    """The corpus directory (outputs go next to it, never inside)."""
    return tmp_path / "corpus"


@pytest.fixture
def corpus(root) -> list[Path]:
    return write_corpus(root, n_docs=20)


def test_output_files_are_identical_for_1_and_2_workers(corpus, root, tmp_path):
    run([root], tmp_path / "w1", workers=1)
    pp_chunk = pp.CHUNK_BYTES
    try:
        pp.CHUNK_BYTES = 2000  # many chunks in flight, finishing out of order
        run([root], tmp_path / "w2", workers=2)
    finally:
        pp.CHUNK_BYTES = pp_chunk
    for name in OUTPUT_FILES:
        assert (tmp_path / "w1" / name).read_bytes() == (tmp_path / "w2" / name).read_bytes(), name


@pytest.mark.parametrize("tokenizer", ["bpe", "byte"])
def test_splits_hold_exactly_their_documents_in_file_order(corpus, tmp_path, tokenizer):
    out = tmp_path / "data"
    result, _ = run(corpus, out, tokenizer=tokenizer, val_fraction=0.25)
    manifest = result.meta.inputs
    texts = {str(p): p.read_bytes().decode("utf-8") for p in corpus}  # no newline translation
    for split in ("train", "val"):
        expected = [texts[e["path"]] for e in manifest if e["split"] == split]
        assert documents(out, split) == expected


def test_val_split_is_disjoint_from_train_deterministic_and_seeded(corpus, tmp_path):
    def val_paths(seed, name):
        result, _ = run(corpus, tmp_path / name, tokenizer="byte", val_fraction=0.2, seed=seed)
        splits = {e["path"]: e["split"] for e in result.meta.inputs}
        assert sorted(splits) == sorted(map(str, corpus))  # every document in exactly one split
        return {p for p, s in splits.items() if s == "val"}

    first, again, other = val_paths(0, "a"), val_paths(0, "b"), val_paths(1, "c")
    assert len(first) == round(0.2 * len(corpus)) == 4
    assert first == again
    assert first != other
    train = set(map(str, corpus)) - first
    assert not train & first


def test_meta_json_records_sizes_dtype_hash_and_manifest(corpus, tmp_path):
    out = tmp_path / "data"
    result, _ = run(corpus, out)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["vocab_size"] == 300 and meta["dtype"] == "uint16" and meta["eot_id"] == 0
    for split in ("train", "val"):
        assert (out / f"{split}.bin").stat().st_size == 2 * meta["splits"][split]["tokens"]
    assert meta["tokenizer"]["sha256"] == hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest()
    assert meta["input_bytes"] == sum(p.stat().st_size for p in corpus)
    assert [e["path"] for e in meta["inputs"]] == [str(p) for p in corpus]
    first = meta["inputs"][0]
    assert first["sha256"] == hashlib.sha256(corpus[0].read_bytes()).hexdigest()
    assert result.mb_per_s > 0 and re.search(r"\d+\.\d [kM]B/s", result.summary())
    assert not list(out.glob(".*.tmp"))


def test_corpus_too_small_for_the_vocab_size_warns_and_records_the_real_size(corpus, tmp_path):
    result, warnings = run(corpus[:2], tmp_path / "data", vocab_size=60_000, val_fraction=0)
    assert result.meta.vocab_size < 60_000
    assert warnings == [f"the corpus supports a vocabulary of only {result.meta.vocab_size} (asked for 60000)"]


def test_token_dtype_is_uint16_up_to_65536_ids_then_uint32():
    assert token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_large_vocab_tokenizer_file_gives_uint32_tokens(corpus, tmp_path):
    vocab = {ch: b for b, ch in byte_to_unicode().items()}
    tok = Tokenizer(models.BPE(vocab={**vocab, EOT: 70_000}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    tok.save(str(tmp_path / "big.json"))
    out = tmp_path / "data"
    result, _ = run(corpus[:3], out, tokenizer=str(tmp_path / "big.json"), val_fraction=0)
    assert result.meta.dtype == "uint32" and result.meta.vocab_size == 70_001
    assert result.meta.tokenizer.kind == "file"
    assert (out / "tokenizer.json").read_bytes() == (tmp_path / "big.json").read_bytes()
    ids = np.fromfile(out / "train.bin", dtype=np.uint32)
    assert ids[-1] == 70_000 and ids[0] == corpus[0].read_bytes()[0]


def test_output_directory_inside_an_input_directory_is_not_read_back(corpus, root):
    first, _ = run([root], root / "data", tokenizer="byte")
    again, _ = run([root], root / "data", tokenizer="byte", overwrite=True)
    assert again.meta.inputs == first.meta.inputs and again.meta.documents == len(corpus)


def test_stdin_is_one_document(tmp_path):
    out = tmp_path / "data"
    text = "from stdin: naïve 😀\n"
    result, _ = run(["-"], out, tokenizer="byte", val_fraction=0, stdin=text.encode())
    assert result.meta.documents == 1 and result.meta.inputs[0]["path"] == "<stdin>"
    assert documents(out, "train") == [text]


def test_glob_option_and_glob_pattern_inputs_select_files(corpus, root, tmp_path):
    (root / "notes.md").write_text("markdown\n")
    result, _ = run([root], tmp_path / "a", tokenizer="byte", glob="*.md", val_fraction=0)
    assert [Path(e["path"]).name for e in result.meta.inputs] == ["notes.md"]
    pattern = str(root / "**" / "doc00*.txt")
    result, _ = run([pattern], tmp_path / "b", tokenizer="byte", val_fraction=0)
    assert {Path(e["path"]).name for e in result.meta.inputs} == {p.name for p in corpus if p.name < "doc010"}


def test_binary_file_inside_a_directory_is_skipped_with_a_warning(corpus, root, tmp_path):
    blob = root / "image.png"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)))
    result, warnings = run([root], tmp_path / "data", tokenizer="byte")
    assert str(blob) not in [e["path"] for e in result.meta.inputs]
    assert any("skipping binary file" in w and str(blob) in w for w in warnings)


def test_many_skipped_binaries_are_named_up_to_ten_then_counted_and_pycache_is_not_walked(corpus, root, tmp_path):
    for i in range(12):
        (root / f"blob{i:02d}.dat").write_bytes(b"\x00" * 10)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.txt").write_text("text, but in __pycache__\n")
    result, warnings = run([root], tmp_path / "data", tokenizer="byte")
    assert [w for w in warnings if "binary" in w] == [
        *(f"skipping binary file {root / f'blob{i:02d}.dat'}" for i in range(10)),
        "skipping 2 more binary files",
    ]
    assert result.meta.documents == len(corpus)


def test_invalid_utf8_is_replaced_with_a_warning_counting_the_bytes(corpus, root, tmp_path):
    bad = root / "latin1.txt"
    bad.write_bytes("café".encode("latin-1") + b" and \xff\xfe and fine\n")
    out = tmp_path / "data"
    result, warnings = run([root], out, tokenizer="byte", val_fraction=0)
    assert [w for w in warnings if str(bad) in w] == [f"{bad}: 3 invalid UTF-8 byte(s) replaced by U+FFFD"]
    assert result.meta.bad_utf8_bytes == 3
    entry = next(e for e in result.meta.inputs if e["path"] == str(bad))
    assert entry["bad_utf8_bytes"] == 3
    assert "caf\ufffd and \ufffd\ufffd and fine\n" in documents(out, "train")


def test_invalid_utf8_warnings_name_ten_files_then_count_the_rest(root, tmp_path):
    root.mkdir()
    for i in range(13):
        (root / f"bad{i:02d}.txt").write_bytes(b"x\xff" * (i + 1))
    result, warnings = run([root], tmp_path / "data", tokenizer="byte")
    assert len(warnings) == 11
    assert warnings[9] == f"{root / 'bad09.txt'}: 10 invalid UTF-8 byte(s) replaced by U+FFFD"
    assert warnings[10] == "3 more files had invalid UTF-8: 36 byte(s) replaced by U+FFFD"
    assert result.meta.bad_utf8_bytes == sum(range(1, 14))


def test_existing_dataset_is_kept_unless_overwrite(corpus, tmp_path):
    out = tmp_path / "data"
    run(corpus, out, tokenizer="byte")
    before = (out / "meta.json").read_bytes()
    with pytest.raises(InputError, match="already holds a dataset"):
        run(corpus[:4], out, tokenizer="byte")
    assert (out / "meta.json").read_bytes() == before
    result, _ = run(corpus[:4], out, tokenizer="byte", overwrite=True)
    assert result.meta.documents == 4 and read_meta(out).documents == 4


@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_run_leaves_no_directory_that_looks_complete(corpus, tmp_path, monkeypatch, existing):
    out = tmp_path / "data"
    if existing:
        run(corpus, out, tokenizer="byte")
    old = {name: (out / name).read_bytes() for name in OUTPUT_FILES} if existing else {}
    calls = []

    def encode_then_interrupt(sources, encoder):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return encode_docs(sources, encoder)

    encode_docs = pp._encode_docs
    monkeypatch.setattr(pp, "_encode_docs", encode_then_interrupt)
    monkeypatch.setattr(pp, "CHUNK_BYTES", 1000)
    with pytest.raises(KeyboardInterrupt):
        run(corpus[::-1], out, tokenizer="byte", overwrite=True, workers=1)
    assert len(calls) == 3
    if existing:  # the old dataset is untouched
        assert {name: (out / name).read_bytes() for name in OUTPUT_FILES} == old
        assert sorted(p.name for p in out.iterdir()) == sorted(OUTPUT_FILES)
    else:  # nothing left behind at all
        assert not out.exists()


def test_default_corpus_is_the_standard_library_py_sources(tmp_path):
    corpus = default_corpus(lambda m: None)
    root = default_corpus_root()
    names = [Path(s.name) for s in corpus.sources]
    assert len(names) > 500 and corpus.total_bytes > 10e6
    assert all(n.suffix == ".py" and n.is_relative_to(root) for n in names)
    assert not any({"site-packages", "dist-packages"} & set(n.relative_to(root).parts) for n in names)
    assert root / "os.py" in names and "standard library" in corpus.description
    # The one test that tokenizes real default-corpus text: a small slice of it.
    some = [str(root / name) for name in ("os.py", "json/__init__.py", "textwrap.py")]
    result, _ = run(some, tmp_path / "data", val_fraction=0.34)
    assert result.meta.documents == 3 and result.meta.vocab_size == 300


# CLI: bad input gives one `error:` line naming the problem, exit status 2, and no output ------


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(["preprocess", *args])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def _bad_input(kind: str, d: Path) -> str:
    """Make one kind of bad input under `d`; returns the INPUT argument."""
    if kind == "empty-directory":
        (d / "empty").mkdir()
        return str(d / "empty")
    if kind == "empty-file":
        (d / "e.txt").write_text("")
        return str(d / "e.txt")
    if kind == "explicit-binary":
        (d / "b.bin").write_bytes(b"ab\x00cd")
        return str(d / "b.bin")
    return str(d / {"missing-path": "does-not-exist.txt", "glob-without-match": "no-match-*.txt"}[kind])


@pytest.mark.parametrize(
    ("kind", "message"),
    [
        ("missing-path", "input not found: {d}/does-not-exist.txt"),
        ("glob-without-match", "no files match '{d}/no-match-*.txt'"),
        ("empty-directory", "empty corpus: no text found in {d}/empty"),
        ("empty-file", "empty corpus: no text found in {d}/e.txt"),
        ("explicit-binary", "{d}/b.bin looks binary"),
    ],
)
def test_cli_bad_input_exits_2_with_a_clear_message_and_writes_nothing(tmp_path, capsys, kind, message):
    out = tmp_path / "out"
    code, _, err = cli([_bad_input(kind, tmp_path), "--out", str(out)], capsys)
    assert code == 2
    assert err.startswith("error: ") and message.format(d=tmp_path) in err
    assert "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
        (["--tokenizer", "byte", "--vocab-size", "500"], "--vocab-size applies only"),
        (["--vocab-size", "100"], "at least 257"),
        (["--workers", "0"], "--workers must be at least 1"),
        (["--tokenizer", "missing.json"], "tokenizer file not found: missing.json"),
    ],
)
def test_cli_bad_options_exit_2_naming_the_option(corpus, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    code, _, err = cli([str(corpus[0]), str(corpus[1]), "--out", str(out), *flags], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (out / "meta.json").exists()


def test_cli_single_document_with_a_val_split_explains_what_to_do(corpus, tmp_path, capsys):
    code, _, err = cli([str(corpus[0]), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "needs at least 2 documents" in err and "--val-fraction 0" in err


def test_cli_reports_warnings_and_the_throughput(corpus, root, tmp_path, capsys):
    (root / "bad.txt").write_bytes(b"caf\xe9\n")
    main(["preprocess", str(root), "--out", str(tmp_path / "out"), "--tokenizer", "byte"])
    captured = capsys.readouterr()
    assert "warning: " in captured.err and "1 invalid UTF-8 byte(s)" in captured.err
    assert re.search(r"\d+\.\d [kM]B/s", captured.out) and "train" in captured.out
