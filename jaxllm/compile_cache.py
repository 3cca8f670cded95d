"""A persistent cache of compiled XLA programs for jaxllm's commands (`train`, `generate`, `serve`, `eval`).

JAX's own cache (`jax_compilation_cache_dir`): a program compiled once is read back from disk by the
next process that compiles the same program (same HLO, compile options, XLA flags, jax/jaxlib and
backend). On the 2-core AMD EPYC, `jaxllm generate` on SmolLM2-135M compiled for 5.5 s in its first
run and 1.4 s in the next (11.3 -> 5.7 s from the shell prompt to the answer). The folder is keyed by
jaxllm's CPU kernels too (`cpu_kernels.build_key`), whose library a cached program calls by name.

Where: `$JAXLLM_COMPILE_CACHE`, else `~/.cache/jaxllm/xla` (`$XDG_CACHE_HOME`); `JAXLLM_COMPILE_CACHE=off`
turns it off, and a cache folder already given to JAX (`JAX_COMPILATION_CACHE_DIR`) is left as it is. At
most `MAX_BYTES`, the least recently used programs dropped first; that bookkeeping takes a file lock
(the `filelock` package), so processes sharing the folder never read a half-written entry: without
`filelock` there is no cache.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import jax

from jaxllm import cpu_kernels

SWITCH = "JAXLLM_COMPILE_CACHE"
MAX_BYTES = 4 << 30


def folder() -> Path | None:
    """Where this process's programs are cached; None when the cache is off."""
    where = os.environ.get(SWITCH, "")
    if where.lower() in ("off", "0", "false", "no"):
        return None
    base = Path(where) if where else cpu_kernels.cache_dir().parent / "xla"
    return base / f"kernels-{cpu_kernels.build_key()}"


def enable() -> Path | None:
    """Turn the cache on for this process (before its first compilation); the folder, or None."""
    if jax.config.jax_compilation_cache_dir or importlib.util.find_spec("filelock") is None:
        return None
    path = folder()
    if path is not None:
        jax.config.update("jax_compilation_cache_dir", str(path))
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
