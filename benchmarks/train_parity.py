"""Cross-framework training parity: the loss curves of jaxllm and torch_ref side by side.

    python -m benchmarks.train_parity                  # both comparisons (DeepSpeed's needs deepspeed)
    python -m benchmarks.train_parity --no-deepspeed   # jaxllm vs plain torch_ref only

From the same initial weights (jaxllm's init: torch_ref starts from it by default; DeepSpeed gets it
exported with `jaxllm.torch_io`) and the same batches
(a byte-level dataset made here from a few standard-library packages), float32 on CPU:

1. jaxllm on one device vs torch_ref (plain PyTorch), `--steps` steps (default 20), batch 8;
2. jaxllm sharded FSDP-style over 8 simulated CPU devices vs DeepSpeed ZeRO-3 on 2 CPU ranks (gloo),
   `--ds-steps` steps (default 10), batch 16 in 2 micro-batches.

Prints the curves side by side with their relative differences and writes
benchmarks/results/train_parity.{json,md,png}. The model is the `mini` preset with the byte vocabulary.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")  # before JAX starts

import argparse
import json
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
import torch

from jaxllm.config import Config
from jaxllm.data.preprocess import preprocess
from jaxllm.model import init_params
from jaxllm.parity import RunComparison, compare_runs
from jaxllm.torch_io import save_torch
from jaxllm.train import train as jax_train
from torch_ref.train import train as torch_train

RESULTS = Path(__file__).parent / "results"
BASE = ["model.vocab_size=257", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
        "train.checkpoint_every=0"]  # fmt: skip
PLAIN = ["train.batch_size=8", "mesh.data=1"]
SHARDED = ["train.batch_size=16", "train.grad_accum=2", "mesh.data=1", "mesh.fsdp=-1"]
FLOOR = 1e-9  # the plot's floor for relative differences


def make_dataset(out: Path) -> Path:
    stdlib = sysconfig.get_paths()["stdlib"]
    inputs = [f"{stdlib}/json", f"{stdlib}/email", f"{stdlib}/argparse.py"]
    preprocess(inputs, out, tokenizer="byte", glob="*.py", on_warning=lambda _: None)
    return out


def timed(fn, *args, **kwargs) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - start


def plain_pair(data: Path, tmp: Path, steps: int) -> tuple[RunComparison, dict]:
    cfg = Config.load("mini", [*BASE, *PLAIN, f"train.steps={steps}", f"data.path={data}"])
    t_jax = timed(jax_train, cfg, tmp / "jax", devices=jax.devices()[:1], progress=False)
    t_torch = timed(torch_train, cfg, tmp / "torch", progress=False)  # jaxllm's init for train.seed, by default
    comparison = compare_runs(tmp / "jax", tmp / "torch", init=init_params(cfg.model, cfg.train.seed))
    return comparison, {"jaxllm_s": t_jax, "torch_ref_s": t_torch}


def deepspeed_pair(data: Path, tmp: Path, steps: int) -> tuple[RunComparison, dict]:
    overrides = [*BASE, *SHARDED, f"train.steps={steps}"]
    cfg = Config.load("mini", [*overrides, f"data.path={data}"])
    init = save_torch(tmp / "init_ds.safetensors", cfg.model, init_params(cfg.model, cfg.train.seed))
    t_jax = timed(jax_train, cfg, tmp / "jax8", progress=False)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "torch_ref.train_deepspeed", "--config", "mini", "--data", str(data), "--out", str(tmp / "ds"),
           "--deepspeed", "zero3", "--init", str(init), "--no-progress", *overrides]  # fmt: skip
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if out.returncode:
        raise SystemExit(f"DeepSpeed run failed:\n{out.stderr[-3000:]}")
    t_ds = time.perf_counter() - start
    comparison = compare_runs(tmp / "jax8", tmp / "ds", init=init_params(cfg.model, cfg.train.seed))
    return comparison, {"jaxllm_8_devices_s": t_jax, "deepspeed_2_ranks_s (incl. start-up)": t_ds}


def summary(c: RunComparison) -> dict:
    worst, rel = c.worst_rel_to_update()
    return {
        "steps": c.steps,
        "loss_a": c.loss_a,
        "loss_b": c.loss_b,
        "rel_loss_diff": c.rel_loss_diffs,
        "max_rel_loss_diff": c.max_rel_loss_diff,
        "max_abs_param_diff": c.max_abs_param_diff,
        "worst_param_diff_over_update": rel,
        "worst_param": worst,
    }


def side_by_side(title: str, names: tuple[str, str], c: RunComparison) -> list[str]:
    lines = [f"### {title}", "", f"| step | {names[0]} | {names[1]} | relative difference |", "|---:|---:|---:|---:|"]
    for s, a, b, r in zip(c.steps, c.loss_a, c.loss_b, c.rel_loss_diffs, strict=True):
        lines.append(f"| {s} | {a:.7f} | {b:.7f} | {r:.1e} |")
    worst, rel = c.worst_rel_to_update()
    lines += [
        "",
        f"Max relative loss difference {c.max_rel_loss_diff:.1e}; final weights: max |difference| "
        f"{c.max_abs_param_diff:.1e}, worst difference / update {rel:.1e} (`{worst}`).",
        "",
    ]
    return lines


def plot(pairs: list[tuple[str, tuple[str, str], RunComparison]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(pairs), figsize=(6.5 * len(pairs), 6.5), squeeze=False, sharex="col")
    for col, (title, names, c) in enumerate(pairs):
        top, bottom = axes[0][col], axes[1][col]
        top.plot(c.steps, c.loss_a, "o-", label=names[0], lw=2.5, ms=6, alpha=0.6)
        top.plot(c.steps, c.loss_b, "x--", label=names[1], lw=1.2, ms=6, color="black")
        top.set_title(title, fontsize=10)
        top.set_ylabel("training loss (nats/token)")
        top.grid(alpha=0.3)
        top.legend()
        diffs = list(zip(c.steps, c.rel_loss_diffs, strict=True))
        bottom.semilogy([s for s, r in diffs if r], [r for _, r in diffs if r], "s", ms=5, label="difference")
        same = [s for s, r in diffs if not r]
        if same:  # bit-identical losses have no place on a log axis: marked on its floor
            bottom.plot(same, [FLOOR] * len(same), "v", ms=7, color="green", label="identical")
        bottom.axhline(1e-4, color="red", ls=":", label="bound 1e-4")
        bottom.set_xlabel("step")
        bottom.set_ylabel("|relative loss difference|")
        bottom.set_ylim(FLOOR / 2, 1e-3)
        bottom.xaxis.get_major_locator().set_params(integer=True)
        bottom.grid(alpha=0.3, which="both")
        bottom.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)


def machine() -> dict:
    from benchmarks.decode_speed import cpu_model

    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
    }
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError:
        info["deepspeed"] = None
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="steps of jaxllm vs torch_ref (default 20)")
    parser.add_argument("--ds-steps", type=int, default=10, help="steps of jaxllm 8 devices vs ZeRO-3 (default 10)")
    parser.add_argument("--no-deepspeed", action="store_true", help="skip the DeepSpeed comparison")
    args = parser.parse_args()
    command = "python -m benchmarks.train_parity" + (" (custom arguments)" if len(sys.argv) > 1 else "")

    tmp = Path(tempfile.mkdtemp(prefix="train_parity-"))
    try:
        data = make_dataset(tmp / "data")
        pairs, times = [], {}
        plain, t = plain_pair(data, tmp, args.steps)
        pairs.append((f"jaxllm (1 device) vs torch_ref, {args.steps} steps", ("jaxllm", "torch_ref"), plain))
        times.update(t)
        if not args.no_deepspeed:
            ds, t = deepspeed_pair(data, tmp, args.ds_steps)
            title = f"jaxllm FSDP (8 devices) vs DeepSpeed ZeRO-3 (2 ranks), {args.ds_steps} steps"
            pairs.append((title, ("jaxllm 8 devices", "DeepSpeed ZeRO-3"), ds))
            times.update(t)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    info = machine()
    RESULTS.mkdir(exist_ok=True)
    plot(pairs, RESULTS / "train_parity.png")
    result = {
        "command": command,
        "machine": info,
        "settings": {"model": "mini preset, vocab 257 (bytes)", "plain": PLAIN, "sharded": SHARDED, "common": BASE},
        "comparisons": {title: {"names": names, **summary(c)} for title, names, c in pairs},
        "wall_seconds": times,
    }
    (RESULTS / "train_parity.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Training parity: jaxllm vs torch_ref (CPU, float32)",
        "",
        f"Command: `{command}`. Same initial weights (jaxllm's init, converted), same batches (a byte-level "
        "dataset of the standard library's `json`, `email` and `argparse`), mini preset with vocab 257, "
        "AdamW with warmup + cosine, clipping at 1.0. Figure: `train_parity.png`.",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores; Python {info['python']}, jax {info['jax']}, "
        f"torch {info['torch']}, deepspeed {info['deepspeed']}, numpy {info['numpy']}.",
        "",
    ]
    for title, names, c in pairs:
        lines += side_by_side(title, names, c)
    lines.append("Wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in times.items()) + ".")
    text = "\n".join(lines) + "\n"
    (RESULTS / "train_parity.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
