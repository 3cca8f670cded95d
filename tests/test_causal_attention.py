"""The CPU training-attention kernel (jaxllm/kernels/causal_attention.cc): XLA's outputs and gradients,
when the model uses it, and a model's loss and gradients with it and without it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxllm
from jaxllm import causal_attention, cpu_kernels
from jaxllm.config import ModelConfig
from jaxllm.model import forward

from conftest import random_tokens, small_llama

pytestmark = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="the kernel library could not be built here (no C++ compiler?)"
)


def _xla(q, k, v, window: int):
    local = None if window == 0 else (window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=local, implementation="xla")


@pytest.mark.parametrize(
    ("b", "t", "n", "k", "h", "window"),
    [
        (2, 37, 4, 2, 32, 0),  # grouped-query, a length not a multiple of 16
        (3, 64, 6, 6, 16, 0),  # multi-head, whole key vectors
        (2, 70, 4, 1, 64, 7),  # one kv head, a sliding window shorter than a key vector
        (1, 1, 2, 2, 48, 0),  # one token
        (2, 33, 8, 2, 128, 20),  # the widest head, a window across key vectors
    ],
)
def test_kernel_matches_xla_values_and_gradients(b: int, t: int, n: int, k: int, h: int, window: int) -> None:
    rng = np.random.default_rng(t * 1000 + h)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, dtype=np.float32))  # noqa: E731
    q, kk, v, dout = normal(b, t, n, h), normal(b, t, k, h), normal(b, t, k, h), normal(b, t, n, h)
    got = jax.jit(causal_attention.attention, static_argnums=3)(q, kk, v, window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(_xla(q, kk, v, window)), rtol=2e-5, atol=2e-5)

    def grads(fn):
        return jax.jit(jax.grad(lambda q, kk, v: jnp.sum(fn(q, kk, v, window) * dout), argnums=(0, 1, 2)))(q, kk, v)

    for name, g, want in zip("qkv", grads(causal_attention.attention), grads(_xla), strict=True):
        atol = 2e-5 * float(jnp.max(jnp.abs(want))) + 1e-6
        np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=0, atol=atol, err_msg=f"d{name}")


def _uses_kernel(cfg: ModelConfig, params, tokens_BT, segment_ids_BT=None) -> bool:
    positions_BT = None if segment_ids_BT is None else jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)

    def loss(params):
        return jnp.mean(forward(cfg, params, tokens_BT, positions_BT, segment_ids_BT))

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    fwd, bwd = 'custom_call_target="CausalAttentionFwdF32"' in hlo, 'custom_call_target="CausalAttentionBwdF32"' in hlo
    assert fwd == bwd
    return fwd


def test_used_for_float32_unmasked_unsharded_auto_only() -> None:
    cfg = small_llama()
    params = jaxllm.init_params(cfg)
    tokens = jnp.asarray(random_tokens(cfg.vocab_size, 2, 16))
    assert _uses_kernel(cfg, params, tokens)
    assert _uses_kernel(cfg.replace(family="gpt", tie_embeddings=False), jaxllm.init_params(
        cfg.replace(family="gpt", tie_embeddings=False)), tokens)  # fmt: skip
    assert not _uses_kernel(cfg.replace(attention="xla"), params, tokens)
    assert not _uses_kernel(cfg.replace(dtype="bfloat16"), params, tokens)
    assert not _uses_kernel(cfg, params, tokens, segment_ids_BT=jnp.zeros_like(tokens))  # document masks: XLA
    with cpu_kernels.off():
        assert not _uses_kernel(cfg, params, tokens)
    with jax.set_mesh(Mesh(np.array(jax.devices()[:2]), ("data",))):
        assert not _uses_kernel(cfg, params, tokens)  # a sharded program keeps the partitioned XLA form
    assert not causal_attention.usable(80, jnp.float32, masked=False)  # a head dim it is not built for


@pytest.mark.parametrize("layers", ["unrolled", "scanned with remat"])
def test_model_loss_and_gradients_match_xla(layers: str) -> None:
    cfg = small_llama(sliding_window=5)
    if layers != "unrolled":
        cfg = cfg.replace(scan_layers=True, remat="full")  # the custom VJP inside nn.scan and jax.checkpoint
    params = jaxllm.init_params(cfg, 3)
    tokens = jnp.asarray(random_tokens(cfg.vocab_size, 3, 40))

    def loss_and_grads(c: ModelConfig):
        def loss(params):
            logits = forward(c, params, tokens[:, :-1])
            return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1))

        return jax.jit(jax.value_and_grad(loss))(params)

    (got_loss, got), (want_loss, want) = loss_and_grads(cfg), loss_and_grads(cfg.replace(attention="xla"))
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=0, atol=1e-5 * float(jnp.max(jnp.abs(w))) + 1e-9)
