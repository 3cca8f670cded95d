"""`python -m benchmarks.speed`: jaxllm vs torch_ref eager vs torch_ref + `torch.compile`, side by side.

    python -m benchmarks.speed                          # CPU, float32: mini and advanced
    python -m benchmarks.speed --device cuda            # GPU, bfloat16, cuDNN attention: all presets
    python -m benchmarks.speed --quick                  # a smoke run: tiny shapes, files only with --out
    python -m benchmarks.speed --presets smollm2-135m   # a real model's shape (SmolLM2-135M, random weights)

On the same config, batch and machine, for each preset:

- forward latency: one forward pass of a (B, T) batch to float32 logits, no gradients;
- training: one whole optimizer step at (B, T) -- forward, backward, clipping, AdamW, and the
  loss and gradient norm read back to the host, as a training loop does -- as tokens/s and MFU;
- decode: tokens/s at batch 1 and 16, measured as `benchmarks.decode_speed` does (greedy, the
  difference of two `generate` calls removes the prefill).

Implementations: jaxllm (jitted pure `forward` / `train_step` with donated state / `generate`),
torch_ref eager (`torch_ref.build_model`, `PlainTrainer`, `torch_ref.generate`) and the same
with `torch.compile`, all from the same weights. On the CPU each implementation's training step is
timed in a child process of its own, one after the other (sharing one process with PyTorch's models
slowed jaxllm's SmolLM2-shaped step from 4.6 to 6.5 s on the Intel Xeon), and a fourth training row
runs jaxllm with glibc's default malloc (`JAXLLM_MALLOC=system`), which is what made the step slower
than PyTorch's before `jaxllm/host_memory.py`. Forward and decode figures are timed in this process.

MFU = training FLOPs per token (`jaxllm.flops_per_token`, PaLM-style) x tokens/s / peak. The peak
is the training loops' (`jaxllm.peak`): on the CPU the machine's float32 matmul figure, the best of
numpy, PyTorch and JAX, measured once and cached (one denominator for every row, and the same as in
run directories); on a GPU the datasheet bfloat16 peak. Warm-up calls (compilation included) are
not timed; each figure is the median of `--reps` timings (taken in turn across the implementations,
except the CPU training rows' children), with min and max as the spread. On the CPU a timing during
which other processes kept a core more than 5% busy is discarded and repeated
(`benchmarks.decode_speed.quiet_timing`; `--under-load`: not, and the results say so).

`--profile DIR`: after the first preset's training figures, a `jax.profiler` trace of one more timing's
worth of jaxllm training steps (5 for gpt2-124m on a GPU, 1-5 on the CPU) into DIR (xprof's layout;
`benchmarks/gpu_suite.sh` tars it).

Presets: jaxllm's shipped ones, and `smollm2-135m`: SmolLM2-135M's shape (`benchmarks.real_model`'s
config: llama family, 30 layers, d_model 576, 9 heads / 3 kv heads, vocab 49152, tied), random weights.

Writes `NAME.json`, `NAME.md` and `NAME.png` under `--out` (default benchmarks/results; NAME is
`--name`, default `speed_<cpu>` on the CPU (`speed_amd-epyc`, `speed_intel-xeon`, ...: each CPU model's
figures in files of their own), `speed_cuda` on a GPU),
rewritten after each preset so a run cut short keeps what it measured.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # JAX and PyTorch share one GPU here

import argparse
import json
import statistics
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh

import jaxllm
import torch_ref
from benchmarks.decode_speed import SETTINGS as DECODE_SETTINGS
from benchmarks.decode_speed import decode_rates, interleaved_timings
from benchmarks.machine import RESULTS, cpu_slug, describe, machine_info, training_goal, write_results
from jaxllm.config import Config, flops_per_token
from jaxllm.host_memory import ENV as MALLOC_ENV
from jaxllm.optim import make_optimizer
from jaxllm.peak import cached_cpu_rates, cpu_peak_flops, datasheet_peak
from jaxllm.train import sharded_train_step
from jaxllm.train_step import init_state, train_step
from torch_ref.trainer import Dist, PlainTrainer, set_numerics

JAX, EAGER, COMPILED = "jaxllm", "torch_ref eager", "torch_ref + torch.compile"
SYSTEM_MALLOC = "jaxllm, glibc default malloc"
IMPLS = (JAX, EAGER, COMPILED)
torch._dynamo.config.cache_size_limit = 64  # prefill and decode shapes per configuration


@dataclass(frozen=True)
class Shape:
    """What one preset runs at: batch, context, steps per timing, decode prompt and new tokens."""

    batch: int
    context: int
    steps_per_timing: int
    prompt: int
    new_tokens: int


# CPU: each preset's own training batch for mini; advanced and gpt2-124m at full width, depth and
# vocabulary but a batch a CPU finishes in about a second. GPU: nanoGPT-sized batches.
SHAPES = {
    "cpu": {
        "mini": Shape(32, 64, 5, DECODE_SETTINGS["mini"]["prompt"], DECODE_SETTINGS["mini"]["new"]),
        "advanced": Shape(4, 256, 1, 16, 64),
        "gpt2-124m": Shape(4, 256, 1, 16, 64),
        "smollm2-135m": Shape(4, 256, 1, 16, 64),
    },
    "cuda": {
        "mini": Shape(32, 64, 20, 8, 56),
        "advanced": Shape(8, 1024, 5, 16, 128),
        "gpt2-124m": Shape(12, 1024, 5, 16, 128),
        "smollm2-135m": Shape(12, 1024, 5, 16, 128),
    },
}
SMOLLM2 = "smollm2-135m"  # not a shipped preset: the real model's shape, from benchmarks.real_model


def load_config(preset: str, device: str, shape: Shape) -> Config:
    overrides = [f"train.batch_size={shape.batch}", f"model.context_length={shape.context}", "train.grad_accum=1"]
    if device == "cuda":
        overrides += ["model.dtype=bfloat16", "model.attention=cudnn"]
    if preset != SMOLLM2:
        return Config.load(preset, overrides)
    from benchmarks.real_model import SMOLLM2_CONFIG
    from jaxllm.config import apply_overrides
    from jaxllm.hf_families import config_from_hf

    model, _ = config_from_hf(SMOLLM2_CONFIG, name=SMOLLM2)
    return Config.model_validate(apply_overrides({"model": model.to_dict()}, overrides))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timings(runners: dict[str, Callable[[], object]], reps: int, quiet: bool) -> dict[str, list[float]]:
    """Seconds per call of each runner (`interleaved_timings`; `quiet`: the CPU-load check)."""
    return interleaved_timings(runners, reps, quiet=quiet)[0]


def summary(seconds: list[float], per_call: float = 1.0) -> dict[str, float]:
    """Median, min and max of `seconds` divided by the work units in one call."""
    per = [s / per_call for s in seconds]
    return {"median_s": statistics.median(per), "min_s": min(per), "max_s": max(per), "n": len(per)}


# The three measurements -----------------------------------------------------------------------------


def forward_runners(cfg: Config, params, model: torch.nn.Module, device: str) -> dict[str, Callable[[], object]]:
    mc, shape = cfg.model, (cfg.train.batch_size, cfg.model.context_length)
    tokens = np.random.default_rng(1).integers(0, mc.vocab_size, shape)
    tokens_jax = jnp.asarray(tokens, jnp.int32)
    tokens_torch = torch.from_numpy(tokens).to(device)
    forward = jax.jit(partial(jaxllm.forward, mc))
    compiled = torch.compile(model)

    def torch_forward(net: torch.nn.Module) -> Callable[[], object]:
        def run() -> object:
            with torch.inference_mode():
                logits = net(tokens_torch)
            sync(device)
            return logits

        return run

    return {
        JAX: lambda: forward(params, tokens_jax).block_until_ready(),
        EAGER: torch_forward(model),
        COMPILED: torch_forward(compiled),
    }


def jax_train_runner(cfg: Config, params, steps: int, mesh: Mesh | None = None) -> Callable[[], object]:
    """`steps` jitted train steps from `params` (copied: the state is donated), reading metrics each step.

    With `mesh`: `jaxllm train`'s sharded step over it (`benchmarks.cpu_scaling`'s one XLA device per core)."""
    optimizer = make_optimizer(cfg.train)
    state = {"s": init_state(jax.tree.map(jnp.copy, params), optimizer)}
    batches = train_batches(cfg)
    if mesh is None:
        step = jax.jit(partial(train_step, cfg.model, cfg.train, optimizer), donate_argnums=0)
        batches_jax = [jnp.asarray(b, jnp.int32) for b in batches]
    else:
        step, state_sh, batch_sh = sharded_train_step(cfg, mesh, optimizer)
        state["s"] = jax.device_put(state["s"], state_sh)
        batches_jax = [jax.device_put(jnp.asarray(b, jnp.int32), batch_sh) for b in batches]

    def run() -> None:
        for i in range(steps):
            state["s"], metrics = step(state["s"], batches_jax[i % len(batches_jax)])
            float(metrics["loss"]), float(metrics["grad_norm"])  # as the loop logs them

    return run


def torch_train_runner(cfg: Config, state_dict: dict, device: str, compile: bool, steps: int) -> Callable[[], object]:
    model = torch_ref.build_model(cfg.model, device)
    model.load_state_dict(state_dict)
    trainer = PlainTrainer(model, cfg, Dist.from_env(), torch.device(device), compile=compile)
    batches = [torch.from_numpy(b).to(device) for b in train_batches(cfg)]

    def run() -> None:
        for i in range(steps):
            trainer.train_step(batches[i % len(batches)])  # reads loss and grad norm back itself

    return run


def train_batches(cfg: Config, n: int = 4) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    shape = (cfg.train.batch_size, cfg.model.context_length + 1)
    return [rng.integers(0, cfg.model.vocab_size, shape) for _ in range(n)]


def decode_runners(cfg: Config, params, model: torch.nn.Module, prompts: list[list[int]]) -> dict:
    mc = cfg.model
    return {
        JAX: lambda n: lambda: jaxllm.generate(mc, params, prompts, max_new_tokens=n),
        EAGER: lambda n: lambda: torch_ref.generate(model, prompts, max_new_tokens=n),
        COMPILED: lambda n: lambda: torch_ref.generate(model, prompts, max_new_tokens=n, compile=True),
    }


# One preset ----------------------------------------------------------------------------------------


def bench_preset(
    preset: str,
    device: str,
    reps: int,
    decode_batches: list[int],
    quick: bool,
    save: Callable[[dict], None],
    under_load: bool = False,
    profile: Path | None = None,
) -> dict:
    """Training, then forward, then decode figures for one preset; `save(result)` after each section.

    Training first: it carries the goals, and a run cut short by a time limit keeps it.
    """
    shape = SHAPES[device][preset]
    # The CPU-load check: not for smoke runs (they time nothing to keep), nor when asked to time under load.
    quiet = device == "cpu" and not quick and not under_load
    if quick:
        shape = Shape(min(shape.batch, 4), min(shape.context, 64), 1, 4, 8)
    cfg = load_config(preset, device, shape)
    mc = cfg.model
    set_numerics(cfg.train, torch.device(device))
    params = jax.device_put(jaxllm.init_params(mc, 0), jax.devices("gpu" if device == "cuda" else "cpu")[0])
    state_dict = jaxllm.to_torch_state_dict(mc, params)
    model = torch_ref.build_model(mc, device)
    model.load_state_dict(state_dict)
    model.eval()
    result = {"preset": preset, "shape": shape.__dict__, "dtype": mc.dtype, "attention": mc.attention}
    result.update(flops_per_token=flops_per_token(mc), train={}, forward={}, decode={})

    steps = shape.steps_per_timing
    if device == "cpu" and not quick:  # each implementation in a process of its own (see the module docstring)
        result["train"] = {impl: train_in_child(preset, impl, reps, under_load) for impl in (*IMPLS, SYSTEM_MALLOC)}
    else:
        runners = {
            JAX: jax_train_runner(cfg, params, steps),
            EAGER: torch_train_runner(cfg, state_dict, device, False, steps),
            COMPILED: torch_train_runner(cfg, state_dict, device, True, steps),
        }
        result["train"] = {name: summary(t, steps) for name, t in timings(runners, reps, quiet).items()}
    for stats in result["train"].values():
        stats["tokens_per_s"] = shape.batch * shape.context / stats["median_s"]
    print_row(preset, "train tokens/s", {n: s["tokens_per_s"] for n, s in result["train"].items()})
    save(result)
    if profile is not None:
        trace_training(jax_train_runner(cfg, params, steps), steps, profile)

    fwd = timings(forward_runners(cfg, params, model, device), reps, quiet)
    result["forward"] = {name: summary(t) for name, t in fwd.items()}
    print_row(preset, "forward ms", {n: s["median_s"] * 1e3 for n, s in result["forward"].items()})
    save(result)

    for batch in decode_batches:
        prompts = np.random.default_rng(3).integers(0, mc.vocab_size, (batch, shape.prompt)).tolist()
        torch._dynamo.reset()  # fresh torch.compile caches per decode shape
        runners = decode_runners(cfg, params, model, prompts)
        rates = decode_rates(runners, batch, shape.new_tokens, reps, quiet=quiet)
        result["decode"][str(batch)] = rates
        print_row(preset, f"decode b{batch} tok/s", {n: r["tokens_per_s"] for n, r in rates.items()})
        save(result)
    torch._dynamo.reset()
    return result


def trace_training(run: Callable[[], object], steps: int, log_dir: Path) -> None:
    """A profiler trace of one more call of a (warm) jaxllm training runner: `steps` steps."""
    from jaxllm.profiler import trace

    with trace(log_dir):
        run()
    print(f"profiler trace of {steps} training steps in {log_dir}", flush=True)


def train_in_child(preset: str, impl: str, reps: int, under_load: bool = False) -> dict:
    """`impl`'s CPU train step (one of IMPLS, or SYSTEM_MALLOC: jaxllm with glibc's default malloc)
    timed in a child process of its own."""
    env = {**os.environ, MALLOC_ENV: "system"} if impl == SYSTEM_MALLOC else dict(os.environ)
    cmd = [sys.executable, "-m", "benchmarks.speed", "--train-only", preset, JAX if impl == SYSTEM_MALLOC else impl,
           "--reps", str(reps), *(["--under-load"] if under_load else [])]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=3600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def train_only(preset: str, impl: str, reps: int, under_load: bool) -> dict:
    """The child of `train_in_child`: `impl`'s CPU train step timings, as one JSON object."""
    shape = SHAPES["cpu"][preset]
    cfg = load_config(preset, "cpu", shape)
    params = jaxllm.init_params(cfg.model, 0)
    if impl == JAX:
        runner = jax_train_runner(cfg, params, shape.steps_per_timing)
    else:
        set_numerics(cfg.train, torch.device("cpu"))
        state_dict = jaxllm.to_torch_state_dict(cfg.model, params)
        runner = torch_train_runner(cfg, state_dict, "cpu", impl == COMPILED, shape.steps_per_timing)
    seconds = timings({impl: runner}, reps, not under_load)[impl]
    return {**summary(seconds, shape.steps_per_timing), "malloc_settings_applied": jaxllm.keep_freed_host_memory()}


def print_row(preset: str, what: str, values: dict[str, float]) -> None:
    cells = "  ".join(f"{name}: {v:,.1f}" for name, v in values.items())
    print(f"{preset:9s} {what:18s} {cells}", flush=True)


# Peak and results ----------------------------------------------------------------------------------


def peak(device: str, dtype: str) -> tuple[float, str, dict]:
    """The MFU peak as the training loops take it (`jaxllm.peak`), its source, the CPU rates behind it."""
    if device == "cpu":
        value, source = cpu_peak_flops()
        return value, source, cached_cpu_rates()
    kind = torch.cuda.get_device_name(0)
    value = datasheet_peak(kind, dtype, "default") or float("nan")
    return value, f"datasheet {dtype} dense peak of {kind}", {}


def add_mfu(results: list[dict], peak_flops: float) -> None:
    for r in results:
        for stats in r["train"].values():
            stats["mfu"] = r["flops_per_token"]["train"] * stats["tokens_per_s"] / peak_flops


def ms_cell(s: dict, digits: int) -> str:
    """'median [min-max]' in milliseconds."""
    return f"{s['median_s'] * 1e3:.{digits}f} [{s['min_s'] * 1e3:.{digits}f}-{s['max_s'] * 1e3:.{digits}f}]"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x"


def table(title: str, head: list[str], rows: list[str]) -> list[str]:
    """A markdown section; the first three columns are text, the rest numbers (right-aligned)."""
    align = ["---"] * 3 + ["---:"] * (len(head) - 3)
    return ["", f"## {title}", "", f"| {' | '.join(head)} |", f"|{'|'.join(align)}|", *rows]


def markdown(data: dict) -> str:
    run, results = data["run"], data["presets"]
    shape = lambda r: f"{r['shape']['batch']} x {r['shape']['context']}"  # noqa: E731
    train_rows = [
        f"| {r['preset']} | {shape(r)} | {name} | {ms_cell(s, 1)} | {s['tokens_per_s']:,.0f} | {s['mfu']:.3f} | "
        f"{ratio(s['tokens_per_s'], r['train'][EAGER]['tokens_per_s'])} |"
        for r in results
        for name, s in r["train"].items()
    ]
    forward_rows = [
        f"| {r['preset']} | {shape(r)} | {name} | {ms_cell(s, 2)} | "
        f"{ratio(r['forward'][EAGER]['median_s'], s['median_s'])} |"
        for r in results
        for name, s in r["forward"].items()
    ]
    decode_rows = [
        f"| {r['preset']} | {r['shape']['prompt']} + {r['shape']['new_tokens']} | {name} | {batch} | "
        f"{s['tokens_per_s']:,.1f} | {ratio(s['tokens_per_s'], rates[EAGER]['tokens_per_s'])} |"
        for r in results
        for batch, rates in r["decode"].items()
        for name, s in rates.items()
    ]
    lines = [
        f"# Speed: jaxllm vs torch_ref ({run['device']}, {run['dtype']})",
        "",
        f"Command: `{run['command']}`. Each figure: median of {run['reps']} timings after warm-up (min-max in "
        "brackets), implementations timed in turn"
        + ("; CPU training rows: each implementation in a child process of its own, one after the other"
           if run["device"] == "cpu" else "")
        + ". Same weights, batch and machine for every row.",
        "",
        f"Machine: {describe(data['machine'])}; load average {run['load_average_at_end']} at end. "
        f"Peak for MFU: {run['peak_source']}."
        + (" **Timed under load** (`--under-load`): other jobs shared the cores; no timing was discarded for it, "
           "so absolute figures are low and ratios noisy." if run.get("under_load") else ""),
        *table(
            "Training step (forward + backward + clipping + AdamW)",
            ["preset", "batch x context", "implementation", "ms/step", "tokens/s", "MFU", "vs torch_ref eager"],
            train_rows,
        ),
        *table(
            "Forward latency (logits of one batch, no gradients)",
            ["preset", "batch x context", "implementation", "ms", "speed-up vs torch_ref eager"],
            forward_rows,
        ),
        *table(
            "Decode (greedy, KV cache)",
            ["preset", "prompt + new", "implementation", "batch", "tokens/s", "vs torch_ref eager"],
            decode_rows,
        ),
        "",
        "## Goals",
        "",
        *goals(data),
    ]
    if data.get("errors"):
        lines += ["", "## Errors", "", *(f"- {e}" for e in data["errors"])]
    return "\n".join(lines) + "\n"


def goals(data: dict) -> list[str]:
    out = []
    for r in data["presets"]:
        jax_tps = r["train"][JAX]["tokens_per_s"]
        if data["run"]["device"] == "cpu":
            eager = r["train"][EAGER]["tokens_per_s"]
            least = training_goal(data["machine"]["cpu"], r["preset"])
            out.append(
                f"- {r['preset']} training step, jaxllm >= {least}x torch_ref eager on this CPU: "
                f"{ratio(jax_tps, eager)} ({mark(jax_tps >= least * eager)})"
            )
            for batch, rates in r["decode"].items():
                best = max(rates[EAGER]["tokens_per_s"], rates[COMPILED]["tokens_per_s"])
                ok = rates[JAX]["tokens_per_s"] >= best
                out.append(
                    f"- {r['preset']} decode batch {batch}, jaxllm >= torch_ref: "
                    f"{ratio(rates[JAX]['tokens_per_s'], best)} the faster torch_ref ({mark(ok)})"
                )
        else:
            compiled = r["train"][COMPILED]["tokens_per_s"]
            line = f"- {r['preset']}: jaxllm {ratio(jax_tps, compiled)} torch.compile ({mark(jax_tps >= compiled)})"
            if r["preset"] == "gpt2-124m":
                mfu = r["train"][JAX]["mfu"]
                line += f"; MFU {mfu:.1%} (goal >= 45%: {mark(mfu >= 0.45)})"
            out.append(line)
    return out


def mark(ok: bool) -> str:
    return "met" if ok else "NOT met"


def plot(data: dict, path: Path) -> None:
    """Three panels: training tokens/s, forward latency, decode tokens/s; bars per implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = data["presets"]
    panels = [
        ("training tokens/s (higher is better)", [(r["preset"], r["train"]) for r in results], "tokens_per_s"),
        ("forward latency, ms (lower is better)", [(r["preset"], r["forward"]) for r in results], "median_s"),
        (
            "decode tokens/s (higher is better)",
            [(f"{r['preset']} b{b}", rates) for r in results for b, rates in r["decode"].items()],
            "tokens_per_s",
        ),
    ]
    order = [JAX, SYSTEM_MALLOC, EAGER, COMPILED]
    colors = {JAX: "tab:blue", SYSTEM_MALLOC: "lightsteelblue", EAGER: "tab:orange", COMPILED: "tab:red"}
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (title, groups, key) in zip(axes, panels, strict=True):
        names = [name for name in order if any(name in stats for _, stats in groups)]
        ax.set_title(title)
        if not names:  # not measured yet
            continue
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            xs, ys = [], []
            for g, (_, stats) in enumerate(groups):
                if name in stats:
                    value = stats[name][key] * (1e3 if key == "median_s" else 1)
                    xs.append(g + (i - (len(names) - 1) / 2) * width)
                    ys.append(value)
            if xs:
                ax.bar(xs, ys, width, label=name, color=colors[name])
        ax.set_xticks(range(len(groups)), [g for g, _ in groups])
        ax.set_yscale("log")
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    run = data["run"]
    fig.suptitle(f"jaxllm vs torch_ref, {run['device']} {run['dtype']}: {data['machine']['cpu']}"
                 + (f", {data['machine']['gpu']}" if data["machine"].get("gpu") else ""))  # fmt: skip
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def write(data: dict, out: Path, name: str) -> None:
    add_mfu(data["presets"], data["run"]["peak_flops"])
    data["run"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
    write_results(name, data, markdown(data), out)
    plot(data, out / f"{name}.png")


def main() -> None:
    jaxllm.keep_freed_host_memory()  # an entry point that runs XLA on the CPU: before its first JAX work
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--presets", nargs="+", choices=list(SHAPES["cpu"]), help="default: cpu mini advanced, cuda all"
    )
    parser.add_argument("--reps", type=int, default=7, help="timings per figure (median reported)")
    parser.add_argument("--decode-batches", nargs="*", type=int, default=[1, 16], help="none: no decode figures")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="trace training steps of the first preset")
    parser.add_argument("--name", help="results file name (default: speed_<cpu>, or speed_cuda on a GPU)")
    parser.add_argument("--under-load", action="store_true",
                        help="time at once, not waiting for quiet cores (the results say so)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="folder for the results files (default: benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny shapes, 2 timings; files with --out")
    parser.add_argument("--train-only", nargs=2, metavar=("PRESET", "IMPL"), help=argparse.SUPPRESS)  # a child
    args = parser.parse_args()
    if args.train_only:
        print(json.dumps(train_only(*args.train_only, args.reps, args.under_load)))
        return
    if args.device == "cuda" and not (torch.cuda.is_available() and jax.default_backend() == "gpu"):
        sys.exit("error: --device cuda needs a GPU that both torch and JAX see")
    presets = args.presets or (["mini", "advanced"] if args.device == "cpu" else list(SHAPES["cuda"]))
    reps = 2 if args.quick else args.reps
    dtype = "float32" if args.device == "cpu" else "bfloat16"
    info = machine_info(("jax", "jaxlib", "flax", "torch", "numpy"))
    peak_flops, peak_source, measured = peak(args.device, dtype)
    command = " ".join(["python -m benchmarks.speed", *sys.argv[1:]])
    run = {
        "device": args.device, "dtype": dtype, "reps": reps, "command": command, "peak_flops": peak_flops,
        "peak_source": peak_source, "cpu_matmul_flops": measured, "torch_threads": torch.get_num_threads(),
        "jax_backend": jax.default_backend(), "malloc_settings_applied": jaxllm.keep_freed_host_memory(),
        "under_load": args.under_load,
    }  # fmt: skip
    data = {"machine": info, "run": run, "presets": [], "errors": []}
    name = args.name or (f"speed_{cpu_slug(info['cpu'])}" if args.device == "cpu" else "speed_cuda")
    out = args.out or (None if args.quick else RESULTS)
    done: list[dict] = []

    def save(partial_result: dict) -> None:  # rewrite the files with every figure measured so far
        data["presets"] = [*done, partial_result]
        if out is not None:
            write(data, out, name)

    for preset in presets:
        try:
            profile = args.profile if preset == presets[0] else None
            done.append(
                bench_preset(preset, args.device, reps, args.decode_batches, args.quick, save, args.under_load, profile)
            )
        except Exception as e:  # one preset failing (on a GPU met once) must not lose the others
            traceback.print_exc()
            data["errors"].append(f"{preset}: {type(e).__name__}: {e}"[:500])
        data["presets"] = list(done)
        if out is not None and data["errors"]:
            write(data, out, name)
    add_mfu(data["presets"], peak_flops)
    print("\n".join(goals(data)))
    print(f"wrote {out / name}.{{json,md,png}}" if out is not None else "quick run: no files written")
    if data["errors"]:
        sys.exit("errors: " + "; ".join(data["errors"]))


if __name__ == "__main__":
    main()
