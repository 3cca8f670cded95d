"""The host allocator settings: a `mini` training gradient stops page-faulting its temporaries."""

import json
import os
import subprocess
import sys

import pytest

from jaxllm.host_memory import ENV, keep_freed_host_memory

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or os.confstr("CS_GNU_LIBC_VERSION") is None,
    reason="the settings are glibc's (Linux)",
)

# One device and mini's real shapes (batch 32 x 64): XLA's temporaries for this gradient are
# about 72 MiB, above glibc's largest mmap threshold (32 MiB).
FAULTS_PER_STEP = """
import json, resource
import jaxllm, jax, jax.numpy as jnp, numpy as np
from jaxllm.config import Config
from jaxllm.train_step import loss_fn
cfg = Config.load("mini").model
batch = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (32, cfg.context_length + 1)), jnp.int32)
params = jaxllm.init_params(cfg, 0)
grad = jax.jit(jax.value_and_grad(lambda p, b: loss_fn(cfg, p, b)))
for _ in range(3):
    jax.block_until_ready(grad(params, batch))
windows = []  # steady state: the heap may still grow in the first windows when threads interleave differently
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        jax.block_until_ready(grad(params, batch))
    windows.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
faults = min(windows)
print(json.dumps({"applied": jaxllm.keep_freed_host_memory(), "faults_per_step": faults}))
"""


def faults_per_step(mode: str) -> dict:
    env = {**os.environ, ENV: mode, "XLA_FLAGS": ""}  # one CPU device, as a plain process has
    out = subprocess.run([sys.executable, "-c", FAULTS_PER_STEP], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_kept_memory_removes_the_per_step_page_faults():
    kept, system = faults_per_step("keep"), faults_per_step("system")
    assert kept["applied"] and not system["applied"]
    # glibc's defaults: every 4 KiB page of the ~72 MiB temporaries is faulted in again each step.
    assert system["faults_per_step"] > 10_000, system
    assert kept["faults_per_step"] < 1_000, kept


# Where glibc serves a 100 MiB block: its own mmap (glibc's default above the mmap threshold), or the
# heap (the settings). mallinfo2's hblkhd counts the bytes in mmapped blocks.
WHERE_A_LARGE_BLOCK_GOES = """
import ctypes, json
import jaxllm, jaxllm.model  # the first JAX-backed module applies the settings
class Mallinfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype, libc.malloc.restype = Mallinfo2, ctypes.c_void_p
before = libc.mallinfo2().hblkhd
block = libc.malloc(100 << 20)
mmapped = libc.mallinfo2().hblkhd - before
libc.free(ctypes.c_void_p(block))
print(json.dumps({"applied": jaxllm.keep_freed_host_memory(), "mmapped_bytes": mmapped}))
"""


def where_a_large_block_goes(mode: str) -> dict:
    env = {**os.environ, ENV: mode}
    out = subprocess.run([sys.executable, "-c", WHERE_A_LARGE_BLOCK_GOES], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_keeps_large_blocks_on_the_heap_unless_system_is_asked_for():
    """`import jaxllm` applies the settings: a large block comes from the heap, where glibc's defaults
    (JAXLLM_MALLOC=system, the control) give it its own mmap that free() hands back to the system."""
    kept, system = where_a_large_block_goes("keep"), where_a_large_block_goes("system")
    assert system == {"applied": False, "mmapped_bytes": pytest.approx(100 << 20, rel=0.01)}
    assert kept == {"applied": True, "mmapped_bytes": 0}
    assert keep_freed_host_memory() is (os.environ.get(ENV, "keep") != "system")  # and once per process
