"""The CPU decode-attention kernel (jaxllm/kernels/decode_attention.cc): the XLA form's outputs and cache
updates, when it is used, the cache updated in place in the decode loop, and a model's greedy tokens."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxllm
from jaxllm import cpu_kernels, decode_attention
from jaxllm.config import ModelConfig
from jaxllm.model import KVCache, cached_attention, forward_cached, init_cache
from jaxllm.request import Sampling, check_request
from jaxllm.sharding import mesh_of
from jaxllm.slots import decode_jit

from conftest import random_tokens, small_llama

pytestmark = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="the kernel library could not be built here (no C++ compiler?)"
)


def _xla_form(q, k, v, k_cache, v_cache, positions_BT, window):
    """The model's XLA path: scatter the new entries (dropped out of range), then `cached_attention`."""
    rows_B1 = jnp.arange(q.shape[0])[:, None]
    k_cache = k_cache.at[rows_B1, :, positions_BT].set(k.astype(k_cache.dtype), mode="drop")
    v_cache = v_cache.at[rows_B1, :, positions_BT].set(v.astype(v_cache.dtype), mode="drop")
    as_f32 = KVCache(k_cache.astype(jnp.float32), v_cache.astype(jnp.float32))
    return cached_attention(q, as_f32, positions_BT, window), k_cache, v_cache


def _check_against_the_xla_form(q, k_new, v_new, k_cache, v_cache, positions_BT, window) -> None:
    got = jax.jit(decode_attention.kernel, static_argnums=6)(q, k_new, v_new, k_cache, v_cache, positions_BT, window)
    want = _xla_form(q, k_new, v_new, k_cache, v_cache, positions_BT, window)
    seen_nothing = np.isnan(np.asarray(want[0]))  # past the cache beyond the window: NaN in the XLA form
    np.testing.assert_allclose(np.asarray(got[0]), np.where(seen_nothing, 0.0, want[0]), rtol=1e-5, atol=1e-5)
    for got_cache, want_cache in zip(got[1:], want[1:], strict=True):
        assert got_cache.dtype == want_cache.dtype
        np.testing.assert_array_equal(np.asarray(got_cache, np.float32), np.asarray(want_cache, np.float32))


def _normal(rng: np.random.Generator, *shape: int) -> jax.Array:
    return jnp.asarray(rng.standard_normal(shape, dtype=np.float32))


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize(("n", "k", "h"), [(9, 3, 64), (4, 4, 16), (8, 2, 128)])
def test_kernel_matches_the_xla_form(n: int, k: int, h: int, window: int | None, cache_dtype: str) -> None:
    b, s = 5, 23
    rng = np.random.default_rng(n * 100 + h)
    q, k_new, v_new = _normal(rng, b, 1, n, h), _normal(rng, b, 1, k, h), _normal(rng, b, 1, k, h)
    k_cache, v_cache = _normal(rng, b, k, s, h).astype(cache_dtype), _normal(rng, b, k, s, h).astype(cache_dtype)
    # the first entry, the middle, the last, and just past the cache (written nowhere, reads all)
    positions_BT = jnp.asarray([[0], [1], [11], [s - 1], [s]], jnp.int32)
    _check_against_the_xla_form(q, k_new, v_new, k_cache, v_cache, positions_BT, window)


@pytest.mark.parametrize("cache_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize(
    ("t", "n", "k", "h"), [(9, 9, 3, 64), (21, 6, 2, 32), (5, 8, 2, 128), (7, 4, 2, 80), (3, 2, 1, 160)]
)
def test_prefill_chunks_match_the_xla_form(
    t: int, n: int, k: int, h: int, window: int | None, cache_dtype: str
) -> None:
    # Several tokens a row (16 tokens a tile, a partial tile; head_dim 160 takes the one-token
    # path): all new entries are written before any token attends, each token to entries <= its own.
    b, s = 4, 40
    rng = np.random.default_rng(t * 1000 + n * 100 + h)
    q, k_new, v_new = _normal(rng, b, t, n, h), _normal(rng, b, t, k, h), _normal(rng, b, t, k, h)
    k_cache, v_cache = _normal(rng, b, k, s, h).astype(cache_dtype), _normal(rng, b, k, s, h).astype(cache_dtype)
    positions_BT = jnp.asarray(
        [
            np.arange(t),  # a first chunk
            17 + np.arange(t),  # a later one
            s - 3 + np.arange(t),  # running past the cache: dropped writes, those tokens read every entry
            rng.permutation(s)[:t],  # positions in no order
        ],
        jnp.int32,
    )
    _check_against_the_xla_form(q, k_new, v_new, k_cache, v_cache, positions_BT, window)


def _uses_kernel(cfg: ModelConfig, params, tokens_BT: jax.Array) -> bool:
    cache = init_cache(cfg, tokens_BT.shape[0], 16)
    positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
    step = lambda params, cache: forward_cached(cfg, params, tokens_BT, positions_BT, cache)  # noqa: E731
    return 'custom_call_target="DecodeAttention' in jax.jit(step).lower(params, cache).compile().as_text()


def test_used_unsharded_and_auto_only() -> None:
    cfg = small_llama()
    params = jaxllm.init_params(cfg)
    one, three = jnp.ones((2, 1), jnp.int32), jnp.ones((2, 3), jnp.int32)
    assert _uses_kernel(cfg, params, one)
    assert _uses_kernel(cfg, params, three)  # a prefill chunk
    assert not _uses_kernel(cfg.replace(decode_attention="xla"), params, one)
    assert _uses_kernel(cfg.replace(dtype="bfloat16"), params, one)  # a bfloat16 cache
    with cpu_kernels.off():
        assert not _uses_kernel(cfg, params, one)
    with jax.set_mesh(Mesh(np.array(jax.devices()[:2]), ("data",))):
        assert not _uses_kernel(cfg, params, one)  # a sharded program keeps the partitioned XLA form


def test_decode_loop_updates_the_cache_in_place() -> None:
    # The kernel's cache operands are aliased to its outputs: the compiled decode loop has no copy of a
    # cache-sized array (the XLA form's scatter made XLA copy each layer's cache every step).
    cfg = small_llama()
    params = jaxllm.init_params(cfg)
    req = check_request(cfg, [[5, 6, 7]], Sampling.make(None, {"max_new_tokens": 20, "ignore_eos": True}), None)
    from jaxllm.generation import _prefilled

    cfg2, _, state = _prefilled(cfg, params, req)
    hlo = decode_jit.lower(cfg2, params, state, np.int32(20), mesh_of(params)).compile().as_text()
    cache_shape = state.cache[0].k_BKSH.shape
    assert hlo.count('custom_call_target="DecodeAttentionF32"') == cfg.n_layers
    copied = re.findall(r"= f32\[([\d,]+)\]\{[\d,]+\} copy\(", hlo)
    assert ",".join(map(str, cache_shape)) not in copied, copied


@pytest.mark.parametrize("window", [None, 5])
def test_greedy_tokens_unchanged_by_the_kernel(window: int | None) -> None:
    cfg = small_llama(sliding_window=window)
    params = jaxllm.init_params(cfg, seed=3)
    prompts = [list(map(int, row)) for row in random_tokens(cfg.vocab_size, 3, 6, seed=2)]
    prompts[1] = prompts[1][:2]  # rows at different positions
    got = jaxllm.generate(cfg, params, prompts, max_new_tokens=20, ignore_eos=True)
    want = jaxllm.generate(cfg.replace(decode_attention="xla"), params, prompts, max_new_tokens=20, ignore_eos=True)
    assert got == want


def test_bfloat16_cache_logits_close_to_the_xla_form() -> None:
    cfg = small_llama(dtype="bfloat16")
    params = jaxllm.init_params(cfg, seed=1)
    tokens_BT = jnp.asarray(random_tokens(cfg.vocab_size, 2, 9, seed=4), jnp.int32)

    def last_logits(c: ModelConfig) -> np.ndarray:
        cache = init_cache(c, 2, 16)
        positions_BT = jnp.broadcast_to(jnp.arange(8), (2, 8))
        _, cache = forward_cached(c, params, tokens_BT[:, :8], positions_BT, cache)  # prefill: XLA form
        logits, _ = jax.jit(forward_cached, static_argnums=0)(
            c, params, tokens_BT[:, 8:], positions_BT[:, :1] + 8, cache
        )
        return np.asarray(logits)

    np.testing.assert_allclose(last_logits(cfg), last_logits(cfg.replace(decode_attention="xla")), atol=3e-2)
