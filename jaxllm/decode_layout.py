"""The inference-only "strips" layout of a model's Dense kernels, read by the CPU decode kernel.

A decode step reads every weight once. The few-row kernel (`jaxllm.few_row_matmul`) walks a (K, N)
kernel in strips of S columns (64 bytes: 16 float32 or 32 bfloat16); stored as trained, a strip's
rows lie N * 4 bytes apart, so its reads jump to a new page every row and the hardware prefetchers
cannot follow them. `prepare` copies each Dense kernel with a multiple of S outputs into (N/S, K, S),
every strip one contiguous block, on huge pages where the OS grants them (`madvise`), as it does a tied
`token_embed` (V, D) taken as the output head's (D, V) kernel (`jaxllm.model.embed_in_strips`), and sets
`model.kernel_layout="strips"`, which the model's Dense layers read (decode steps and prefill chunks
alike: the kernel takes any number of rows in this layout).

`jaxllm generate` and `jaxllm serve` call it on the CPU. It returns its input unchanged where the
kernel is not used: another backend, a sharded model, `model.few_row_matmul=xla`, scanned layers,
or `JAXLLM_CPU_KERNELS=0`. The layout is for inference only: `save_params` refuses it.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Sequence

import jax
import numpy as np

from jaxllm import cpu_kernels
from jaxllm.config import ModelConfig
from jaxllm.errors import ConfigError
from jaxllm.few_row_matmul import strip_width
from jaxllm.model import Params, abstract_params

HUGE_PAGE = 2 << 20  # bytes: the arena starts on a huge-page boundary
ALIGN = 4096  # bytes: each kernel starts on a page


def applies(cfg: ModelConfig, params: Params) -> bool:
    """Whether `prepare` would change `params`: dense kernels that the CPU kernel would read."""
    from jaxllm.sharding import mesh_of

    return (
        cfg.kernel_layout == "dense"
        and cfg.few_row_matmul == "auto"
        and not cfg.scan_layers
        and mesh_of(params) is None
        and cpu_kernels.active()
    )


def prepare(cfg: ModelConfig, params: Params) -> tuple[ModelConfig, Params]:
    """(cfg with `kernel_layout="strips"`, params with the eligible Dense kernels in strips); or the
    inputs unchanged where the layout does not apply (`applies`). The other leaves are kept as they are."""
    if not applies(cfg, params):
        return cfg, params
    strips_cfg = cfg.replace(kernel_layout="strips")
    target = abstract_params(strips_cfg)
    pairs = zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(target), strict=True)
    # t: (N/S, K, S); a tied token_embed (V, D) is the head's E^T, (D, V), in strips
    changed = [
        (w, w.T if path[-1].key == "token_embed" else w, t.shape[1]) for (path, w), t in pairs if w.shape != t.shape
    ]
    packed = dict(zip((id(w) for w, _, _ in changed), to_strips([(k, n) for _, k, n in changed]), strict=True))
    return strips_cfg, jax.tree.map(lambda w: packed.get(id(w), w), params)


def to_strips(kernels: Sequence[tuple[jax.Array, int]]) -> list[jax.Array]:
    """(kernel, K) pairs, each kernel a (K, N) matrix (its leading axes holding the K inputs, N a
    multiple of S = `strip_width(dtype)`), as (N/S, K, S) strips on the kernel's device, all in one
    huge-page arena of host memory (on the CPU, the arrays use it without a copy)."""
    arena = _arena(sum(_padded(w.shape, w.dtype) for w, _ in kernels))
    out, offset = [], 0
    for w, k in kernels:
        w_np = np.asarray(w).reshape(k, -1)
        n, s = w_np.shape[1], strip_width(w_np.dtype)
        view = arena[offset : offset + w_np.nbytes].view(w_np.dtype).reshape(n // s, k, s)
        view[...] = w_np.reshape(k, n // s, s).transpose(1, 0, 2)
        out.append(jax.device_put(view, w.sharding))
        offset += _padded(w.shape, w.dtype)
    return out


def require_dense(cfg: ModelConfig, action: str) -> None:
    """ConfigError unless `cfg`'s kernels are in the layout they are trained and saved in."""
    if cfg.kernel_layout != "dense":
        raise ConfigError(
            f"model.kernel_layout={cfg.kernel_layout} is an inference-only layout (jaxllm.decode_layout): "
            f"params in it are not {action}; use the params as loaded"
        )


def _padded(shape: tuple[int, ...], dtype: np.dtype) -> int:
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    return -(-nbytes // ALIGN) * ALIGN


def _arena(nbytes: int) -> np.ndarray:
    """`nbytes` of zeroed anonymous memory starting on a huge-page boundary, advised for huge pages."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        with contextlib.suppress(OSError):  # transparent huge pages off: ordinary pages, the same numbers
            region.madvise(mmap.MADV_HUGEPAGE)
    raw = np.frombuffer(region, np.uint8)
    start = -raw.ctypes.data % HUGE_PAGE
    return raw[start : start + nbytes]
