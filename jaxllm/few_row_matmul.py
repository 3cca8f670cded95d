"""A decode step's matmuls on the CPU: jaxllm's own few-row kernel instead of XLA's dot.

XLA's CPU dots are built for many rows. A decode step multiplies a few rows (one per sequence) by
every weight, and there XLA's time grows with the rows although each weight is read once:
8 rows cost 2.4x one row (`python -m benchmarks.decode_matmul`). `kernels/few_row_matmul.cc`, an
XLA FFI custom call, reads each weight once and reuses it across the rows from registers; it reads
bfloat16 weights directly (half the bytes), widening them to float32 as it loads.

`matmul` is what the model's Dense layers and tied output head call. It uses the kernel when all of
these hold at trace time, and XLA's dot otherwise (the same math; float32 sums in either):
- `model.few_row_matmul` is "auto" (the default; "xla" turns it off for that model);
- the default backend is the CPU, and the kernel library is built (below);
- x has at most `MAX_ROWS` rows, the computation dtype is float32 or bfloat16 (but one row times a
  float32 (K, N) weight stays on XLA's dot: it reads the weights as fast there);
- the program is not sharded over several devices: no mesh of more than one device is set
  (`jax.set_mesh`), and no caller said so with `off()` (the decode loop does when its params are
  sharded). A custom call has no sharding rule: XLA would gather its operands to every device.
Gradients are XLA dots (a custom VJP), so a model that uses the kernel is still differentiable.

The library is compiled on first use with the host's C++ compiler (`$CXX`, else `g++`; a few seconds)
for this CPU (`-march=native`) and cached in `~/.cache/jaxllm/kernels` (`$XDG_CACHE_HOME`) under a
key of the source, the jaxlib version, the compiler and the CPU's feature flags. Without a compiler
jaxllm logs one warning and keeps XLA's dots. `JAXLLM_FEW_ROW_MATMUL=0` turns the kernel off in the
whole process (no build is tried).
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

log = logging.getLogger(__name__)

MAX_ROWS = 32  # measured faster than XLA at 1, 8 and 32 rows (benchmarks/decode_matmul.py)
SOURCE = Path(__file__).parent / "kernels" / "few_row_matmul.cc"
SWITCH = "JAXLLM_FEW_ROW_MATMUL"
TARGETS = {  # (weight layout transposed, weight dtype) -> FFI target
    (False, "float32"): "FewRowMatmulKnF32",
    (True, "float32"): "FewRowMatmulNkF32",
    (False, "bfloat16"): "FewRowMatmulKnBf16",
    (True, "bfloat16"): "FewRowMatmulNkBf16",
}

_registered: set[str] = set()  # FFI targets registered with XLA in this process (once each)
_off: contextvars.ContextVar[bool] = contextvars.ContextVar("few_row_matmul_off", default=False)


@contextlib.contextmanager
def off(flag: bool = True) -> Iterator[None]:
    """While tracing within it, `matmul` uses XLA's dot (when `flag`): e.g. for a program whose
    params are sharded over devices without a mesh set. It acts when a function is traced: a jitted
    function keeps whichever choice its first trace made, so make it depend on a static argument."""
    token = _off.set(flag or _off.get())
    try:
        yield
    finally:
        _off.reset(token)


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxllm" / "kernels"


def _cpu_flags() -> str:
    """The CPU's feature flags: a library built with -march=native runs only where they match."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    return platform.machine() + platform.processor()


def _build(compiler: str, out: Path) -> None:
    """Compile SOURCE into `out` (through a temporary name in the same folder, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
        cmd += ["-I", jax.ffi.include_dir(), str(SOURCE), "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


@functools.cache
def library() -> Path | None:
    """The kernel library, built on first use and registered with XLA; None (one warning logged) when
    it is switched off or cannot be built."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    compiler = os.environ.get("CXX", "g++")
    if shutil.which(compiler) is None:
        log.warning("few-row matmul kernel not built: no C++ compiler %r (set CXX); using XLA's dots", compiler)
        return None
    import jaxlib

    key = hashlib.sha256(
        b"\0".join(x.encode() for x in (SOURCE.read_text(), jaxlib.__version__, compiler, _cpu_flags()))
    ).hexdigest()[:16]
    path = cache_dir() / f"few_row_matmul-{key}.so"
    if not path.exists():
        try:
            _build(compiler, path)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            log.warning("few-row matmul kernel not built (%s); using XLA's dots", detail.strip()[-500:])
            return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:  # e.g. a damaged file in the cache: delete it and it is rebuilt
        log.warning("few-row matmul kernel %s not loaded (%s); using XLA's dots", path, e)
        return None
    for target in set(TARGETS.values()) - _registered:
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, target)), platform="cpu")
        _registered.add(target)
    return path


def _single_device_program() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def usable(rows: int, dtype: Any, w_dtype: Any, transposed: bool) -> bool:
    """Whether `matmul` of `rows` rows, in computation dtype `dtype`, with weights of `w_dtype`
    ((N, K) when `transposed`), runs the kernel (decided at trace time)."""
    one_f32_row = rows == 1 and not transposed and jnp.dtype(dtype) == jnp.float32 == jnp.dtype(w_dtype)
    return (
        rows <= MAX_ROWS
        and not one_f32_row  # one row times float32 (K, N) weights: XLA's dot is as fast
        and jnp.dtype(dtype) in (jnp.float32, jnp.bfloat16)
        and not _off.get()
        and jax.default_backend() == "cpu"
        and _single_device_program()
        and library() is not None
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def kernel(x_MK: jax.Array, w: jax.Array, transposed: bool) -> jax.Array:
    n = w.shape[0] if transposed else w.shape[1]
    out = jax.ShapeDtypeStruct((x_MK.shape[0], n), jnp.float32)
    call = jax.ffi.ffi_call(TARGETS[transposed, jnp.dtype(w.dtype).name], out)
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
    if not (enabled and usable(x_MK.shape[0], dtype, w.dtype, transposed)):
        w_cast = w.astype(dtype)
        return x_MK.astype(dtype) @ (w_cast.T if transposed else w_cast)
    w_in = w.astype(jnp.bfloat16) if jnp.dtype(dtype) == jnp.bfloat16 else w  # float32 or bfloat16
    if jnp.dtype(w_in.dtype) not in (jnp.float32, jnp.bfloat16):
        w_in = w_in.astype(jnp.float32)
    x_f32 = x_MK.astype(dtype).astype(jnp.float32)
    return kernel(x_f32, w_in, transposed).astype(dtype)
