"""`python -m benchmarks.decode_matmul`: a decode step's matmuls at batch 1, 8 and 32: XLA vs jaxllm's kernel.

    python -m benchmarks.decode_matmul               # SmolLM2-135M's 30 layers of q, o, gate, up, down
    python -m benchmarks.decode_matmul --quick       # 2 layers, no files

A decode step multiplies a few rows (the batch) by every weight matrix once. At batch 1 that is
memory-bound; at batch 8 the same bytes feed 8 times the arithmetic, which a CPU still does faster
than it reads the weights, so the ideal batch-8 step costs about the batch-1 one. This probe times,
inside one jitted function, every layer's q, o, gate, up and down matmul of SmolLM2-135M's shape
(random float32 weights, 394 MB, more than the caches), in two layouts:

- `x @ W` with W stored (in, out), as jaxllm's Dense keeps its kernels;
- `(W @ x.T).T` with W stored (out, in), as PyTorch keeps them;
- jaxllm's few-row kernel (`jaxllm.few_row_matmul`, what the model uses on the CPU for up to 32 rows)
  on the (in, out) weights, in float32 and with bfloat16 weights (half the bytes);
- the same kernel on the weights in the strips layout that `jaxllm generate` and `serve` hold them in
  (`jaxllm.decode_layout`: each 16-column strip contiguous (32 in bfloat16), on huge pages where the OS grants them).

Batches are timed in turn (median of `--reps`), and the weight bytes / time is set beside the read bandwidth
measured in the same run (`benchmarks.real_model.memory_bandwidth`). Writes
benchmarks/results/decode_matmul_<cpu>.json and .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.machine import RESULTS, cpu_slug, describe, machine_info, write_results
from benchmarks.real_model import describe_bandwidth, memory_bandwidth, read_bandwidth
from jaxllm import cpu_kernels, decode_layout, few_row_matmul

D, F = 576, 1536  # SmolLM2-135M's d_model and MLP width
SHAPES = [(D, D), (D, D), (D, F), (D, F), (F, D)]  # q, o, gate, up, down (in, out)
# name -> (weight layout, matmul, weight dtype)
VARIANTS = {
    "XLA x @ W (in, out)": ("in_out", "xla", "float32"),
    "XLA (W @ x.T).T (out, in)": ("out_in", "xla", "float32"),
    "jaxllm kernel (in, out)": ("in_out", "kernel", "float32"),
    "jaxllm kernel, bfloat16 W": ("in_out", "kernel", "bfloat16"),
    "jaxllm kernel, strips": ("strips", "kernel", "float32"),
    "jaxllm kernel, strips, bfloat16 W": ("strips", "kernel", "bfloat16"),
}


def weights(layers: int, layout: str, dtype: str) -> list[jax.Array]:
    rng = np.random.default_rng(0)
    out = []
    for _ in range(layers):
        for k, n in SHAPES:
            w = rng.standard_normal((k, n), np.float32) * 0.02
            out.append(jnp.asarray(w if layout != "out_in" else np.ascontiguousarray(w.T)).astype(dtype))
    return decode_layout.to_strips([(w, w.shape[0]) for w in out]) if layout == "strips" else out


def step_fn(layout: str, matmul: str):
    """All the matmuls of one decode step's layers, each from the same input rows; one scalar out."""

    def run(x_BD: jax.Array, ws: list[jax.Array]) -> jax.Array:
        total = jnp.float32(0)
        x_BF = jnp.tile(x_BD, (1, 3))[:, :F]
        for w in ws:
            k = w.shape[0] if layout == "in_out" else w.shape[1]
            x = x_BD if k == D else x_BF
            if layout == "strips":
                y = few_row_matmul.matmul_strips(x, w, jnp.float32)
            elif matmul == "kernel":
                y = few_row_matmul.kernel(x, w, False)
            else:
                y = x @ w if layout == "in_out" else (w @ x.T).T
            total = total + y[:, :8].sum()
        return total

    return jax.jit(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="2 layers, 2 repetitions, no files")
    args = parser.parse_args()
    layers, reps = (2, 2) if args.quick else (30, args.reps)
    info = machine_info(("jax", "jaxlib", "numpy"))
    probes = memory_bandwidth()
    bandwidth = read_bandwidth(probes)
    variants = {k: v for k, v in VARIANTS.items() if v[1] == "xla" or cpu_kernels.library() is not None}
    ws = {name: weights(layers, layout, dtype) for name, (layout, _, dtype) in variants.items()}
    fns = {name: step_fn(layout, matmul) for name, (layout, matmul, _) in variants.items()}
    nbytes = {name: sum(w.nbytes for w in ws[name]) for name in variants}
    params = sum(w.size for w in ws[next(iter(variants))])
    rows = []
    for batch in args.batches:
        x = jnp.asarray(np.random.default_rng(1).standard_normal((batch, D), np.float32))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for name in variants:
            fns[name](x, ws[name]).block_until_ready()  # compile
        for _ in range(reps):
            for name in variants:
                start = time.perf_counter()
                fns[name](x, ws[name]).block_until_ready()
                times[name].append(time.perf_counter() - start)
        for name, t in times.items():
            s = statistics.median(t)
            rows.append({"batch": batch, "layout": name, "median_s": s, "gb_per_s": nbytes[name] / s / 1e9,
                         "gflop_per_s": 2 * batch * params / s / 1e9})  # fmt: skip
            print(f"batch {batch:3d} {name:26s} {s * 1e3:8.1f} ms  {nbytes[name] / s / 1e9:5.1f} GB/s", flush=True)
    run = {"command": " ".join(["python -m benchmarks.decode_matmul", *sys.argv[1:]]), "layers": layers,
           "weight_bytes": 4 * params, "bandwidth_gb_s": bandwidth / 1e9, "reps": reps,
           "bandwidth_probes_gb_s": {k: v / 1e9 for k, v in probes.items()},
           "load_average_at_end": round(os.getloadavg()[0], 2)}  # fmt: skip
    md = markdown(info, run, rows)
    print(md)
    if not args.quick:
        write_results(
            f"decode_matmul_{cpu_slug(info['cpu'])}", {"machine": info, "run": run, "rows": rows}, md, RESULTS
        )


def markdown(info: dict, run: dict, rows: list[dict]) -> str:
    one = {r["layout"]: r["median_s"] for r in rows if r["batch"] == 1}
    lines = [
        "# A decode step's matmuls on the CPU: XLA's dots and jaxllm's few-row kernel (SmolLM2-135M's q, o, gate, "
        "up, down)",
        "",
        f"Command: `{run['command']}`. {run['layers']} layers, {run['weight_bytes'] / 1e6:.0f} MB of float32 "
        f"weights (half that in bfloat16), one jitted function, batches and variants in turn, medians of "
        f"{run['reps']}.",
        "",
        f"Machine: {describe(info)}; load average {run['load_average_at_end']} at end. Read bandwidth in this run "
        f"(the faster of two reads of 512 MB): {run['bandwidth_gb_s']:.1f} GB/s"
        + (f"; {describe_bandwidth(run['bandwidth_probes_gb_s'])}." if "bandwidth_probes_gb_s" in run else "."),
        "",
        "| batch | matmul | ms | weight GB/s | GFLOP/s | time vs batch 1 |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        vs_one = r["median_s"] / one.get(r["layout"], float("nan"))
        lines.append(f"| {r['batch']} | {r['layout']} | {r['median_s'] * 1e3:.1f} | {r['gb_per_s']:.1f} | "
                     f"{r['gflop_per_s']:.0f} | {vs_one:.2f}x |")  # fmt: skip
    lines += ["", "A memory-bound batch-8 step would cost about 1.0x the batch-1 one; the last column shows how far "
              "each is from that. Weight GB/s counts the bytes of the row's weight dtype."]  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
