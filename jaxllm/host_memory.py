"""Keep freed host memory in the process, so XLA's CPU runtime does not page-fault every step.

XLA's CPU runtime allocates each execution's temporaries as one buffer (72 MiB for `mini`'s
training step at batch 32 x 64) and frees it afterwards. glibc's malloc serves a block that large
with a fresh `mmap` and returns it with `munmap`, so every step touched every 4 KiB page of its
temporaries for the first time again: about 18,800 minor page faults per `mini` step, measured,
which were 40% of the step (42 ms -> 27 ms once gone; `benchmarks/speed.py` measures both).

`keep_freed_host_memory()` tells glibc to serve large blocks from the heap (`M_MMAP_MAX` 0), to
keep the freed heap top (`M_TRIM_THRESHOLD`), and to use one arena: a thread arena that cannot
hold a block above 64 MiB falls back to `mmap` whatever `M_MMAP_MAX` says, while the main arena
grows with `brk`. The cost: the process keeps its peak heap size rather than returning it to the
system. `mallopt` takes the trim threshold as an int, so a free heap top above 2 GiB (the larger
presets' steps) is still returned, and faulted in again, now and then.

Entry points call it before their first JAX work (JAX's threads then share the main arena): the JAX
CLI commands, the benchmarks, and the first import of `jaxllm.model`, which every JAX-backed part of
jaxllm imports (so `jaxllm.init_params`, `jaxllm.generate`… bring it). `import jaxllm`,
`jaxllm.config`, `jaxllm.data` and `torch_ref` do not. Set
`JAXLLM_MALLOC=system` to leave glibc's defaults alone. Elsewhere than glibc it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "JAXLLM_MALLOC"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -2, -4, -8  # glibc's <malloc.h>
_TOP_PAD = 64 << 20  # grow the heap in steps of 64 MiB, not one page at a time
_applied: bool | None = None


def keep_freed_host_memory() -> bool:
    """Apply the malloc settings above once per process; True when they are in force."""
    global _applied
    if _applied is None:
        _applied = _apply()
    return _applied


def _apply() -> bool:
    if os.environ.get(ENV, "keep") == "system" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, _TOP_PAD))
    return all(mallopt(param, value) == 1 for param, value in settings)
