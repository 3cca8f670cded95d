"""Hugging Face GPT-2 interop: import-hf matches GPT2LMHeadModel's logits; export-hf is bit-exact.

The Llama family (llama, qwen2, mistral) and the bad-input cases: test_hf_families.py.
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from jaxllm import InputError, ModelConfig, forward, init_params, load_params, save_params
from jaxllm.hf import export_hf, import_hf

from conftest import random_tokens

transformers = pytest.importorskip("transformers", reason="transformers (dev extra) is needed for HF parity")


def make_hf_gpt2(path, *, tie=True, activation="gelu_new", seed=0):
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=211,
        n_positions=32,
        n_embd=48,
        n_layer=2,
        n_head=4,
        activation_function=activation,
        tie_word_embeddings=tie,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # non-trivial biases and norms, so that every mapping is exercised
        for name, p in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path)
    return model


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "jaxllm.cli", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(("tie", "activation"), [(True, "gelu_new"), (False, "gelu")])
def test_import_hf_matches_gpt2lmheadmodel_logits(tmp_path, tie, activation):
    model = make_hf_gpt2(tmp_path / "hf", tie=tie, activation=activation)
    out = run_cli("import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert out.returncode == 0, out.stderr
    cfg, params = load_params(tmp_path / "ckpt")
    assert cfg.tie_embeddings is tie and cfg.gelu == ("tanh" if activation == "gelu_new" else "exact")
    tokens = random_tokens(211, 3, 32)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    got = np.asarray(forward(cfg, params, tokens))
    assert np.max(np.abs(got - expected)) <= 1e-4
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5


@pytest.mark.parametrize("tie", [True, False])
def test_hf_import_then_export_reproduces_the_tensors_bit_exact(tmp_path, tie):
    make_hf_gpt2(tmp_path / "hf", tie=tie)
    import_hf(tmp_path / "hf", tmp_path / "ckpt")
    export_hf(tmp_path / "ckpt", tmp_path / "hf2")
    a, b = load_file(tmp_path / "hf" / "model.safetensors"), load_file(tmp_path / "hf2" / "model.safetensors")
    assert set(b) == set(a) - {k for k in a if k.endswith((".attn.bias", ".attn.masked_bias"))}
    assert all(np.array_equal(a[k], b[k]) for k in b)


def test_export_then_import_is_bit_exact_and_loads_in_transformers(tmp_path):
    cfg = ModelConfig.preset("gpt2-124m").replace(
        n_layers=2, vocab_size=300, d_model=64, n_heads=4, d_ff=256, context_length=32
    )
    params = init_params(cfg, 0)
    save_params(tmp_path / "ckpt", cfg, params)
    out = run_cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["n_inner"] == 256
    import_hf(tmp_path / "hf", tmp_path / "back")
    _, back = load_params(tmp_path / "back")
    import jax

    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(back), strict=True))
    model = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    tokens = random_tokens(300, 2, 32)
    with torch.no_grad():
        expected = model(torch.from_numpy(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(cfg, params, tokens)), expected, atol=1e-4, rtol=0)


def test_grouped_query_gpt_cannot_be_exported_as_gpt2(tmp_path):
    cfg = ModelConfig.preset("mini").replace(n_layers=1, vocab_size=64, d_model=64, n_heads=4, n_kv_heads=2, d_ff=64)
    save_params(tmp_path / "ckpt", cfg, init_params(cfg, 0))
    out = run_cli("export-hf", str(tmp_path / "ckpt"), str(tmp_path / "hf"))
    assert out.returncode == 2 and "is not a GPT-2 architecture" in out.stderr
    assert not (tmp_path / "hf").exists()


def test_import_hf_from_a_directory_without_weights_names_the_file(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    out = run_cli("import-hf", str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    assert out.returncode == 2 and "missing model.safetensors" in out.stderr
    assert not (tmp_path / "ckpt").exists()


def test_unsupported_model_type_is_refused(tmp_path):
    make_hf_gpt2(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**config, "model_type": "falcon"}))
    with pytest.raises(InputError, match="model_type 'falcon' is not supported"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
