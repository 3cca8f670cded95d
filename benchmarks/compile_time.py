"""Compile time and step time of the layer loop vs `model.scan_layers` (one `nn.scan` over the blocks).

    python -m benchmarks.compile_time            # compile at 8, 16, 32 layers; step times of the presets
    python -m benchmarks.compile_time --quick    # a smoke run (8 and 16 layers, fewer steps)

1. Compile: a small-width Llama-family model (d_model 64, 4 heads / 2 kv heads, vocab 256, context
   64, batch 8) at 8, 16 and 32 layers. For the jitted training step (AdamW, `jaxllm.train_step`)
   and the forward pass: seconds to trace + lower (`jit(...).lower`) and to compile (`.compile()`),
   from abstract shapes, on one device. Goal: scanned 32-layer compile <= 1.5x the scanned 8-layer one.
2. Step time: each preset's training step at its own width and depth, scanned vs unrolled, at a
   batch x context that fits this machine (given in the table). The two are timed in alternating
   rounds, so load from other work falls on both; the median step of each is reported.
3. Decode: `advanced`'s shape (8 layers) with 8 slots and a 1024-position KV cache, decode steps
   (`jaxllm.slots.decode`) from position 500, unrolled (one cache per layer) vs scanned (one cache
   with a layer axis, scanned over with the params), alternating rounds.

Writes benchmarks/results/compile_time.json and .md (`--decode-only` re-measures section 3 into them).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import describe, machine_info, write_results
from jaxllm.config import ModelConfig, TrainConfig
from jaxllm.model import abstract_params, forward, init_params
from jaxllm.optim import make_optimizer
from jaxllm.train_step import init_state, train_step

SMALL = ModelConfig(
    name="small-width", family="llama", vocab_size=256, context_length=64, d_model=64, n_layers=8,
    n_heads=4, n_kv_heads=2, d_ff=128,
)  # fmt: skip
BATCH = 8
# preset -> (batch, context) for the step timing: what fits a 2-core CPU in seconds per step.
STEP_SHAPES = {"mini": (32, 64), "advanced": (4, 256), "gpt2-124m": (2, 256)}


def compile_seconds(cfg: ModelConfig) -> dict[str, float]:
    """Trace+lower and compile seconds of the training step and of the forward pass."""
    optimizer = make_optimizer(TrainConfig())
    state = jax.eval_shape(lambda: init_state(abstract_params(cfg), optimizer))
    batch = jax.ShapeDtypeStruct((BATCH, cfg.context_length + 1), jnp.int32)
    tokens = jax.ShapeDtypeStruct((BATCH, cfg.context_length), jnp.int32)
    out = {}
    cases = {
        "train": (jax.jit(partial(train_step, cfg, TrainConfig(), optimizer), donate_argnums=0), (state, batch)),
        "forward": (jax.jit(partial(forward, cfg)), (state["params"], tokens)),
    }
    for name, (fn, args) in cases.items():
        t0 = time.perf_counter()
        lowered = fn.lower(*args)
        t1 = time.perf_counter()
        lowered.compile()
        t2 = time.perf_counter()
        out[f"{name}_lower_s"], out[f"{name}_compile_s"] = t1 - t0, t2 - t1
    return out


def step_times(cfg: ModelConfig, batch: int, context: int, steps: int) -> dict[str, float]:
    """Median seconds per training step, unrolled vs scanned, timed in alternating rounds."""
    cfg = cfg.replace(context_length=context)
    tcfg = TrainConfig()
    optimizer = make_optimizer(tcfg)
    data = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, context + 1)), jnp.int32)
    runs = {}
    for scan in (False, True):
        c = cfg.replace(scan_layers=scan)
        fn = jax.jit(partial(train_step, c, tcfg, optimizer), donate_argnums=0)
        state = init_state(init_params(c, 0), optimizer)
        state, m = fn(state, data)  # compile + warm up
        jax.block_until_ready(m)
        runs[scan] = [fn, state, []]
    for _ in range(steps):
        for scan in (False, True):
            fn, state, times = runs[scan]
            t0 = time.perf_counter()
            state, m = fn(state, data)
            jax.block_until_ready((state, m))
            times.append(time.perf_counter() - t0)
            runs[scan][1] = state
    return {
        "unrolled_ms": 1e3 * statistics.median(runs[False][2]),
        "scanned_ms": 1e3 * statistics.median(runs[True][2]),
    }


def decode_times(rounds: int, slots: int = 8, cache_len: int = 1024, steps: int = 16) -> dict[str, float]:
    """Median ms per decode step of `advanced` (context 1024), unrolled vs scanned, alternating rounds."""
    import jaxllm.slots as engine
    from jaxllm.model import to_layout

    cfg = ModelConfig.preset("advanced").replace(context_length=cache_len)
    params = init_params(cfg, 0)
    start = cache_len // 2 - steps  # every round decodes the same positions (the state is donated: fresh arrays)
    runs = {}
    for scan in (False, True):
        c = cfg.replace(scan_layers=scan)
        state = engine.init_state_jit(c, slots, cache_len, 1)
        state = state._replace(done_B=jnp.zeros((slots,), bool), end_B=jnp.full((slots,), cache_len, jnp.int32))
        runs[scan] = [c, to_layout(c, params), state, []]
    for i in range(rounds + 1):  # round 0 compiles
        for scan in (False, True):
            c, p, state, times = runs[scan]
            t0 = time.perf_counter()
            state = jax.block_until_ready(
                engine.decode_jit(c, p, state._replace(positions_B=jnp.full((slots,), start, jnp.int32)), steps)
            )
            if i:
                times.append((time.perf_counter() - t0) / steps)
            runs[scan][2] = state
    return {
        "slots": slots, "cache_len": cache_len, "n_layers": cfg.n_layers,
        "unrolled_ms": 1e3 * statistics.median(runs[False][3]), "scanned_ms": 1e3 * statistics.median(runs[True][3]),
    }  # fmt: skip


def markdown(data: dict) -> str:
    info = data["machine"]
    lines = [
        "# Compile time: the layer loop vs `model.scan_layers`",
        "",
        f"`python -m benchmarks.compile_time{' --quick' if data['quick'] else ''}` on {describe(info)}, "
        f"{data['load_average_at_end']:.2f} at end. Other engineers' jobs shared the 2 cores: every "
        "figure is measured under load (ratios within one run are what count).",
        "",
        f"## Compile (small width: d_model {SMALL.d_model}, {SMALL.n_heads}/{SMALL.kv_heads} heads, vocab "
        f"{SMALL.vocab_size}, batch {BATCH} x context {SMALL.context_length}; one device; seconds)",
        "",
        "| layers | layout | train step: trace+lower | train step: compile | forward: trace+lower | forward: compile |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in data["compile"]:
        lines.append(
            f"| {r['n_layers']} | {'scanned' if r['scan_layers'] else 'unrolled'} | {r['train_lower_s']:.2f} | "
            f"{r['train_compile_s']:.2f} | {r['forward_lower_s']:.2f} | {r['forward_compile_s']:.2f} |"
        )
    g = data["goal"]
    lines += [
        "",
        f"Scanned training step, lower + compile: {g['scanned_max_layers']} layers / 8 layers = "
        f"**{g['scanned_ratio']:.2f}x** (goal <= 1.5x: {'met' if g['scanned_ratio'] <= 1.5 else 'NOT met'}); "
        f"unrolled: {g['unrolled_ratio']:.2f}x.",
        "",
        f"## Training step time per preset (median of {data['rounds']} alternating rounds, ms; AdamW, float32)",
        "",
        "| preset | layers | batch x context | unrolled | scanned | scanned / unrolled |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in data["steps"]:
        ratio = r["scanned_ms"] / r["unrolled_ms"]
        lines.append(
            f"| {r['preset']} | {r['n_layers']} | {r['batch']} x {r['context']} | {r['unrolled_ms']:.1f} | "
            f"{r['scanned_ms']:.1f} | {ratio:.2f} |"
        )
    if "decode" in data:
        d = data["decode"]
        lines += [
            "",
            f"## Decode step (advanced: {d['n_layers']} layers, {d['slots']} slots, "
            f"{d['cache_len']}-position KV cache; median ms per step)",
            "",
            "| unrolled (a cache per layer) | scanned (one cache, layer axis) | scanned / unrolled |",
            "| ---: | ---: | ---: |",
            f"| {d['unrolled_ms']:.1f} | {d['scanned_ms']:.1f} | {d['scanned_ms'] / d['unrolled_ms']:.2f} |",
            "",
            "The scan reads each layer's cache out of the stacked array and writes the updated layer back "
            "(`lax.scan`'s xs -> ys), where the loop updates each cache in place: decode pays extra passes over "
            "the whole cache every step.",
        ]
    lines += [
        "",
        "Each preset's `scan_layers` in `jaxllm/configs/*.yaml` is whichever layout was faster here; a tie "
        "within noise keeps the loop (unrolled), which decodes without the scan's per-step cache copy.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="8 and 16 layers, fewer timed steps")
    parser.add_argument(
        "--presets", nargs="*", default=["mini", "advanced", "gpt2-124m"], help="presets whose steps to time"
    )
    parser.add_argument("--steps", type=int, default=6, help="timed rounds per preset")
    parser.add_argument("--decode-only", action="store_true", help="re-measure the decode section into the results")
    args = parser.parse_args()
    if args.decode_only:
        import json

        from benchmarks.machine import RESULTS

        data = json.loads((RESULTS / "compile_time.json").read_text())
        data["decode"] = decode_times(args.steps)
        data["decode"]["machine"] = machine_info(("jax", "jaxlib", "flax", "numpy"))
        data["decode"]["load_average_at_end"] = round(os.getloadavg()[0], 2)
        write_results("compile_time", data, markdown(data))
        print(data["decode"])
        return
    info = machine_info(("jax", "jaxlib", "flax", "numpy"))
    depths = (8, 16) if args.quick else (8, 16, 32)
    rows = []
    for n in depths:
        for scan in (False, True):
            rows.append(
                {"n_layers": n, "scan_layers": scan, **compile_seconds(SMALL.replace(n_layers=n, scan_layers=scan))}
            )
            print(rows[-1], flush=True)
    total = {(r["n_layers"], r["scan_layers"]): r["train_lower_s"] + r["train_compile_s"] for r in rows}
    deepest = max(depths)
    goal = {
        "scanned_max_layers": deepest,
        "scanned_ratio": total[(deepest, True)] / total[(8, True)],
        "unrolled_ratio": total[(deepest, False)] / total[(8, False)],
    }
    rounds = 3 if args.quick else args.steps
    steps = []
    for preset in args.presets:
        cfg = ModelConfig.preset(preset)
        batch, context = STEP_SHAPES[preset]
        times = step_times(cfg, batch, context, rounds)
        steps.append({"preset": preset, "n_layers": cfg.n_layers, "batch": batch, "context": context, **times})
        print(steps[-1], flush=True)
    decode = decode_times(rounds)
    print(decode, flush=True)
    data = {"machine": info, "quick": args.quick, "compile": rows, "goal": goal, "steps": steps, "rounds": rounds,
            "decode": decode,
            "load_average_at_end": round(os.getloadavg()[0], 2)}  # fmt: skip
    md = markdown(data)
    write_results("compile_time", data, md)
    print(md)


if __name__ == "__main__":
    main()
