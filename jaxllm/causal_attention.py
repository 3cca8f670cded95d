"""Causal self-attention of a training window on the CPU: jaxllm's own kernel, forward and backward.

XLA's form (`jax.nn.dot_product_attention`) runs a window's attention as batched dots of tiny
matrices with the softmax and its gradient as separate passes over the (B, N, T, T) scores; on the
2-core Xeon this was twice PyTorch's flash attention in `mini`'s training step.
`kernels/causal_attention.cc` (XLA FFI custom calls) does one (batch row, kv head) per task, tiles
of query rows sharing each key and value loaded, without storing the scores; it saves the softmax's
log-sum-exp for the backward pass, which recomputes the probabilities from it and walks blocks of
keys, as flash attention does (docs/train.md, "CPU training attention").

The model calls `attention` when all of these hold at trace time, and XLA's form otherwise (the same
math, float32):
- `model.attention` is "auto" (the default; "xla" or "cudnn" name XLA's implementations);
- `jaxllm.cpu_kernels.active()`: the CPU backend, a program not sharded over several devices, and the
  kernel library built;
- `usable`: float32 computation, head_dim 16, 32, 48, 64 or 128, no document mask.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import cpu_kernels

HEAD_DIMS = (16, 32, 48, 64, 128)  # the head dims the kernel is built for


def usable(head_dim: int, dtype: Any, masked: bool) -> bool:
    """Whether the model's training attention runs the kernel (decided at trace time)."""
    return not masked and head_dim in HEAD_DIMS and jnp.dtype(dtype) == jnp.float32 and cpu_kernels.active()


def _forward(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, window: int) -> tuple[jax.Array, jax.Array]:
    b, t, n, _ = q_BTNH.shape
    outs = (jax.ShapeDtypeStruct(q_BTNH.shape, jnp.float32), jax.ShapeDtypeStruct((b, n, t), jnp.float32))
    call = jax.ffi.ffi_call(cpu_kernels.target("CausalAttentionFwdF32"), outs)
    return call(q_BTNH, k_BTKH, v_BTKH, window=np.int64(window))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def attention(q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, window: int = 0) -> jax.Array:
    """softmax(q kᵀ / sqrt(H)) v over the keys j with t - window < j <= t (window 0: every earlier
    key), query head n reading kv head n // (N / K). float32 (B, T, N, H) and (B, T, K, H) operands."""
    return _forward(q_BTNH, k_BTKH, v_BTKH, window)[0]


def _attention_fwd(
    q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, window: int
) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    o_BTNH, lse_BNT = _forward(q_BTNH, k_BTKH, v_BTKH, window)
    return o_BTNH, (q_BTNH, k_BTKH, v_BTKH, o_BTNH, lse_BNT)


def _attention_bwd(window: int, res: tuple[jax.Array, ...], do_BTNH: jax.Array) -> tuple[jax.Array, ...]:
    q_BTNH, k_BTKH, v_BTKH, _, _ = res
    outs = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q_BTNH, k_BTKH, v_BTKH))
    call = jax.ffi.ffi_call(cpu_kernels.target("CausalAttentionBwdF32"), outs)
    return call(*res, do_BTNH.astype(jnp.float32), window=np.int64(window))


attention.defvjp(_attention_fwd, _attention_bwd)
