"""Training metrics at the edge: MFU peaks, metrics.jsonl, TensorBoard (when installed), loss-curve PNG.

Only process 0 writes; every other process gets a logger that does nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

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


def measure_matmul_flops(n: int = 1024, reps: int = 5) -> float:
    """Best-of-`reps` float32 FLOP/s of an n x n matmul on the default device (the CPU "peak")."""
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(dtype: str, matmul_precision: str, override_per_device: float | None = None) -> tuple[float, str]:
    """Total peak FLOP/s of all devices in the run, and where the figure comes from.

    GPUs/TPUs: the table above times the device count (bf16, else tf32 unless `highest`, else fp32).
    CPU: a matmul measured now, once for the whole machine (simulated devices share its cores).
    """
    devices = jax.devices()
    if override_per_device:
        return override_per_device * len(devices), "train.peak_flops"
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        return measure_matmul_flops(), "measured float32 matmul on this CPU"
    per = datasheet_peak(kind, dtype, matmul_precision)
    if per is not None:
        return per * len(devices), f"datasheet peak of {kind}"
    return float("nan"), f"unknown device {kind!r}: set train.peak_flops"


def datasheet_peak(kind: str, dtype: str, matmul_precision: str) -> float | None:
    """One device's peak from the table (bf16, else tf32 unless `highest`, else fp32); None if unknown.

    Shared with torch_ref, which names its devices the same way (e.g. "NVIDIA H100 80GB HBM3").
    """
    for name, (bf16, tf32, fp32) in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            return bf16 if dtype == "bfloat16" else (fp32 if matmul_precision == "highest" else tf32)
    return None


class StepClock:
    """Throughput between log rows: step time, tokens/s and MFU, shared by jaxllm and torch_ref loops.

    The first step (compilation, warm-up) is not timed; `pause()` after evaluation or checkpointing
    restarts the clock, so neither counts as step time.
    """

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops
        self._mark: float | None = None
        self._steps = 0

    def step_done(self) -> None:
        if self._mark is None:
            self._mark = time.perf_counter()
        else:
            self._steps += 1

    def pause(self) -> None:
        self._mark, self._steps = time.perf_counter(), 0

    def rates(self) -> dict[str, float]:
        """`step_time_s`, `tokens_per_s`, `mfu` since the last call (empty before any timed step)."""
        if not self._steps or self._mark is None:
            return {}
        step_time = (time.perf_counter() - self._mark) / self._steps
        tokens_per_s = self.tokens_per_step / step_time
        self.pause()
        return {
            "step_time_s": step_time,
            "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s * self.flops_per_token / self.peak,
        }


class MetricsLogger:
    """Appends one JSON object per row to metrics.jsonl; mirrors scalars to TensorBoard if present."""

    def __init__(self, run_dir: Path, enabled: bool, truncate_after_step: int | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self._tb = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None:
            self._truncate(truncate_after_step)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            self._tb = None

    def _truncate(self, step: int) -> None:
        """On resume: drop rows logged after the restored checkpoint (they will be redone)."""
        if not self.path.exists():
            return
        keep = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in keep))
        os.replace(tmp, self.path)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, int | float):
                    self._tb.add_scalar(key, value, row["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line]


def plot_loss_curve(metrics_path: Path, png_path: Path) -> Path:
    """Training (and eval) loss against step, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = png_path.with_name(f".{png_path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, png_path)
    return png_path
