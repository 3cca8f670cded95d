"""Peak FLOP/s for MFU: one definition for jaxllm, torch_ref and the benchmarks (no JAX, no torch).

- GPUs/TPUs: the datasheet's dense peak (`PEAK_FLOPS`) times the devices of the run.
- CPU: one figure per machine, measured once and cached on disk: the best float32 matmul rate of
  numpy, torch and JAX (those installed), each in a fresh process with every core (no thread limits
  inherited, nothing else running in it), best of many repetitions at two sizes; the fastest matmul
  is the fairest peak. The figure is written to `$JAXLLM_CACHE_DIR/peak_flops.json` (default
  `~/.cache/jaxllm/`), keyed by CPU model, usable cores and dtype, and every later run on the machine,
  of either framework, reads it back instead of measuring.
- Overrides: `train.peak_flops` (per device, times the devices) in the config, or the environment
  variable `JAXLLM_PEAK_FLOPS` (the whole CPU's FLOP/s; nothing is measured or cached).

Delete the cache file to measure again (on a quiet machine: a busy one gives a low peak, hence MFUs
that are too high; the training loops warn above `MFU_WARN`).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

ENV_PEAK = "JAXLLM_PEAK_FLOPS"
ENV_CACHE = "JAXLLM_CACHE_DIR"
MFU_WARN = 0.9  # an MFU above this is more likely a low peak than a fast step

# Dense per-device peak FLOP/s by device kind substring: (bfloat16, tf32, float32).
PEAK_FLOPS = {
    "H200": (989e12, 495e12, 67e12),
    "H100": (989e12, 495e12, 67e12),
    "A100": (312e12, 156e12, 19.5e12),
    "L40S": (362e12, 183e12, 91.6e12),
    "L4": (121e12, 60e12, 30.3e12),
    "A10": (125e12, 62.5e12, 31.2e12),
    "V100": (125e12, 15.7e12, 15.7e12),
    "TPU v5p": (459e12, 459e12, 459e12),
    "TPU v5": (197e12, 197e12, 197e12),
    "TPU v4": (275e12, 275e12, 275e12),
}

# Run in a fresh interpreter per framework: best-of-reps float32 FLOP/s of n x n matmuls, printed.
_MEASURE = """
import sys, time
import numpy as np
fw, sizes, reps = sys.argv[1], [int(s) for s in sys.argv[2].split(",")], int(sys.argv[3])
if fw == "torch":
    import torch
    prep, mm = torch.from_numpy, lambda x: x @ x
elif fw == "jax":
    import jax
    prep, f = jax.device_put, jax.jit(lambda x: x @ x)
    mm = lambda x: f(x).block_until_ready()
else:
    prep, mm = (lambda x: x), (lambda x: x @ x)
best = 0.0
for n in sizes:
    a = prep(np.random.default_rng(0).standard_normal((n, n), dtype=np.float32))
    for _ in range(3):
        mm(a)
    for _ in range(reps):
        t0 = time.perf_counter()
        mm(a)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
print(best)
"""
_THREAD_LIMITS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "XLA_FLAGS")


def datasheet_peak(kind: str, dtype: str, matmul_precision: str) -> float | None:
    """One device's peak from the table (bf16, else tf32 unless `highest`, else fp32); None if unknown.

    JAX's device kinds and torch's device names match the same keys (e.g. "NVIDIA H100 80GB HBM3").
    """
    for name, (bf16, tf32, fp32) in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else (fp32 if matmul_precision == "highest" else tf32)
    return None


def run_peak_flops(
    platform_name: str, device_kind: str, n_devices: int, dtype: str, matmul_precision: str, override: float | None
) -> tuple[float, str]:
    """Total peak FLOP/s of a run's devices, and where the figure comes from.

    `platform_name`: "cpu" or an accelerator ("gpu", "cuda", "tpu"); `override`: `train.peak_flops`
    (per device). On the CPU, all devices of the run share one machine: its cached figure.
    """
    if override:
        return override * n_devices, "train.peak_flops"
    if platform_name == "cpu":
        return cpu_peak_flops()
    per = datasheet_peak(device_kind, dtype, matmul_precision)
    if per is not None:
        return per * n_devices, f"datasheet peak of {device_kind}"
    return float("nan"), f"unknown device {device_kind!r}: set train.peak_flops"


def cache_path() -> Path:
    root = os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "jaxllm"
    return Path(root) / "peak_flops.json"


def machine_key(dtype: str = "float32") -> str:
    """What the CPU figure depends on: the CPU model, the cores this process may use, the dtype."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cpu_model()} | {cores} cores | {dtype}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_peak_flops(measure: Callable[[], dict[str, float]] | None = None) -> tuple[float, str]:
    """This machine's float32 matmul peak and its source: `JAXLLM_PEAK_FLOPS`, else the cache, else
    measured now (by `measure`, default `measure_cpu_matmul_flops`) and cached."""
    if os.environ.get(ENV_PEAK):
        return float(os.environ[ENV_PEAK]), f"environment variable {ENV_PEAK}"
    path, key = cache_path(), machine_key()
    cache = _read_cache(path)
    entry = cache.get(key)
    if entry is None:
        by_framework = (measure or measure_cpu_matmul_flops)()
        entry = {"flops": max(by_framework.values()), "by_framework": by_framework}
        cache[key] = entry
        _write_cache(path, cache)
    rates = ", ".join(f"{fw} {v / 1e9:.0f}" for fw, v in entry["by_framework"].items())
    return entry["flops"], f"float32 matmul measured on this CPU ({key}; GFLOP/s {rates}; the best), cached in {path}"


def cached_cpu_rates() -> dict[str, float]:
    """The per-framework rates behind this machine's cached CPU figure (empty when none is cached)."""
    return _read_cache(cache_path()).get(machine_key(), {}).get("by_framework", {})


def measure_cpu_matmul_flops(sizes: tuple[int, ...] = (1024, 2048), reps: int = 10) -> dict[str, float]:
    """Best float32 matmul FLOP/s of each installed framework, each in a fresh process on all cores."""
    from importlib.util import find_spec

    env = {k: v for k, v in os.environ.items() if k not in _THREAD_LIMITS}
    env["JAX_PLATFORMS"] = "cpu"
    out = {}
    for fw in ("numpy", "torch", "jax"):
        if find_spec(fw) is None:
            continue
        args = [sys.executable, "-c", _MEASURE, fw, ",".join(map(str, sizes)), str(reps)]
        done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
        if done.returncode == 0:
            out[fw] = float(done.stdout.split()[-1])
    if not out:
        raise RuntimeError(f"could not measure a matmul on this CPU: set {ENV_PEAK}")
    return out


def _read_cache(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_cache(path: Path, cache: dict) -> None:
    """Written under a temporary name and renamed (two processes measuring at once both succeed)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1) + "\n")
        os.replace(tmp, path)
    except OSError as err:  # a read-only home: measure again next time
        print(f"warning: could not cache the CPU peak in {path}: {err}", file=sys.stderr)


def mfu_warning(mfu: float, peak: float, source: str) -> str | None:
    """The line to log when an MFU is implausible (above `MFU_WARN`), else None."""
    if not mfu > MFU_WARN:
        return None
    return (
        f"warning: MFU {mfu:.2f} > {MFU_WARN}: the peak ({peak / 1e9:,.0f} GFLOP/s, {source}) is likely too low; "
        f"set {ENV_PEAK} or train.peak_flops, or delete {cache_path()} to measure again on a quiet machine"
    )


if __name__ == "__main__":  # python -m jaxllm.peak: print (measuring and caching if needed) this machine's CPU peak
    value, where = cpu_peak_flops()
    print(f"{value / 1e9:,.1f} GFLOP/s: {where}")
