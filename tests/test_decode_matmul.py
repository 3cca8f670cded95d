"""benchmarks.decode_matmul runs each matmul variant (XLA's and jaxllm's kernel) and reports them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from benchmarks import decode_matmul

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_times_every_variant_at_every_batch() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.decode_matmul", "--quick", "--batches", "1", "3"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    table = [line for line in out.stdout.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(table) == 2 * len(decode_matmul.VARIANTS)
    for name in decode_matmul.VARIANTS:
        assert sum(f"| {name} |" in line for line in table) == 2, name


def test_markdown_reports_time_relative_to_batch_one() -> None:
    rows = [
        {"batch": 1, "layout": "v", "median_s": 0.02, "gb_per_s": 20.0, "gflop_per_s": 10.0},
        {"batch": 8, "layout": "v", "median_s": 0.03, "gb_per_s": 13.3, "gflop_per_s": 53.0},
    ]
    run = {"command": "c", "layers": 30, "weight_bytes": 4e8, "bandwidth_gb_s": 20.0, "reps": 3,
           "load_average_at_end": 1.0}  # fmt: skip
    info = {"cpu": "x", "cores": 2, "python": "3.11", "jax": "0.10", "load_average_at_start": 1.0}
    md = decode_matmul.markdown(info, run, rows)
    assert "| 8 | v | 30.0 | 13.3 | 53 | 1.50x |" in md
