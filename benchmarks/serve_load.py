"""Serving under load: aggregate tokens/s and latency at 1, 4, 16 and 32 concurrent clients, `mini` on this CPU.

    python -m benchmarks.serve_load            # the full run (a few minutes)
    python -m benchmarks.serve_load --quick    # a smoke run

Starts the real server (`jaxllm serve`: waitress on 127.0.0.1, a free port) over `mini` with random
weights and a byte-level BPE tokenizer (vocab 1000) trained here on part of this Python's standard
library: the model's text is noise, its cost is that of the real `mini`. Each client is a thread
with its own keep-alive connection, sending completion requests back to back for `--seconds` per
level after a warm-up: prompts of 3-12 tokens, `max_tokens` 48, temperature 0.8, a seed per request.
Two modes per level: plain JSON responses, and streams (SSE, with time to first token). The clients
run in this process, on the same cores as the server.

tokens/s = completion tokens returned (`usage`) / wall time of the level; latency = request sent to
response read; mean batch = busy slots per decode call, from the server's /metrics.
Writes benchmarks/results/serve_load.json and .md.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import re
import select
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPTS = [
    "def main():",
    "import os\nimport sys\n",
    "class Parser:\n    def __init__(self",
    "# Copyright",
    "for i in range(",
    "return self._",
    "if __name__ == '__main__':",
    "    except ValueError as err:",
]
LEVELS = (1, 4, 16, 32)


def make_checkpoint(root: Path) -> Path:
    """`mini` with random weights and a BPE tokenizer trained on a slice of the standard library."""
    from jaxllm import ModelConfig, init_params, save_params
    from jaxllm.data.tokenizer import train_bpe

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="replace") for p in sorted(stdlib.glob("*.py"))[:60]]
    cfg = ModelConfig.preset("mini")
    tok = train_bpe(texts, cfg.vocab_size)
    out = save_params(root / "mini", cfg, init_params(cfg, 0))
    tok.save(str(out / "tokenizer.json"))
    return out


def start_server(checkpoint: Path, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, int]:
    argv = [sys.executable, "-m", "jaxllm.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
            "--slots", str(args.slots), "--steps-per-call", str(args.steps_per_call), "--max-queue", "256"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 300)
    line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}\n{log.read_text()[-2000:]}")
    port = int(match.group(1))
    deadline = time.monotonic() + 300
    while request(port, "GET", "/ready")[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the server did not get ready\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, port


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    try:
        conn.request(method, path, None if body is None else json.dumps(body), {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, r.read()
    except ConnectionError:
        return 0, b""
    finally:
        conn.close()


def batch_counters(port: int) -> tuple[float, float]:
    """(decode calls, busy slots summed over them) from /metrics."""
    text = request(port, "GET", "/metrics")[1].decode()
    count = float(re.search(r"^jaxllm_batch_size_count (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    total = float(re.search(r"^jaxllm_batch_size_sum (\S+)$", text, re.M).group(1))  # type: ignore[union-attr]
    return count, total


class Client(threading.Thread):
    """Sends requests back to back on one keep-alive connection until `stop_at`, recording each one."""

    def __init__(self, port: int, index: int, stream: bool, max_tokens: int, stop_at: float):
        super().__init__(daemon=True)
        self.port, self.index, self.stream, self.max_tokens, self.stop_at = port, index, stream, max_tokens, stop_at
        self.records: list[tuple[float, float, int]] = []  # (latency s, time to first token s, tokens)
        self.errors = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        i = 0
        while time.monotonic() < self.stop_at:
            body = {"prompt": PROMPTS[(self.index + i) % len(PROMPTS)], "max_tokens": self.max_tokens,
                    "temperature": 0.8, "seed": self.index * 100_000 + i}  # fmt: skip
            if self.stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            i += 1
            start = time.perf_counter()
            try:
                conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
                r = conn.getresponse()
                if self.stream:
                    first, tokens = self._read_stream(r, start)
                else:
                    data = r.read()
                    first, tokens = float("nan"), json.loads(data)["usage"]["completion_tokens"]
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
                continue
            if r.status != 200:
                self.errors += 1
                continue
            self.records.append((time.perf_counter() - start, first, tokens))
        conn.close()

    def _read_stream(self, r: http.client.HTTPResponse, start: float) -> tuple[float, int]:
        first, tokens = float("nan"), 0
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[6:])
            if first != first and any(c["text"] for c in chunk["choices"]):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return first, tokens


def run_level(port: int, clients: int, stream: bool, seconds: float, max_tokens: int) -> dict:
    warm = [Client(port, i, stream, max_tokens, time.monotonic() + 1.0) for i in range(clients)]
    for c in warm:
        c.start()
    for c in warm:
        c.join()
    calls0, busy0 = batch_counters(port)
    start = time.monotonic()
    workers = [Client(port, i, stream, max_tokens, start + seconds) for i in range(clients)]
    for c in workers:
        c.start()
    for c in workers:
        c.join()
    wall = time.monotonic() - start
    calls1, busy1 = batch_counters(port)
    records = [r for c in workers for r in c.records]
    latencies = sorted(r[0] for r in records)
    ttfts = sorted(r[1] for r in records if r[1] == r[1])
    tokens = sum(r[2] for r in records)
    return {
        "clients": clients,
        "mode": "stream" if stream else "json",
        "requests": len(records),
        "errors": sum(c.errors for c in workers),
        "tokens": tokens,
        "seconds": wall,
        "tokens_per_s": tokens / wall,
        "requests_per_s": len(records) / wall,
        "latency_p50_s": percentile(latencies, 50),
        "latency_p99_s": percentile(latencies, 99),
        "ttft_p50_s": percentile(ttfts, 50) if ttfts else None,
        "ttft_p99_s": percentile(ttfts, 99) if ttfts else None,
        "mean_batch": (busy1 - busy0) / (calls1 - calls0) if calls1 > calls0 else 0.0,
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def machine() -> dict:
    from importlib.metadata import version

    import jax
    import numpy as np

    cpu = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        cpu = next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name:")), cpu)
    except (OSError, subprocess.CalledProcessError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "numpy": np.__version__,
        "flask": version("flask"),
        "waitress": version("waitress"),
    }


def write_results(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps(results, indent=2) + "\n")
    m, s = results["machine"], results["settings"]
    lines = [
        "# Serving load (CPU)",
        "",
        f"Command: `{results['command']}`. `mini` (529k parameters, context 64) with random weights and a BPE "
        "tokenizer (vocab 1000) trained on part of the standard library; the real server (`jaxllm serve`, "
        f"waitress, loopback) with {s['slots']} slots, {s['steps_per_call']} decode steps per call. Clients: "
        f"threads in the benchmark process, back-to-back requests, `max_tokens` {s['max_tokens']}, "
        f"temperature 0.8; {s['seconds']:g} s per level after a 1 s warm-up.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores (shared by server and clients); Python {m['python']}, "
        f"jax {m['jax']} ({m['jax_backend']}), numpy {m['numpy']}, flask {m['flask']}, waitress {m['waitress']}. "
        f"Load average (1 min) before the run: {m['load_average_1min_before']:.2f}; after it, "
        f"{m['load_average_1min_after']:.2f} (the benchmark's own threads).",
        "",
        "| clients | mode | requests | tokens/s | vs 1 client | latency p50 | latency p99 | TTFT p50 | TTFT p99 "
        "| mean batch | errors |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    base = {r["mode"]: r["tokens_per_s"] for r in results["levels"] if r["clients"] == 1}
    for r in results["levels"]:
        ttft = (f"{r['ttft_p50_s'] * 1e3:.0f} ms", f"{r['ttft_p99_s'] * 1e3:.0f} ms") if r["ttft_p50_s"] else ("-", "-")
        lines.append(
            f"| {r['clients']} | {r['mode']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base[r['mode']]:.2f}x | {r['latency_p50_s'] * 1e3:.0f} ms | "
            f"{r['latency_p99_s'] * 1e3:.0f} ms | {ttft[0]} | {ttft[1]} | {r['mean_batch']:.1f} | {r['errors']} |"
        )
    goal = {r["mode"]: r["tokens_per_s"] / base[r["mode"]] for r in results["levels"] if r["clients"] == 16}
    lines += [
        "",
        "Goal: at 16 clients, at least 5x the tokens/s of 1 client: "
        + ", ".join(f"{mode} {x:.2f}x ({'met' if x >= 5 else 'not met'})" for mode, x in goal.items())
        + ".",
    ]
    (RESULTS / "serve_load.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per level")
    parser.add_argument("--seconds", type=float, default=10.0, help="per level and mode (default 10)")
    parser.add_argument("--slots", type=int, default=32, help="server slots (default 32)")
    parser.add_argument("--steps-per-call", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        proc, port = start_server(checkpoint, args, Path(tmp) / "server.log")
        try:
            levels = [
                run_level(port, n, stream, seconds, args.max_tokens) for n in args.levels for stream in (False, True)
            ]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    results = {
        "command": "python -m benchmarks.serve_load" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        "machine": {
            **machine(),
            "load_average_1min_before": load_before,
            "load_average_1min_after": os.getloadavg()[0],
        },
        "settings": {
            "slots": args.slots,
            "steps_per_call": args.steps_per_call,
            "max_tokens": args.max_tokens,
            "seconds": seconds,
        },
        "levels": levels,
    }
    write_results(results)
    print((RESULTS / "serve_load.md").read_text())


if __name__ == "__main__":
    main()
