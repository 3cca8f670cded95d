"""Tokenizers: training, the byte tokenizer, loading files, and the fast encoders' exactness."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from jaxllm.data.corpus import decode_utf8
from jaxllm.data.tokenizer import (
    EOT,
    byte_tokenizer,
    eot_of,
    load_tokenizer,
    make_encoder,
    reference_encoder,
    tokenizer_bytes,
    train_bpe,
    vocab_size_of,
)
from jaxllm.errors import ConfigError, InputError

from data_corpus import TRICKY, make_text

U16 = np.dtype(np.uint16)
ODD_TEXTS = [
    *TRICKY,
    "",
    " ",
    "\n\n\n",
    "   leading and trailing   ",
    "\r\n\r\n",
    "x\x00y\x01z",
    "a" * 3000,
    "mixed 😀 ﬁ\u3000\u2028 e\u0301\t\x0b\x0c end",
]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    rng = random.Random(0)
    return train_bpe([make_text(rng, 200) for _ in range(20)], vocab_size=400)


@pytest.fixture(scope="module", params=["bpe", "byte"])
def tok(request, bpe) -> Tokenizer:
    return bpe if request.param == "bpe" else byte_tokenizer()


@pytest.mark.parametrize("text", ODD_TEXTS)
def test_decode_of_encode_is_the_original_text_with_unicode_and_odd_whitespace(tok, text):
    encoder = make_encoder(tok, U16)
    assert tok.decode(encoder(text).tolist()) == text


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=80))
def test_fast_encoder_gives_the_ids_of_tokenizers_and_round_trips_any_text(tok, text):
    encoder, reference = make_encoder(tok, U16), reference_encoder(tok, U16)
    ids = encoder(text)
    assert ids.tolist() == reference(text).tolist()
    assert tok.decode(ids.tolist()) == text


def test_trained_bpe_uses_tiktoken_and_byte_tokenizer_uses_raw_bytes(bpe):
    assert make_encoder(bpe, U16).name == "tiktoken"
    assert make_encoder(byte_tokenizer(), U16).name == "bytes"


def test_byte_tokenizer_ids_are_utf8_bytes_and_eot_is_256():
    tok = byte_tokenizer()
    text = "é😀\n"
    assert make_encoder(tok, U16)(text).tolist() == list(text.encode("utf-8"))
    assert eot_of(tok) == (EOT, 256)
    assert vocab_size_of(tok) == 257


def test_literal_end_of_text_string_becomes_the_eot_id_as_in_tokenizers(tok):
    text = f"before{EOT}after{EOT}"
    ids = make_encoder(tok, U16)(text)
    eot = eot_of(tok)[1]
    assert ids.tolist() == tok.encode(text, add_special_tokens=False).ids
    assert ids.tolist().count(eot) == 2
    assert tok.decode(ids.tolist(), skip_special_tokens=False) == text


def test_bpe_training_is_deterministic_and_reaches_the_vocab_size():
    rng = random.Random(1)
    texts = [make_text(rng, 100) for _ in range(10)]
    a, b = train_bpe(texts, 300), train_bpe(texts, 300)
    assert tokenizer_bytes(a) == tokenizer_bytes(b)
    assert vocab_size_of(a) == 300
    assert eot_of(a) == (EOT, 0)


def test_bpe_vocab_below_bytes_plus_eot_is_a_config_error():
    with pytest.raises(ConfigError, match="at least 257"):
        train_bpe(["abc"], 200)


def test_tokenizer_json_file_loads_and_encodes_like_the_trained_one(bpe, tmp_path):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(tokenizer_bytes(bpe))
    loaded = load_tokenizer(path)
    text = make_text(random.Random(2), 30)
    assert make_encoder(loaded, U16)(text).tolist() == make_encoder(bpe, U16)(text).tolist()


@pytest.mark.parametrize(
    ("content", "message"),
    [("{not json", "not a valid tokenizer.json"), (None, "tokenizer file not found")],
)
def test_bad_tokenizer_file_is_an_input_error_naming_it(tmp_path, content, message):
    path = tmp_path / "tok.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError, match=message) as err:
        load_tokenizer(path)
    assert str(path) in str(err.value)


def test_tokenizer_without_end_of_text_token_is_rejected(tmp_path):
    tok = byte_tokenizer()
    spec = json.loads(tok.to_str())
    spec["added_tokens"] = []
    path = tmp_path / "noeot.json"
    path.write_text(json.dumps(spec))
    with pytest.raises(InputError, match="no end-of-text token"):
        load_tokenizer(path)


def _unordered_merges_tokenizer() -> Tokenizer:
    """Merges whose result ids are not in merge order: tiktoken (merging by id) would differ."""
    alphabet = {ch: i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {**alphabet, "ab": 300, "bc": 299}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b"), ("b", "c")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT])
    return tok


def test_tokenizer_tiktoken_cannot_reproduce_falls_back_to_tokenizers():
    tok = _unordered_merges_tokenizer()
    encoder = make_encoder(tok, U16)
    assert encoder.name == "tokenizers"
    vocab = tok.get_vocab()
    assert encoder("abc").tolist() == tok.encode("abc").ids == [vocab["ab"], vocab["c"]]


def test_tokenizer_with_a_normalizer_falls_back_to_tokenizers():
    tok = byte_tokenizer()
    tok.normalizer = normalizers.Lowercase()
    encoder = make_encoder(tok, U16)
    assert encoder.name == "tokenizers"
    assert encoder("ABC").tolist() == list(b"abc")


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=64))
def test_decode_utf8_replaces_like_python_and_counts_the_invalid_bytes(data):
    text, bad = decode_utf8(data)
    assert text == data.decode("utf-8", "replace")
    replacements = text.count("\ufffd") - data.count("\ufffd".encode())  # each one stands for bad bytes
    assert (bad == 0) == (replacements == 0)
    assert len(text.encode("utf-8")) == len(data) - bad + 3 * replacements


def test_decode_utf8_counts_each_invalid_byte():
    assert decode_utf8(b"ok \xff\xfe then \xc3( end") == ("ok \ufffd\ufffd then \ufffd( end", 3)
    assert decode_utf8("fine ünïcode \ufffd".encode()) == ("fine ünïcode \ufffd", 0)
