"""Data pipeline speed: `python -m benchmarks.data_speed [--repeats N]`.

Measures (1) preprocessing of the full default corpus (the standard library's .py files) with the
mini preset's BPE (vocab 1000), on 1 worker and on all cores, against the plain `tokenizers` encoder
on a slice; (2) loader throughput (tokens/s) of jaxllm's grain loader and torch_ref's batches.
Writes benchmarks/results/data_speed.json and .md. Goals: preprocess >= 10 MB/s, loader >= 2M tok/s.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

from jaxllm.data import make_loader
from jaxllm.data.corpus import default_corpus
from jaxllm.data.preprocess import default_workers, preprocess
from jaxllm.data.tokenizer import load_tokenizer, reference_encoder

RESULTS = Path(__file__).parent / "results"
LOADER_CASES = [(64, 32), (256, 64), (1024, 8)]  # (context, global batch); the first is the mini preset's


def machine() -> dict[str, object]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    versions = {p: metadata.version(p) for p in ("jax", "grain", "tokenizers", "tiktoken", "numpy", "torch")}
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": default_workers(),
        "python": platform.python_version(),
        "load_average_at_start": os.getloadavg()[0],
        **versions,
    }


def idle_fraction(seconds: float = 1.0) -> float:
    """Share of all cores' time spent idle over the next `seconds` (from /proc/stat)."""

    def sample() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    idle0, total0 = sample()
    time.sleep(seconds)
    idle1, total1 = sample()
    return (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(limit_s: float) -> float:
    """Wait (up to `limit_s`) until the machine is >= 90% idle; returns the last idle share seen."""
    deadline = time.monotonic() + limit_s
    idle = idle_fraction()
    while idle < 0.9 and time.monotonic() < deadline:
        idle = idle_fraction()
    return idle


def bench_preprocess(workdir: Path, workers: int, repeats: int, wait_s: float) -> dict[str, object]:
    runs, idles, cpu = [], [], []
    for i in range(repeats):
        idles.append(wait_for_idle(wait_s))
        cpu0 = time.process_time()
        result = preprocess(
            [], workdir / f"w{workers}-{i}", vocab_size=1000, workers=workers, on_warning=lambda _: None
        )
        cpu.append(time.process_time() - cpu0)
        runs.append(result)
    best = max(runs, key=lambda r: r.mb_per_s)
    meta = best.meta
    return {
        "workers": workers,
        "encoder": best.encoder,
        "input_mb": meta.input_bytes / 1e6,
        "documents": meta.documents,
        "tokens": meta.tokens("train") + meta.tokens("val"),
        "best_s": min(r.seconds for r in runs),
        "median_s": statistics.median(r.seconds for r in runs),
        "best_mb_per_s": best.mb_per_s,
        "median_mb_per_s": statistics.median(r.mb_per_s for r in runs),
        "cpu_s_per_run": statistics.median(cpu),
        "idle_before_runs": [round(x, 2) for x in idles],
    }


def bench_plain_tokenizers(data_dir: Path, slice_mb: float = 4.0) -> dict[str, object]:
    """The plain path: `tokenizers` encode_batch (its own thread pool) on a slice of the corpus."""
    sources = default_corpus(lambda _: None).sources
    texts, size = [], 0
    for s in sources[::7]:
        if size >= slice_mb * 1e6:
            break
        data = s.read_bytes()
        texts.append(data.decode("utf-8", "replace"))
        size += len(data)
    tok = load_tokenizer(data_dir / "tokenizer.json")
    start = time.perf_counter()
    tok.encode_batch(texts, add_special_tokens=False)
    seconds = time.perf_counter() - start
    assert reference_encoder(tok, np.dtype(np.uint16)).name == "tokenizers"
    return {"slice_mb": size / 1e6, "seconds": seconds, "mb_per_s": size / 1e6 / seconds}


def bench_loader(data_dir: Path, seconds: float = 2.0) -> list[dict[str, object]]:
    from torch_ref.data import TorchBatches

    rows = []
    for context, batch in LOADER_CASES:
        for name, make in [
            ("jaxllm (grain)", lambda c=context, b=batch: make_loader(data_dir, "train", c, b, 0, 0, 1)),
            ("torch_ref", lambda c=context, b=batch: TorchBatches(data_dir, "train", c, b, 0)),
        ]:
            it = make()
            next(it)  # warm up: threads started, first epoch order computed
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                n += next(it).numel() if name == "torch_ref" else next(it).size
            rate = n / (time.perf_counter() - start)
            rows.append({"loader": name, "context": context, "global_batch": batch, "tokens_per_s": rate})
    return rows


def markdown(results: dict) -> str:
    m = results["machine"]
    lines = [
        "# Data pipeline speed",
        "",
        f"`python -m benchmarks.data_speed` on {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), "
        f"Python {m['python']}, jax {m['jax']}, grain {m['grain']}, tokenizers {m['tokenizers']}, "
        f"tiktoken {m['tiktoken']}, numpy {m['numpy']}, torch {m['torch']}; load average "
        f"{m['load_average_at_start']:.1f} at start. Other work on the machine slows every wall-clock figure: "
        "each preprocess run first waits (a while) for an idle machine, and the idle share seen is listed.",
        "",
        "## Preprocess: the full default corpus, BPE vocab 1000 (goal >= 10 MB/s)",
        "",
        "| workers | encoder | input MB | documents | tokens | best s | best MB/s | median MB/s | CPU s/run "
        "| idle share before runs |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in results["preprocess"]:
        lines.append(
            f"| {r['workers']} | {r['encoder']} | {r['input_mb']:.1f} | {r['documents']:,} | {r['tokens']:,} "
            f"| {r['best_s']:.2f} | **{r['best_mb_per_s']:.1f}** | {r['median_mb_per_s']:.1f} "
            f"| {r['cpu_s_per_run']:.2f} | {', '.join(f'{x:.0%}' for x in r['idle_before_runs'])} |"
        )
    p = results["plain_tokenizers"]
    lines += [
        "",
        f"Whole runs (find files, train the BPE on a 2 MiB sample, encode, write), best of "
        f"{results['repeats']}. For comparison, plain `tokenizers` `encode_batch` (all cores) encodes "
        f"{p['slice_mb']:.1f} MB of the corpus at {p['mb_per_s']:.1f} MB/s, without training or writing.",
        "",
        "## Loader: tokens/s delivered to the training loop, one process (goal >= 2M tokens/s)",
        "",
        "| loader | context | global batch | tokens/s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in results["loader"]:
        lines.append(f"| {r['loader']} | {r['context']} | {r['global_batch']} | {r['tokens_per_s'] / 1e6:.1f}M |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="preprocess runs per setting (default 3)")
    parser.add_argument(
        "--wait-idle", type=float, default=60, metavar="S", help="wait up to S s for an idle machine before each run"
    )
    args = parser.parse_args()
    results: dict[str, object] = {"machine": machine(), "repeats": args.repeats}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        results["preprocess"] = [
            bench_preprocess(workdir, w, args.repeats, args.wait_idle) for w in sorted({1, default_workers()})
        ]
        data_dir = workdir / f"w{default_workers()}-0"
        results["plain_tokenizers"] = bench_plain_tokenizers(data_dir)
        results["loader"] = bench_loader(data_dir)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "data_speed.json").write_text(json.dumps(results, indent=2) + "\n")
    text = markdown(results)
    (RESULTS / "data_speed.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
