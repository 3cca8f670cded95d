"""Hugging Face Llama-family interop: llama (plain, llama3 and linear RoPE scaling), qwen2, mistral.

Each tiny random model is built with transformers in the test and saved with `save_pretrained`.
float32 bounds, as test_parity_torch: logits within 1e-4 max abs and 1e-5 relative L2 of
transformers'. Greedy continuations (32 tokens) must equal `generate(do_sample=False)`'s up to the
first step where transformers' top-2 logits are within 1e-4 (a near-tie that summation order may
flip; with these weights' std 0.2 none occurs in practice, and at least 16 steps are always compared).
"""

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from jaxllm import ModelConfig, forward, generate, init_params, load_params, save_params
from jaxllm.hf import export_hf, import_checkpoint, import_hf, read_hf_dir

from conftest import random_tokens

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is needed for HF parity")

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    initializer_range=0.2,  # large weights: clear greedy margins
    tie_word_embeddings=False,
    bos_token_id=None,
    eos_token_id=None,
    pad_token_id=None,
)
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}  # fmt: skip
LINEAR = {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0}
VARIANTS = {
    "llama": ("LlamaConfig", {}),
    "llama-tied": ("LlamaConfig", {"tie_word_embeddings": True}),
    "llama-rope-llama3": ("LlamaConfig", {"rope_parameters": LLAMA3}),
    "llama-rope-linear": ("LlamaConfig", {"rope_parameters": LINEAR}),
    "qwen2": ("Qwen2Config", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),  # sequences of 48 tokens: the window matters
}


def make_hf(path, variant="llama", *, seed=0, dtype=None, **save_kwargs):
    """A tiny random transformers model of `variant`, saved to `path` (in `dtype`); returns it in float32."""
    class_name, extra = VARIANTS[variant]
    config = getattr(transformers, class_name)(**{**COMMON, **extra})
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so that every mapping is exercised
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    model.generation_config.eos_token_id = None
    if dtype is None:
        model.save_pretrained(path, **save_kwargs)
        return model
    model.to(dtype).save_pretrained(path, **save_kwargs)  # (this also rounds the RoPE buffers: reload)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.from_numpy(tokens)).logits.numpy()


def logit_diffs(got, expected):
    return float(np.max(np.abs(got - expected))), float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def assert_float32_parity(got, expected):
    max_abs, rel = logit_diffs(got, expected)
    assert max_abs <= 1e-4 and rel <= 1e-5, f"max |diff| {max_abs:.2e}, relative L2 {rel:.2e}"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxllm.cli", *args], capture_output=True, text=True, timeout=120)


def tree_equal(a, b):
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
    )


# Import: logits and greedy generation match transformers -----------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_matches_transformers_logits_and_greedy_generation(tmp_path, variant):
    model = make_hf(tmp_path / "hf", variant)
    out = run_cli("import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    expected_type = variant.split("-")[0]
    assert f"imported {expected_type} (2 layers" in out.stdout
    assert json.loads((tmp_path / "ckpt" / "source.json").read_text())["model_type"] == expected_type
    cfg, params = load_params(tmp_path / "ckpt")
    assert cfg.family == "llama" and cfg.qkv_bias == (variant == "qwen2")
    assert cfg.sliding_window == (8 if variant == "mistral" else None)
    assert cfg.tie_embeddings == (variant == "llama-tied")
    assert (cfg.rope_scaling is None) == ("rope" not in variant)

    tokens = random_tokens(VOCAB, 2, 48)
    expected = hf_logits(model, tokens)
    got = np.asarray(forward(cfg, params, tokens))
    print("{}: logits max |diff| {:.2e}, relative L2 {:.2e}".format(variant, *logit_diffs(got, expected)))
    assert_float32_parity(got, expected)
    feature = {"mistral": "sliding_window", "llama-rope-llama3": "rope_scaling", "llama-rope-linear": "rope_scaling"}
    if variant in feature:  # the window / the scaling is what makes them agree
        without = np.asarray(forward(cfg.replace(**{feature[variant]: None}), params, tokens))
        assert np.max(np.abs(without - expected)) > 1e-2

    prompt = [5, 17, 42, 7, 99, 3, 250, 11]
    with torch.no_grad():
        hf_out = model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=32,
            do_sample=False, output_scores=True, return_dict_in_generate=True, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
    hf_tokens = hf_out.sequences[0, len(prompt) :].tolist()
    top2 = [torch.topk(s[0], 2).values for s in hf_out.scores]
    near_tie = [i for i, v in enumerate(top2) if float(v[0] - v[1]) < 1e-4]
    n = near_tie[0] + 1 if near_tie else 32
    assert len(hf_tokens) == 32 and n >= 16
    (ours,) = generate(cfg, params, [prompt], max_new_tokens=32)
    assert ours[:n] == hf_tokens[:n]


# Export: transformers loads it with no missing keys and the same logits; round trips are exact ---


@pytest.mark.parametrize("variant", ["llama-tied", "llama-rope-llama3", "qwen2", "mistral"])
def test_import_export_round_trip_is_bit_exact_and_loads_in_transformers(tmp_path, variant, tokenizer_file):
    model = make_hf(tmp_path / "hf", variant)
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_file), eos_token="<|endoftext|>")
    hf_tok.save_pretrained(tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    out = run_cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf2"))
    assert out.returncode == 0, out.stderr
    exported = json.loads((tmp_path / "hf2" / "config.json").read_text())
    assert exported["model_type"] == variant.split("-")[0]
    assert exported["architectures"] == [type(model).__name__]

    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert ("lm_head.weight" in b) == (variant != "llama-tied")

    back, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf2", output_loading_info=True)
    assert type(back) is type(model)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = random_tokens(VOCAB, 2, 48, seed=3)
    np.testing.assert_array_equal(hf_logits(back.eval(), tokens), hf_logits(model, tokens))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")
    assert tok("the cat sat")["input_ids"] == hf_tok("the cat sat")["input_ids"]

    import_hf(tmp_path / "hf2", tmp_path / "ckpt2")
    (cfg, params), (cfg2, params2) = load_params(tmp_path / "ckpt"), load_params(tmp_path / "ckpt2")
    assert cfg2.replace(name=cfg.name) == cfg and tree_equal(params, params2)


@pytest.mark.parametrize(
    ("changes", "model_type"),
    [({}, "llama"), ({"qkv_bias": True}, "qwen2"), ({"sliding_window": 6}, "mistral"),
     ({"qkv_bias": True, "sliding_window": 6, "rope_scaling": {"type": "linear", "factor": 2.0}}, "qwen2")],
)  # fmt: skip
def test_a_native_llama_family_checkpoint_exports_as_its_family(tmp_path, changes, model_type):
    cfg = ModelConfig.preset("advanced").replace(
        vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, context_length=32, init_std=0.2,
        **changes,
    )  # fmt: skip
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape), init_params(cfg, 0))
    save_params(tmp_path / "ckpt", cfg, params)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert model.config.model_type == model_type
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    tokens = random_tokens(VOCAB, 2, 32, seed=4)
    assert_float32_parity(np.asarray(forward(cfg, params, tokens)), hf_logits(model.eval(), tokens))
    import_hf(tmp_path / "hf", tmp_path / "back")
    back_cfg, back = load_params(tmp_path / "back")
    assert tree_equal(params, back) and back_cfg.replace(name=cfg.name) == cfg


# File variants: sharded, bf16, transformers 4 config layout ---------------------------------------


def test_sharded_checkpoint_imports_the_same_params(tmp_path):
    make_hf(tmp_path / "one", "qwen2")
    make_hf(tmp_path / "sharded", "qwen2", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    import_hf(tmp_path / "one", tmp_path / "a")
    import_hf(tmp_path / "sharded", tmp_path / "b")
    assert tree_equal(load_params(tmp_path / "a")[1], load_params(tmp_path / "b")[1])


def test_bfloat16_file_imports_exactly_widened(tmp_path):
    model = make_hf(tmp_path / "hf", "llama", dtype=torch.bfloat16)  # the bf16 weights, widened to float32
    ckpt = read_hf_dir(tmp_path / "hf")
    assert all(w.dtype == np.float32 for w in ckpt.tensors.values())
    import_checkpoint(ckpt, tmp_path / "ckpt")
    cfg, params = load_params(tmp_path / "ckpt")
    tokens = random_tokens(VOCAB, 2, 48)
    assert_float32_parity(np.asarray(forward(cfg, params, tokens)), hf_logits(model, tokens))


def test_transformers_4_config_layout_reads_the_same(tmp_path):
    """rope_theta + rope_scaling (key `type`) at the top level, as transformers 4 wrote them."""
    make_hf(tmp_path / "hf", "llama-rope-llama3")
    import_hf(tmp_path / "hf", tmp_path / "v5")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **rope}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    import_hf(tmp_path / "hf", tmp_path / "v4")
    assert load_params(tmp_path / "v4")[0] == load_params(tmp_path / "v5")[0]


def test_qwen2_window_is_ignored_unless_use_sliding_window(tmp_path):
    make_hf(tmp_path / "hf", "qwen2")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["use_sliding_window"] is False and config.get("sliding_window") in (None, 4096)
    config["sliding_window"] = 4096
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    assert import_hf(tmp_path / "hf", tmp_path / "ckpt").sliding_window is None


# Bad input: one `error:` line naming the problem, exit 2, nothing written -------------------------


@pytest.fixture(scope="module")
def base_hf(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "hf"
    make_hf(path, "llama")
    return path


def _edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


def _edit_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def _truncate(path):
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) // 2])


def _shard_missing(path):
    (path / "model.safetensors").rename(path / "model-00001-of-00002.safetensors")
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    weight_map = {name: first for name in load_file(path / first)} | {"lm_head.weight": second}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


BAD_INPUTS = {
    "model_type": (lambda p: _edit_config(p, model_type="falcon"), "model_type 'falcon' is not supported"),
    "architecture": (
        lambda p: _edit_config(p, architectures=["LlamaForSequenceClassification"]),
        "architecture 'LlamaForSequenceClassification' is not supported",
    ),
    "rope_type": (
        lambda p: _edit_config(p, rope_parameters={"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}),
        "rope scaling type 'yarn' is not supported",
    ),
    "attention_bias": (lambda p: _edit_config(p, attention_bias=True), "attention_bias=true is not supported"),
    "no_config": (lambda p: (p / "config.json").unlink(), "missing config.json"),
    "no_weights": (lambda p: (p / "model.safetensors").unlink(), "missing model.safetensors"),
    "truncated": (_truncate, "not a readable safetensors file"),
    "missing_tensor": (
        lambda p: _edit_weights(p, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
        "missing tensor 'model.layers.1.mlp.up_proj.weight'",
    ),
    "unexpected_tensor": (
        lambda p: _edit_weights(p, lambda t: t.update({"model.layers.2.mlp.up_proj.weight": np.zeros((2, 2), "f4")})),
        "unexpected tensor 'model.layers.2.mlp.up_proj.weight'",
    ),
    "wrong_shape": (
        lambda p: _edit_weights(p, lambda t: t.update({"model.norm.weight": np.ones(65, "f4")})),
        "tensor 'model.norm.weight' has shape (65,), the config needs (64,)",
    ),
    "missing_shard": (_shard_missing, "names shard 'model-00002-of-00002.safetensors', which is missing"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_error_line_and_writes_nothing(tmp_path, base_hf, case):
    edit, message = BAD_INPUTS[case]
    shutil.copytree(base_hf, tmp_path / "hf")
    edit(tmp_path / "hf")
    out = run_cli("import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], out.stderr
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / ".ckpt.tmp").exists()


def test_export_refuses_a_config_its_recorded_family_cannot_express(tmp_path):
    cfg = ModelConfig.preset("advanced").replace(
        vocab_size=VOCAB, d_model=64, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=96, context_length=32, qkv_bias=True
    )
    save_params(tmp_path / "ckpt", cfg, init_params(cfg, 0))
    (tmp_path / "ckpt" / "source.json").write_text(json.dumps({"format": "hf", "path": "x", "model_type": "llama"}))
    out = run_cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert out.returncode == 2 and "has qkv_bias, which model_type 'llama' cannot express" in out.stderr
    assert not (tmp_path / "hf").exists() and not (tmp_path / ".hf.tmp").exists()
