"""A decode step's matmuls on the CPU: jaxllm's own few-row kernel instead of XLA's dot.

XLA's CPU dots are built for many rows. A decode step multiplies a few rows (one per sequence) by
every weight, and there XLA's time grows with the rows although each weight is read once:
8 rows cost 2.4x one row (`python -m benchmarks.decode_matmul`). `kernels/few_row_matmul.cc`, an
XLA FFI custom call, reads each weight once and reuses it across the rows from registers; it reads
bfloat16 weights directly (half the bytes), widening them to float32 as it loads.

`matmul` is what the model's Dense layers and tied output head call. It uses the kernel when all of
these hold at trace time, and XLA's dot otherwise (the same math; float32 sums in either):
- `model.few_row_matmul` is "auto" (the default; "xla" turns it off for that model);
- `jaxllm.cpu_kernels.active()`: the CPU backend, a program not sharded over several devices, and
  the kernel library built;
- x has at most `MAX_ROWS` rows, and the computation dtype is float32 or bfloat16.
Gradients are XLA dots (a custom VJP), so a model that uses the kernel is still differentiable.

`matmul_strips` takes a kernel in the inference-only "strips" layout (`jaxllm.decode_layout`):
(N/S, K, S), each strip of S columns of W stored contiguously, S = `strip_width(dtype)` (a 64-byte
row: 16 float32 or 32 bfloat16 columns). Any number of rows runs the kernel's strip loop: a strip is
a GEMM's packed panel, and from 8 float32 rows on the loop reads two strips at a time, which keeps
it level with or ahead of XLA's dot on the dense kernel at prefill sizes too (64 to 512 rows: 480-500
against 390-500 GFLOP/s on two AMD EPYC cores). With the kernel unusable: an XLA dot on the strips
unpacked in the graph (a copy of the weights per call, which XLA does not hoist out of the prefill's
chunk loop).

Training on the CPU: a float32 matmul of more rows than `MAX_ROWS` keeps XLA's dot, but its weight
gradient (`x.T @ dy`, which XLA hands to Eigen) runs `kernels/weight_grad.cc` (`dense`, a custom VJP;
docs/train.md, "CPU training weight gradients").

The kernel is built with the others of `jaxllm/kernels` (`jaxllm.cpu_kernels`: build, cache, and the
shared gate, `active()`).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm import cpu_kernels

DENSE_OUTPUT = "few_row_matmul.dense"  # `dense`'s output, as `jax.ad_checkpoint.checkpoint_name` tags it
MAX_ROWS = 32  # kn/nk layouts: measured faster than XLA at 1, 8 and 32 rows (benchmarks/decode_matmul.py)
TARGETS = {  # (weight layout transposed, weight dtype) -> FFI target
    (False, "float32"): "FewRowMatmulKnF32",
    (True, "float32"): "FewRowMatmulNkF32",
    (False, "bfloat16"): "FewRowMatmulKnBf16",
    (True, "bfloat16"): "FewRowMatmulNkBf16",
}
STRIP_BYTES = 64  # bytes per row of a strip of the "strips" layout: one cache line
STRIP_TARGETS = {"float32": "FewRowMatmulStripsF32", "bfloat16": "FewRowMatmulStripsBf16"}


def strip_width(dtype: Any) -> int:
    """Columns per strip of the "strips" layout for weights of `dtype`: 16 float32, 32 bfloat16."""
    return STRIP_BYTES // jnp.dtype(dtype).itemsize


def usable(rows: int | None, dtype: Any) -> bool:
    """Whether `matmul` of `rows` rows in computation dtype `dtype` runs the kernel (decided at trace
    time); `rows` None: `matmul_strips`, which takes any number."""
    few = rows is None or rows <= MAX_ROWS
    return few and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16) and cpu_kernels.active()


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def kernel(x_MK: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    n = w.shape[0] if transposed else w.shape[1]
    out = jax.ShapeDtypeStruct((x_MK.shape[0], n), jnp.float32)
    call = jax.ffi.ffi_call(cpu_kernels.target(TARGETS[transposed, jnp.dtype(w.dtype).name]), out)
    return call(x_MK, w)


def _kernel_fwd(x_MK: jax.Array, w: jax.Array, transposed: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return kernel(x_MK, w, transposed), (x_MK, w)


def _kernel_bwd(transposed: bool, res: tuple[jax.Array, jax.Array], dy_MN: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_MK, w = res
    w_f32 = w.astype(jnp.float32)
    dx_MK = dy_MN @ (w_f32 if transposed else w_f32.T)
    dw = dy_MN.T @ x_MK if transposed else x_MK.T @ dy_MN
    return dx_MK, dw.astype(w.dtype)


kernel.defvjp(_kernel_fwd, _kernel_bwd)


def matmul(x_MK: jax.Array, w: jax.Array, dtype: Any, transposed: bool = False, enabled: bool = True) -> jax.Array:
    """x_MK @ w (w is (K, N)), or x_MK @ w.T with `transposed` (w is (N, K)), computed in `dtype`:
    both operands are cast to it, as XLA's dot would take them; the result has it too. `enabled`
    False (`model.few_row_matmul=xla`): always XLA's dot."""
    if not (enabled and usable(x_MK.shape[0], dtype)):
        if enabled and weight_grad_usable(x_MK, w, dtype):  # named: remat=save_dots saves it as a dot's output
            return checkpoint_name(dense(x_MK, w, transposed), DENSE_OUTPUT)
        w_cast = w.astype(dtype)
        return x_MK.astype(dtype) @ (w_cast.T if transposed else w_cast)
    x_f32, w_in = _kernel_operands(x_MK, w, dtype)
    return kernel(x_f32, w_in, transposed).astype(dtype)


def _kernel_operands(x_MK: jax.Array, w: jax.Array, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """(x rounded to `dtype` and held in float32, w in float32 or bfloat16) as the kernels take them:
    the numbers XLA's dot would multiply in `dtype`, with float32 sums."""
    w_in = w.astype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else w
    if jnp.dtype(w_in.dtype) not in (jnp.float32, jnp.bfloat16):
        w_in = w_in.astype(jnp.float32)
    return x_MK.astype(dtype).astype(jnp.float32), w_in


def matmul_strips(x_MK: jax.Array, w_SKC: jax.Array, dtype: Any, enabled: bool = True) -> jax.Array:
    """x_MK @ W computed in `dtype`, for W (K, N) given as strips w_SKC (N/S, K, S): w_SKC[s, k, c] =
    W[k, S s + c]. Inference only (no gradient through the kernel)."""
    s, _, c = w_SKC.shape
    if not (enabled and usable(None, dtype)):
        y_MSC = jnp.einsum("mk,skc->msc", x_MK.astype(dtype), w_SKC.astype(dtype))
        return y_MSC.reshape(x_MK.shape[0], s * c)
    x_f32, w_in = _kernel_operands(x_MK, w_SKC, dtype)
    out = jax.ShapeDtypeStruct((x_MK.shape[0], s * c), jnp.float32)
    call = jax.ffi.ffi_call(cpu_kernels.target(STRIP_TARGETS[jnp.dtype(w_in.dtype).name]), out)
    return call(x_f32, w_in).astype(dtype)


def weight_grad_usable(x_MK: jax.Array, w: jax.Array, dtype: Any) -> bool:
    """Whether `dense` (XLA's dot forward, jaxllm's weight-gradient kernel backward) serves a matmul
    of many rows: float32 throughout, and `cpu_kernels.active()`."""
    f32 = jnp.float32
    return jnp.dtype(dtype) == f32 and x_MK.dtype == f32 and w.dtype == f32 and cpu_kernels.active()


def weight_grad(x_MK: jax.Array, dy_MN: jax.Array) -> jax.Array:
    """x_MK.T @ dy_MN (K, N), float32, by `kernels/weight_grad.cc`: a Dense layer's weight gradient,
    which XLA's CPU backend hands to Eigen (it splits that dot poorly over the cores)."""
    out = jax.ShapeDtypeStruct((x_MK.shape[1], dy_MN.shape[1]), jnp.float32)
    return jax.ffi.ffi_call(cpu_kernels.target("WeightGradF32"), out)(x_MK, dy_MN)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def dense(x_MK: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    """x_MK @ w (or @ w.T with `transposed`: w is (N, K)) by XLA's dot, float32; its weight gradient
    by `weight_grad` (training on the CPU; see `weight_grad_usable`)."""
    return x_MK @ (w.T if transposed else w)


def _dense_fwd(x_MK: jax.Array, w: jax.Array, transposed: bool) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    return dense(x_MK, w, transposed), (x_MK, w)


def _dense_bwd(transposed: bool, res: tuple[jax.Array, jax.Array], dy_MN: jax.Array) -> tuple[jax.Array, jax.Array]:
    x_MK, w = res
    dx_MK = dy_MN @ (w if transposed else w.T)
    dw = weight_grad(dy_MN, x_MK) if transposed else weight_grad(x_MK, dy_MN)
    return dx_MK, dw


dense.defvjp(_dense_fwd, _dense_bwd)
