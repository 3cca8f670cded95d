"""Cached attention on the CPU (decode steps and prefill chunks): jaxllm's own kernel, its cache updated in place.

The XLA form of cached attention (`jaxllm.model.cached_attention`) reads and masks every entry of
the cache, so a step's cost grows with the cache length, not with the tokens written (a prefill in
64-token chunks into a 1,024-entry cache did 4x the work of its causal attention); and inside a
decode loop XLA copies each layer's cache around its update. `kernels/decode_attention.cc`, an XLA
FFI custom call, writes the new keys and values at their positions and attends to the visible
entries only, with the cache operands aliased to its outputs (updated in place).

The model's cached path calls `kernel` when all of these hold at trace time, and the XLA form
otherwise (the same math: float32 scores and softmax):
- `model.decode_attention` is "auto" (the default; "xla" turns it off for that model);
- `jaxllm.cpu_kernels.active()`: the CPU backend, a program not sharded over several devices, and
  the kernel library built;
- `usable`: head_dim a multiple of 16, and the cache in float32 or bfloat16.
One token a row (a decode step) or several (a chunk of a prefill: 16 tokens attend at once, see the
kernel's comments).
The kernel has no gradient: the cached path is for inference.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import cpu_kernels

TARGETS = {"float32": "DecodeAttentionF32", "bfloat16": "DecodeAttentionBf16"}  # cache dtype -> FFI target


def usable(head_dim: int, cache_dtype: Any) -> bool:
    """Whether the model's cached path runs the kernel for these shapes (decided at trace time)."""
    return head_dim % 16 == 0 and jnp.dtype(cache_dtype).name in TARGETS and cpu_kernels.active()


def kernel(
    q_BTNH: jax.Array,
    k_BTKH: jax.Array,
    v_BTKH: jax.Array,
    k_cache_BKSH: jax.Array,
    v_cache_BKSH: jax.Array,
    positions_BT: jax.Array,
    sliding_window: int | None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(float32 attention output (B, T, N, H), updated key cache, updated value cache): each row's new
    keys/values written at its positions (dropped outside the cache), then each query attends to the
    entries at positions <= its own (> its own - `sliding_window`, if given). The caches are updated
    in place when XLA can donate them (inside a jitted loop)."""
    outs = (
        jax.ShapeDtypeStruct(q_BTNH.shape, jnp.float32),
        jax.ShapeDtypeStruct(k_cache_BKSH.shape, k_cache_BKSH.dtype),
        jax.ShapeDtypeStruct(v_cache_BKSH.shape, v_cache_BKSH.dtype),
    )
    name = cpu_kernels.target(TARGETS[jnp.dtype(k_cache_BKSH.dtype).name])
    call = jax.ffi.ffi_call(name, outs, input_output_aliases={3: 1, 4: 2})
    f32 = [x.astype(jnp.float32) for x in (q_BTNH, k_BTKH, v_BTKH)]
    return call(*f32, k_cache_BKSH, v_cache_BKSH, positions_BT.astype(jnp.int32), window=np.int64(sliding_window or 0))
