"""The inference-only strips layout (jaxllm/decode_layout.py) and the kernel loop that reads it: exact
sums, the same logits and greedy tokens as the dense layout, and never saved."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxllm
from jaxllm import ConfigError, cpu_kernels, decode_layout, few_row_matmul
from jaxllm.config import ModelConfig
from jaxllm.convert import to_numpy_state_dict

from conftest import random_tokens, small_llama

pytestmark = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="the kernel library could not be built here (no C++ compiler?)"
)


def _strips(w_KN: np.ndarray, s: int) -> np.ndarray:
    k, n = w_KN.shape
    return np.ascontiguousarray(w_KN.reshape(k, n // s, s).transpose(1, 0, 2))


def _hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


# (weight dtype, strip width): each dtype's own width (64 bytes a row), and bfloat16 in float32's
# width (float32 params computed in bfloat16)
@pytest.mark.parametrize(("w_dtype", "s"), [("float32", 16), ("bfloat16", 32), ("bfloat16", 16)])
@pytest.mark.parametrize(
    ("m", "k", "n"),
    # one tile of rows; several tiles taking turns over blocks of 64 rows of W (31 and 32 float32
    # rows, over 14 bfloat16 ones), with a last partial block; from 8 float32 rows on, strips in pairs
    [
        (1, 576, 1536),
        (1, 37, 64),
        (3, 70, 192),
        (8, 160, 128),
        (13, 130, 192),
        (20, 150, 96),
        (31, 200, 96),
        (32, 48, 576),
    ],
)
def test_strips_kernel_sums_match_float64(m: int, k: int, n: int, w_dtype: str, s: int) -> None:
    rng = np.random.default_rng(m * 1000 + n)
    x = jnp.asarray(rng.standard_normal((m, k), dtype=np.float32))
    w = np.asarray(jnp.asarray(rng.standard_normal((k, n), dtype=np.float32)).astype(w_dtype))
    mm = lambda x, w_SKC: few_row_matmul.matmul_strips(x, w_SKC, jnp.float32)  # noqa: E731
    w_SKC = jnp.asarray(_strips(w, s))
    assert 'custom_call_target="FewRowMatmulStrips' in _hlo(mm, x, w_SKC)
    got = np.asarray(jax.jit(mm)(x, w_SKC))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())
    # a prefill's rows (beyond the few-row kernels' MAX_ROWS): the same loop, every row as exact
    x_many = jnp.tile(x, (few_row_matmul.MAX_ROWS // m + 2, 1))
    assert 'custom_call_target="FewRowMatmulStrips' in _hlo(mm, x_many, w_SKC)
    got_many = np.asarray(jax.jit(mm)(x_many, w_SKC)).reshape(-1, m, n)
    want_many = np.broadcast_to(want, got_many.shape)
    np.testing.assert_allclose(got_many, want_many, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())
    # the kernel off: XLA's dot on the strips unpacked in the graph
    off = lambda x, w_SKC: few_row_matmul.matmul_strips(x, w_SKC, jnp.float32, enabled=False)  # noqa: E731
    assert "FewRowMatmulStrips" not in _hlo(off, x_many, w_SKC)
    np.testing.assert_allclose(np.asarray(jax.jit(off)(x_many, w_SKC))[:m], want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize(("m", "k", "n"), [(9, 100, 80), (16, 64, 208), (32, 70, 48)])
def test_strips_kernel_pairs_with_an_odd_strip_left_over(m: int, k: int, n: int) -> None:
    # float32 strips go in pairs from 8 rows on: an odd count of 16-column strips leaves one single
    test_strips_kernel_sums_match_float64(m, k, n, "float32", 16)


def _small_llama(**kw) -> ModelConfig:
    # q/o/gate/up/down outputs and k/v (2 x 32) are multiples of 32: all 7 kernels per layer take strips
    return small_llama(context_length=96, d_model=128, d_ff=192, **kw)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_prepared_params_give_the_same_logits_and_greedy_tokens(param_dtype: str) -> None:
    cfg = _small_llama(param_dtype=param_dtype, vocab_size=320)  # a multiple of 32: the tied head in strips too
    params = jaxllm.init_params(cfg, seed=3)
    strips_cfg, strips = decode_layout.prepare(cfg, params)
    assert strips_cfg == cfg.replace(kernel_layout="strips")

    # every Dense kernel changed shape to (N/S, K, S) and holds the same numbers, and the tied embedding
    # (V, D) holds its transpose, the head's (D, V) kernel; other leaves kept
    width = few_row_matmul.strip_width(param_dtype)
    flat, flat_strips = jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(strips)
    changed = 0
    for (path, w), s in zip(flat, flat_strips, strict=True):
        name = jax.tree_util.keystr(path)
        if "kernel" in name or "token_embed" in name:
            w_np = np.asarray(w).T if "token_embed" in name else np.asarray(w)
            k = w_np.size // (s.shape[0] * width)
            assert s.shape[2] == width
            np.testing.assert_array_equal(np.asarray(s), _strips(w_np.reshape(k, -1), width))
            assert s.dtype == w.dtype
            changed += 1
        else:
            assert s is w
    assert changed == 7 * cfg.n_layers + 1

    tokens_BT = jnp.asarray(random_tokens(cfg.vocab_size, 3, 5, seed=2), jnp.int32)  # 15 rows: the kernel
    long_BT = jnp.asarray(random_tokens(cfg.vocab_size, 2, 40, seed=4), jnp.int32)  # 80 rows: a prefill
    for toks in (tokens_BT, long_BT):
        dense = jax.jit(lambda p, t: jaxllm.forward(cfg, p, t))(params, toks)
        got = jax.jit(lambda p, t: jaxllm.forward(strips_cfg, p, t))(strips, toks)
        np.testing.assert_allclose(np.asarray(got), np.asarray(dense), rtol=1e-5, atol=1e-5)

    prompts = [list(map(int, row)) for row in np.asarray(tokens_BT)]
    want = jaxllm.generate(cfg, params, prompts, max_new_tokens=12, ignore_eos=True)
    assert jaxllm.generate(strips_cfg, strips, prompts, max_new_tokens=12, ignore_eos=True) == want


def test_prepare_keeps_the_dense_layout_where_the_kernel_is_not_used() -> None:
    cfg = _small_llama()
    params = jaxllm.init_params(cfg, seed=0)
    xla_cfg = cfg.replace(few_row_matmul="xla")
    assert decode_layout.prepare(xla_cfg, params) == (xla_cfg, params)
    with cpu_kernels.off():
        assert decode_layout.prepare(cfg, params) == (cfg, params)
    # an output width (100) that is no multiple of 16 stays dense beside the strips of the others, as
    # does a vocabulary (300) that is none: the (V, D) table, read by the head's nk kernel
    odd_cfg = cfg.replace(d_ff=100)
    _, odd = decode_layout.prepare(odd_cfg, jaxllm.init_params(odd_cfg, seed=0))
    mlp = odd["blocks_0"]["mlp"]
    assert mlp["up"]["kernel"].shape == (128, 100) and mlp["down"]["kernel"].shape == (8, 100, 16)
    assert odd["token_embed"].shape == (300, 128)
    odd_strips_cfg, odd_strips = decode_layout.prepare(odd_cfg, odd_params := jaxllm.init_params(odd_cfg, seed=0))
    toks = jnp.asarray(random_tokens(300, 2, 5, seed=1), jnp.int32)
    np.testing.assert_allclose(
        np.asarray(jaxllm.forward(odd_strips_cfg, odd_strips, toks)),
        np.asarray(jaxllm.forward(odd_cfg, odd_params, toks)), rtol=1e-5, atol=1e-5,
    )  # fmt: skip


def test_the_strips_layout_is_never_saved_or_converted(tmp_path) -> None:
    cfg = _small_llama()
    strips_cfg, strips = decode_layout.prepare(cfg, jaxllm.init_params(cfg, seed=0))
    with pytest.raises(ConfigError, match="kernel_layout=strips is an inference-only layout"):
        jaxllm.save_params(tmp_path / "ckpt", strips_cfg, strips)
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ConfigError, match="kernel_layout=strips"):
        to_numpy_state_dict(strips_cfg, strips)
