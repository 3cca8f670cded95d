"""jaxllm's own CPU kernels (`jaxllm/kernels/*.cc`, XLA FFI custom calls): their build, cache and gates.

Four kernels serve where XLA's generic code leaves time on the table on the CPU, and a fifth measures:
- `few_row_matmul`: a decode step's matmuls of a few rows (one per sequence), each weight read once;
- `decode_attention`: a decode step's attention, reading only the visible cache entries and updating
  the cache in place;
- `causal_attention`: a training window's attention, forward and backward, without materialising the
  (B, N, T, T) scores;
- `weight_grad`: a Dense layer's weight gradient in training (`x.T @ dy`, which XLA gives to Eigen);
- `stream_sum`: the sum of an array read on every kernel thread, the memory read-bandwidth probe of the
  decode benchmarks' roofline.

The sources build into one library, compiled on first use with the host's C++ compiler (`$CXX`, else
`g++`; a few seconds) for this CPU (`-march=native`) and cached in `~/.cache/jaxllm/kernels`
(`$XDG_CACHE_HOME`) under a key of the sources, the jaxlib version, the compiler and the CPU's feature
flags. Without a compiler jaxllm logs one warning and keeps XLA's ops. `JAXLLM_CPU_KERNELS=0` turns
every kernel off in the whole process (no build is tried).

`active()` is the gate the kernels share, decided at trace time: the default backend is the CPU, the
program is not sharded over several devices (no mesh of more than one device is set with
`jax.set_mesh`, and no caller said so with `off()`: a custom call has no sharding rule, so XLA would
gather its operands to every device), and the library is built.
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

import jax

log = logging.getLogger(__name__)

FOLDER = Path(__file__).parent / "kernels"
KERNELS = ("few_row_matmul", "decode_attention", "causal_attention", "weight_grad", "stream_sum")
SOURCES = tuple(FOLDER / f"{n}.cc" for n in KERNELS)
HEADERS = (FOLDER / "cpu_kernels.h",)
SWITCH = "JAXLLM_CPU_KERNELS"

_loaded: dict[Path, ctypes.CDLL] = {}  # libraries loaded in this process, by path
_registered: set[str] = set()  # FFI targets registered with XLA in this process (once each)
_off: contextvars.ContextVar[bool] = contextvars.ContextVar("cpu_kernels_off", default=False)


@contextlib.contextmanager
def off(flag: bool = True) -> Iterator[None]:
    """While tracing within it, the kernels are not used (when `flag`): e.g. for a program whose
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
    """Compile SOURCES into `out` (through a temporary name in the same folder, then renamed)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        cmd = [compiler, "-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w"]
        cmd += ["-I", jax.ffi.include_dir(), *map(str, SOURCES), "-o", tmp]
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _compiler() -> str:
    return os.environ.get("CXX", "g++")


def build_key() -> str:
    """What the library is built from: its sources, jaxlib's version, the compiler and the CPU's flags."""
    import jaxlib

    texts = [p.read_text() for p in (*SOURCES, *HEADERS)]
    parts = (*texts, jaxlib.__version__, _compiler(), _cpu_flags())
    return hashlib.sha256(b"\0".join(x.encode() for x in parts)).hexdigest()[:16]


@functools.cache
def library() -> Path | None:
    """The kernel library, built on first use and loaded; None (one warning logged) when it is switched
    off or cannot be built."""
    if os.environ.get(SWITCH, "1") == "0":
        return None
    compiler = _compiler()
    if shutil.which(compiler) is None:
        log.warning("jaxllm's CPU kernels not built: no C++ compiler %r (set CXX); using XLA's ops", compiler)
        return None
    path = cache_dir() / f"cpu_kernels-{build_key()}.so"
    if not path.exists():
        try:
            _build(compiler, path)
        except (OSError, subprocess.SubprocessError) as e:
            detail = getattr(e, "stderr", None) or str(e)
            log.warning("jaxllm's CPU kernels not built (%s); using XLA's ops", detail.strip()[-500:])
            return None
    try:
        _loaded[path] = ctypes.CDLL(str(path))
    except OSError as e:  # e.g. a damaged file in the cache: delete it and it is rebuilt
        log.warning("jaxllm's CPU kernels %s not loaded (%s); using XLA's ops", path, e)
        return None
    return path


def target(name: str) -> str:
    """`name`, an FFI target of the library, registered with XLA (once per process), for
    `jax.ffi.ffi_call`; `RuntimeError` when the library is not available."""
    path = library()
    if path is None:
        raise RuntimeError(f"jaxllm's CPU kernels are not available (switched off by {SWITCH}=0, or not built)")
    if name not in _registered:
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(_loaded[path], name)), platform="cpu")
        _registered.add(name)
    return name


def _single_device_program() -> bool:
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def active() -> bool:
    """Whether the kernels may be used in the program being traced (see the module docstring)."""
    return not _off.get() and jax.default_backend() == "cpu" and _single_device_program() and library() is not None
