"""Training metrics at the edge: step rates and MFU, metrics.jsonl, TensorBoard (when installed), loss-curve PNG.

Framework-free (the peaks are `jaxllm.peak`'s). Only process 0 writes; every other process gets a logger
that does nothing.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from jaxllm.peak import mfu_warning


class StepClock:
    """Throughput between log rows: step time, tokens/s and MFU, shared by jaxllm and torch_ref loops.

    The first step (compilation, warm-up) is not timed; `pause()` after evaluation or checkpointing
    restarts the clock, so neither counts as step time. The first MFU above `jaxllm.peak.MFU_WARN`
    prints a warning naming the peak's source (when `warn`).
    """

    def __init__(
        self, tokens_per_step: int, flops_per_token: float, peak_flops: float, peak_source: str = "", warn: bool = True
    ):
        self.tokens_per_step, self.flops_per_token, self.peak = tokens_per_step, flops_per_token, peak_flops
        self.peak_source, self._warn = peak_source, warn
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
        mfu = tokens_per_s * self.flops_per_token / self.peak
        warning = mfu_warning(mfu, self.peak, self.peak_source) if self._warn else None
        if warning:
            print(warning, flush=True)
            self._warn = False
        return {"step_time_s": step_time, "tokens_per_s": tokens_per_s, "mfu": mfu}


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
