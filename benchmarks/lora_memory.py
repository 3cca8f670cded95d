"""Peak host memory of full fine-tuning vs LoRA on the SmolLM2-135M shape (random weights, CPU, float32).

    python -m benchmarks.lora_memory                       # batch 2 x context 128, 3 steps each
    python -m benchmarks.lora_memory --batch 4 --context 256 --steps 2

Each variant runs in a fresh subprocess (`--child`), so its peak RSS is its own: set-up, the jitted
train step of `jaxllm.train.sharded_train_step` on one device (state donated, as in `jaxllm train`),
compiled ahead of time, then `--steps` updates. Reports the peak RSS of the
steps alone (VmHWM reset after compiling), the peak of the whole process (with compilation), the RSS
before compiling, and the bytes of the base params, the trained params and the optimizer state. Writes
benchmarks/results/lora_memory.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

# The SmolLM2-135M shape (as `jaxllm import-gguf` writes its config.yaml; see docs/models.md).
SMOLLM2 = {"name": "SmolLM2-135M-shape", "family": "llama", "vocab_size": 49152, "context_length": 8192,
           "d_model": 576, "n_layers": 30, "n_heads": 9, "n_kv_heads": 3, "d_ff": 1536, "tie_embeddings": True,
           "rope_theta": 100000.0}  # fmt: skip
VARIANTS = {
    "full fine-tuning": [],
    "LoRA r=8 on query,value": ["train.lora_rank=8", "train.lora_targets=[query,value]"],
    "LoRA r=8 on all": ["train.lora_rank=8", "train.lora_targets=all"],
}


def rss_bytes(which: str) -> int:
    """"peak": the process's peak RSS (getrusage); "now": VmRSS; "hwm": VmHWM, the peak since the last
    `reset_hwm()` (Linux)."""
    if which == "peak":
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    field = {"now": "VmRSS:", "hwm": "VmHWM:"}[which]
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) * 1024
    return 0


def reset_hwm() -> None:
    """Hand freed heap back to the system (jaxllm keeps it, jaxllm/host_memory.py: compilation's would
    count as the steps'), then reset VmHWM to the current RSS."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")


def child(overrides: list[str], batch: int, context: int, steps: int, model: dict) -> dict:
    """One variant, in this process: train `steps` updates; the memory figures."""
    import jax
    import numpy as np

    from jaxllm import lora
    from jaxllm.config import Config
    from jaxllm.model import init_params
    from jaxllm.optim import make_optimizer
    from jaxllm.sharding import make_mesh, param_shardings, tracing_on
    from jaxllm.train import sharded_train_step
    from jaxllm.train_step import init_state

    train = {"batch_size": batch, "warmup_steps": 1, "steps": steps, **_parse(overrides)}
    config = Config.model_validate({"model": model, "train": train, "mesh": {"data": 1}})
    mesh = make_mesh(config.mesh, jax.devices()[:1])
    optimizer = make_optimizer(config.train)
    step_fn, state_sh, batch_sh = sharded_train_step(config, mesh, optimizer)
    nbytes = lambda tree: sum(x.nbytes for x in jax.tree.leaves(tree))  # noqa: E731
    base = jax.device_put(init_params(config.model, 0), param_shardings(config.model, mesh))
    if lora.enabled(config.train):
        trained, frozen = lora.init_adapters(config.model, config.train), (base,)
    else:
        trained, frozen = base, ()
    state = jax.device_put(init_state(trained, optimizer), state_sh)
    sizes = {"base_params_bytes": nbytes(base), "trained_params_bytes": nbytes(state["params"]),
             "optimizer_state_bytes": nbytes(state["opt_state"])}  # fmt: skip
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, config.model.vocab_size, (batch, context + 1), dtype=np.int32) for _ in range(steps)]
    with tracing_on(mesh):
        rss_before = rss_bytes("now")
        t0 = time.perf_counter()
        compiled = step_fn.lower(state, jax.device_put(batches[0], batch_sh), *frozen).compile()
        compile_s = time.perf_counter() - t0
        peak_compile = rss_bytes("peak")
        reset_hwm()  # from here on: the training steps' own peak, compilation's apart
        times, loss = [], []
        for tokens in batches:
            t0 = time.perf_counter()
            state, metrics = compiled(state, jax.device_put(tokens, batch_sh), *frozen)
            loss.append(float(metrics["loss"]))
            times.append(time.perf_counter() - t0)
    peaks = {"peak_rss_steps_bytes": rss_bytes("hwm"), "peak_rss_bytes": max(peak_compile, rss_bytes("peak"))}
    return {**sizes, **peaks, "rss_before_compile_bytes": rss_before, "compile_s": compile_s, "step_s": times,
            "loss": loss}  # fmt: skip


def _parse(overrides: list[str]) -> dict:
    import yaml

    return {k.removeprefix("train."): yaml.safe_load(v) for k, v in (o.split("=", 1) for o in overrides)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--model", help="a config YAML whose model section to use (default: the SmolLM2-135M shape)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args()
    model = SMOLLM2
    if args.model:
        from jaxllm.config import ModelConfig

        model = ModelConfig.from_yaml(args.model).to_dict()
    if args.child is not None:
        print(json.dumps(child(json.loads(args.child), args.batch, args.context, args.steps, model)))
        return
    rows = {}
    for name, overrides in VARIANTS.items():
        cmd = [sys.executable, "-m", "benchmarks.lora_memory", "--child", json.dumps(overrides),
               "--batch", str(args.batch), "--context", str(args.context), "--steps", str(args.steps),
               *(["--model", args.model] if args.model else [])]  # fmt: skip
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])
        print(f"{name}: peak RSS {rows[name]['peak_rss_steps_bytes'] / 2**30:.2f} GiB in the steps", flush=True)
    report(rows, args, model)


def report(rows: dict, args: argparse.Namespace, model: dict) -> None:
    from benchmarks.machine import describe, machine_info, write_results

    info = machine_info()
    gib, mib = 2**30, 2**20
    full = rows["full fine-tuning"]
    lines = [
        "# Peak host memory: full fine-tuning vs LoRA (CPU, float32)",
        "",
        f"Command: `python -m benchmarks.lora_memory --batch {args.batch} --context {args.context} "
        f"--steps {args.steps}`. Model: {model['name']} ({model['n_layers']} layers, d_model "
        f"{model['d_model']}, vocab {model['vocab_size']}), random weights; AdamW; batch "
        f"{args.batch} x context {args.context}; {args.steps} jitted steps on one device; each variant in a fresh "
        "process (peak RSS: VmHWM, reset after compiling for the steps' own peak).",
        "",
        f"Machine: {describe(info)}. Step times were measured under load (a shared machine): not speed figures.",
        "",
        "| variant | peak RSS, steps | peak RSS, all (with compilation) | RSS before compiling | base params | "
        "trained params | optimizer state | optimizer state / full's | compile | step (median) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in rows.items():
        steps = sorted(r["step_s"])
        lines.append(
            f"| {name} | {r['peak_rss_steps_bytes'] / gib:.2f} GiB | {r['peak_rss_bytes'] / gib:.2f} GiB | "
            f"{r['rss_before_compile_bytes'] / gib:.2f} GiB | "
            f"{r['base_params_bytes'] / mib:.0f} MiB | {r['trained_params_bytes'] / mib:.2f} MiB | "
            f"{r['optimizer_state_bytes'] / mib:.2f} MiB | "
            f"{r['optimizer_state_bytes'] / full['optimizer_state_bytes']:.2%} | {r['compile_s']:.0f} s | "
            f"{steps[len(steps) // 2]:.1f} s |"
        )
    lines += [
        "",
        "LoRA keeps the base params (frozen, "
        "not in the optimizer) and folds the adapters into the kernels inside the loss (jaxllm/lora.py), so its "
        "step still holds the merged kernels and their gradients as temporaries; what it saves is the optimizer "
        "state (two moments per trained value) and the trained params' gradients kept across the update.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if not args.no_write:
        data = {"machine": info, "batch": args.batch, "context": args.context, "steps": args.steps, "model": model,
                "variants": {k: {**v, "overrides": VARIANTS[k]} for k, v in rows.items()}}  # fmt: skip
        write_results("lora_memory", data, text)


if __name__ == "__main__":
    main()
