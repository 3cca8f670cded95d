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


def test_applied_once_in_this_process():
    assert keep_freed_host_memory() is (os.environ.get(ENV, "keep") != "system")
