"""bfloat16 weights for inference: `model.param_dtype` and `--dtype bfloat16` on generate / serve."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import ModelConfig, forward, init_params, load_params
from jaxllm.checkpoint import with_dtype
from jaxllm.cli import main
from jaxllm.errors import InputError

PROMPT = "the cat"


def test_param_dtype_bfloat16_creates_bfloat16_parameters():
    cfg = ModelConfig.preset("mini").replace(n_layers=1, param_dtype="bfloat16")
    leaves = jax.tree.leaves(init_params(cfg, 0))
    assert leaves and all(x.dtype == jnp.bfloat16 for x in leaves)


def test_dtype_bfloat16_casts_loaded_weights_and_sets_compute_dtype(checkpoint):
    cfg32, params32 = load_params(checkpoint[0])
    cfg16, params16 = with_dtype(cfg32, params32, "bfloat16")
    assert (cfg16.param_dtype, cfg16.dtype) == ("bfloat16", "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params16))
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    assert nbytes(params16) * 2 == nbytes(params32)  # half the bytes in device memory
    assert with_dtype(cfg32, params32, None) == (cfg32, params32)


def test_bfloat16_logits_are_close_to_float32(checkpoint):
    """bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9 per operation): across a 2-layer model
    the logits stay within a few percent of float32's, and the most likely token is the same."""
    _, _, cfg, params = checkpoint
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, cfg.context_length)))
    ref = np.asarray(forward(cfg, params, tokens))
    cfg16, params16 = with_dtype(cfg, params, "bfloat16")
    got = np.asarray(forward(cfg16, params16, tokens))
    assert got.dtype == np.float32  # logits are float32 whatever the weights
    rel_l2 = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert 1e-4 < rel_l2 < 0.03  # really computed in bfloat16 (not float32), and close to it
    assert np.mean(got.argmax(-1) == ref.argmax(-1)) > 0.95


def test_bfloat16_weights_with_float32_computation(checkpoint):
    """`--dtype bfloat16-weights`: the weights rounded to bfloat16 alone, so the logits are nearer
    float32's than with bfloat16 computation too, and still not float32's."""
    _, _, cfg, params = checkpoint
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (4, cfg.context_length)))
    ref = np.asarray(forward(cfg, params, tokens))
    cfg_w, params_w = with_dtype(cfg, params, "bfloat16-weights")
    assert (cfg_w.param_dtype, cfg_w.dtype) == ("bfloat16", "float32")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params_w))
    rel_l2 = lambda got: np.linalg.norm(got - ref) / np.linalg.norm(ref)  # noqa: E731
    weights_only = rel_l2(np.asarray(forward(cfg_w, params_w, tokens)))
    both = rel_l2(np.asarray(forward(*with_dtype(cfg, params, "bfloat16"), tokens)))
    assert 1e-5 < weights_only < both < 0.03


def test_an_unknown_dtype_is_one_clear_error(checkpoint):
    _, _, cfg, params = checkpoint
    with pytest.raises(InputError, match="--dtype must be one of float32, bfloat16, bfloat16-weights, got 'fp8'"):
        with_dtype(cfg, params, "fp8")


@pytest.mark.parametrize("dtype", ["bfloat16", "bfloat16-weights"])
def test_generate_with_dtype_bfloat16_streams_text(checkpoint, capsys, dtype):
    main(["generate", "--checkpoint", str(checkpoint[0]), "--prompt", PROMPT, "--max-new-tokens", "8",
          "--temperature", "0", "--dtype", dtype])  # fmt: skip
    out = capsys.readouterr()
    assert out.out.startswith(PROMPT) and len(out.out) > len(PROMPT) + 1
    assert "tokens/s" in out.err


def test_serve_engine_serves_with_bfloat16_weights(checkpoint):
    from jaxllm.request import Sampling, check_request
    from jaxllm.serve import EngineSettings
    from jaxllm.serve.server import load_engine
    from jaxllm.text import load_codec

    from serve_helpers import SLOTS, collect

    engine = load_engine(checkpoint[0], EngineSettings(slots=SLOTS), dtype="bfloat16")
    try:
        assert engine.wait_ready(600), "the engine did not warm up in bfloat16"
        assert (engine.cfg.param_dtype, engine.cfg.dtype) == ("bfloat16", "bfloat16")
        assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(engine.params))
        codec = load_codec(checkpoint[0], engine.cfg.vocab_size)
        sampling = Sampling.make(None, {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True})
        (done,) = collect(engine.submit(check_request(engine.cfg, [codec.encode(PROMPT)], sampling, codec)))
        assert len(done.tokens) == 6
    finally:
        engine.stop()
