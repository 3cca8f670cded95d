"""Serving under load: aggregate tokens/s and latency at 1, 4, 16 and 32 concurrent clients, `mini` on this CPU;
chat and scoring at 1 and 16 clients on a real chat model (SmolLM2-135M-Instruct).

    python -m benchmarks.serve_load            # the full run (a few minutes; chat rows need runs/smollm2)
    python -m benchmarks.serve_load --quick    # a smoke run

Starts the real server (`jaxllm serve`: waitress on 127.0.0.1, a free port) over `mini` with random
weights and a byte-level BPE tokenizer (vocab 1000) trained here on part of this Python's standard
library: the model's text is noise, its cost is that of the real `mini`. Each client is a thread
with its own keep-alive connection, sending completion requests back to back for `--seconds` per
level after a warm-up: prompts of 3-12 tokens, `max_tokens` 48, temperature 0.8, a seed per request.
Two modes per level: plain JSON responses, and streams (SSE, with time to first token). The clients
run in this process, on the same cores as the server.

Chat and scoring need a checkpoint with a chat template: `--chat-checkpoint` (default runs/smollm2,
which `make demo` imports from the SmolLM2 GGUF), served with `--max-context 256`, 16 slots, prefills of one prompt,
`--chat-seconds` (default 30) per level after a 5 s warm-up, scoring shapes compiled beforehand.
Chat: `POST /v1/chat/completions`, one user question, `max_tokens` 48, temperature 0.8 (answers may
end earlier, at the end of turn), JSON and streamed. Scoring: what lm-eval-harness's
`local-completions` sends, `POST /v1/completions` with `echo: true, logprobs: 1, max_tokens: 1,
temperature: 0` on English passages of 45-150 tokens. Skipped (with a note) when the checkpoint is
missing.

tokens/s = completion tokens returned (`usage`) / wall time of the level (scoring: prompt tokens
scored); latency = request sent to response read; mean batch = busy slots per decode call, from the
server's /metrics. Writes benchmarks/results/serve_load_<cpu>.json and .md (one pair per CPU model).
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

from benchmarks.machine import cpu_model, cpu_slug, cpu_topology, write_results

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
CHAT_LEVELS = (1, 16)
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for writing clear code.",
    "Why is the sky blue?",
    "Write a haiku about autumn.",
    "What is a prime number?",
    "How do I boil an egg?",
    "Explain recursion to a child.",
    "Name a few planets in the solar system.",
]
SENTENCES = [
    "The river rose quickly after three days of heavy rain in the hills.",
    "Farmers moved their animals to higher ground before the water reached the fields.",
    "By the end of the week the old stone bridge was the only road into town.",
    "A small library opened in the square, lending books to anyone who asked.",
    "Its shelves held novels, maps, cookbooks and a worn set of encyclopedias.",
    "Children came after school to read, and their parents came in the evening.",
    "The committee voted to repair the roof before the winter storms arrived.",
    "Scientists measured the temperature of the lake every morning for a year.",
    "They found that the surface warmed faster than the deep water below it.",
    "In the end, the results were published in a short paper with several charts.",
]
# Scoring prompts: 3 to 10 sentences (45-150 SmolLM2 tokens), as a multiple-choice context + continuation.
PASSAGES = [" ".join((SENTENCES * 2)[i : 2 * i + 3]) for i in range(8)]


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


def start_server(checkpoint: Path, flags: list[str], log: Path) -> tuple[subprocess.Popen, int]:
    argv = [sys.executable, "-m", "jaxllm.cli", "serve", "--checkpoint", str(checkpoint), "--port", "0",
            "--max-queue", "256", *flags]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log.open("w"), text=True, env=env)
    ready, _, _ = select.select([proc.stdout], [], [], 600)
    line = proc.stdout.readline() if ready else ""  # type: ignore[union-attr]
    match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not match:
        proc.kill()
        raise SystemExit(f"the server did not start: {line!r}\n{log.read_text()[-2000:]}")
    port = int(match.group(1))
    deadline = time.monotonic() + 900  # SmolLM2's warm-up compiles ~20 shapes of a 30-layer model
    while request(port, "GET", "/ready")[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise SystemExit(f"the server did not get ready\n{log.read_text()[-2000:]}")
        time.sleep(0.5)
    return proc, port


def request(port: int, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
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


def request_body(kind: str, index: int, i: int, max_tokens: int) -> tuple[str, dict]:
    """(path, body) of a client's i-th request: kind "completion", "chat" or "score" (lm-eval's scoring)."""
    seed = index * 100_000 + i
    if kind == "chat":
        messages = [{"role": "user", "content": QUESTIONS[(index + i) % len(QUESTIONS)]}]
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed}
        return "/v1/chat/completions", body
    if kind == "score":
        prompt = PASSAGES[(index + i) % len(PASSAGES)]
        return "/v1/completions", {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    prompt = PROMPTS[(index + i) % len(PROMPTS)]
    return "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.8, "seed": seed}


class Client(threading.Thread):
    """Sends requests back to back on one keep-alive connection until `stop_at`, recording each one."""

    def __init__(self, port: int, index: int, stream: bool, max_tokens: int, stop_at: float, kind: str = "completion"):
        super().__init__(daemon=True)
        self.port, self.index, self.stream, self.max_tokens, self.stop_at = port, index, stream, max_tokens, stop_at
        self.kind = kind
        self.records: list[tuple[float, float, int]] = []  # (latency s, time to first token s, tokens)
        self.errors = 0

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        i = 0
        counted = "prompt_tokens" if self.kind == "score" else "completion_tokens"
        while time.monotonic() < self.stop_at:
            path, body = request_body(self.kind, self.index, i, self.max_tokens)
            if self.stream:
                body |= {"stream": True, "stream_options": {"include_usage": True}}
            i += 1
            start = time.perf_counter()
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                r = conn.getresponse()
                if self.stream:
                    first, tokens = self._read_stream(r, start)
                else:
                    data = r.read()
                    first, tokens = float("nan"), json.loads(data)["usage"][counted]
            except (OSError, http.client.HTTPException, ValueError, KeyError):
                self.errors += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
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
            if first != first and any(c.get("text") or c.get("delta", {}).get("content") for c in chunk["choices"]):
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
        return first, tokens


def run_level(port: int, clients: int, stream: bool, seconds: float, max_tokens: int, kind: str = "completion",
              warmup: float = 1.0) -> dict:  # fmt: skip
    warm = [Client(port, i, stream, max_tokens, time.monotonic() + warmup, kind) for i in range(clients)]
    for c in warm:
        c.start()
    for c in warm:
        c.join()
    calls0, busy0 = batch_counters(port)
    start = time.monotonic()
    workers = [Client(port, i, stream, max_tokens, start + seconds, kind) for i in range(clients)]
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
        "mode": "score" if kind == "score" else ("chat " if kind == "chat" else "") + ("stream" if stream else "json"),
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
        "load_average_1min": os.getloadavg()[0],  # the machine is shared: what else ran during the level
    }


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, round(q / 100 * (len(sorted_values) - 1)))]


def machine() -> dict:
    from importlib.metadata import version

    import jax
    import numpy as np

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_topology": cpu_topology(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jax_backend": jax.default_backend(),
        "numpy": np.__version__,
        "flask": version("flask"),
        "waitress": version("waitress"),
    }


HEADER = [
    "| clients | mode | requests | tokens/s | vs 1 client | latency p50 | latency p99 | TTFT p50 | TTFT p99 "
    "| mean batch | errors | load |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def table(levels: list[dict]) -> list[str]:
    """The markdown rows of some levels, each mode compared with its own 1-client row."""
    base = {r["mode"]: r["tokens_per_s"] for r in levels if r["clients"] == 1}
    lines = list(HEADER)
    for r in levels:
        ttft = (f"{r['ttft_p50_s'] * 1e3:.0f} ms", f"{r['ttft_p99_s'] * 1e3:.0f} ms") if r["ttft_p50_s"] else ("-", "-")
        batch = f"{r['mean_batch']:.1f}" if r["mean_batch"] else "-"
        lines.append(
            f"| {r['clients']} | {r['mode']} | {r['requests']} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base[r['mode']]:.2f}x | {r['latency_p50_s'] * 1e3:.0f} ms | "
            f"{r['latency_p99_s'] * 1e3:.0f} ms | {ttft[0]} | {ttft[1]} | {batch} | {r['errors']} | "
            f"{r.get('load_average_1min', float('nan')):.1f} |"
        )
    return lines


def goal_line(levels: list[dict]) -> str:
    base = {r["mode"]: r["tokens_per_s"] for r in levels if r["clients"] == 1}
    goal = {r["mode"]: r["tokens_per_s"] / base[r["mode"]] for r in levels if r["clients"] == 16}
    return (
        "Goal: at 16 clients, at least 5x the tokens/s of 1 client: "
        + ", ".join(f"{mode} {x:.2f}x ({'met' if x >= 5 else 'not met'})" for mode, x in goal.items())
        + "."
    )


def markdown(results: dict) -> str:
    m, s = results["machine"], results["settings"]
    topology = f" ({m['cpu_topology']})" if m.get("cpu_topology") else ""  # results before it was recorded: none
    lines = [
        "# Serving load (CPU)",
        "",
        f"Command: `{results['command']}`. `mini` (529k parameters, context 64) with random weights and a BPE "
        "tokenizer (vocab 1000) trained on part of the standard library; the real server (`jaxllm serve`, "
        f"waitress, loopback) with {s['slots']} slots, {s['steps_per_call']} decode steps per call. Clients: "
        f"threads in the benchmark process, back-to-back requests, `max_tokens` {s['max_tokens']}, "
        f"temperature 0.8; {s['seconds']:g} s per level after a 1 s warm-up.",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores{topology} (shared by server and clients); Python {m['python']}, "
        f"jax {m['jax']} ({m['jax_backend']}), numpy {m['numpy']}, flask {m['flask']}, waitress {m['waitress']}. "
        f"Load average (1 min) before the run: {m['load_average_1min_before']:.2f}; after it, "
        f"{m['load_average_1min_after']:.2f}. The machine is shared with other engineers' jobs (tests, "
        "training runs): figures measured under load; `load` is the 1-minute load average at the end of each "
        "level (2 cores: above 2, other processes took part of the CPU). Compare ratios within one run.",
        "",
        *table(results["levels"]),
        "",
        goal_line(results["levels"]),
    ]
    chat = results.get("chat")
    if chat is None:
        lines += ["", f"Chat and scoring rows: skipped ({results.get('chat_skipped', 'no chat checkpoint')})."]
        return "\n".join(lines) + "\n"
    c = chat["settings"]
    lines += [
        "",
        "## Chat and scoring (a real chat model)",
        "",
        f"`{chat['checkpoint']}`: SmolLM2-135M-Instruct (134.5M parameters, float32, 30 layers; imported from "
        f"its GGUF by `make demo`), served with `--max-context {c['max_context']}`, {c['slots']} slots, prefills "
        f"of {c['max_prefill_batch']} prompt (a short warm-up), "
        f"{c['steps_per_call']} decode steps per call; {c['seconds']:g} s per level after a {c['warmup']:g} s "
        "warm-up (scoring's shapes compiled before the first level). `chat`: `POST /v1/chat/completions`, one "
        "user question rendered with the model's chat "
        f"template, `max_tokens` {c['max_tokens']}, temperature 0.8 (an answer may end earlier, at "
        "`<|im_end|>`); tokens/s counts completion tokens. `score`: what lm-eval-harness's `local-completions` "
        "sends to score a choice, `POST /v1/completions` with `echo: true, logprobs: 1, max_tokens: 1, "
        "temperature: 0` on English passages of 45-150 tokens; tokens/s counts prompt tokens scored (their "
        "log-probabilities returned). A scoring request costs one forward over its prompt (its prefill, which "
        "also runs the output head at every position for a request of at most one token), compute-bound on "
        "this CPU, unlike decode, which is bound by reading the weights: more clients cannot multiply its "
        "tokens/s the way they do chat's.",
        "",
        *table(chat["levels"]),
        "",
        goal_line(chat["levels"]),
    ]
    return "\n".join(lines) + "\n"


def prewarm_scoring(port: int) -> None:
    """Scoring shapes compile on first use, not at the server's warm-up: compile them before any level
    (every passage alone, then all of them at once, for each length bucket and batch size)."""
    bodies = [request_body("score", i, 0, 1)[1] for i in range(len(PASSAGES))]
    for body in bodies:
        request(port, "POST", "/v1/completions", body)
    threads = [threading.Thread(target=request, args=(port, "POST", "/v1/completions", b)) for b in bodies * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def run_chat(checkpoint: Path, args: argparse.Namespace, seconds: float, log: Path) -> dict:
    """Chat (JSON, streamed) and scoring levels on a chat checkpoint."""
    # 256 positions hold the longest request (150 + 1 scored, or ~40 + 48 chat); prefills one at a time:
    # SmolLM2's warm-up then compiles 5 prefill shapes, not 18 (minutes each way on this loaded CPU)
    settings = {"slots": 16, "steps_per_call": args.steps_per_call, "max_context": 256, "max_prefill_batch": 1,
                "max_tokens": args.max_tokens, "seconds": seconds, "warmup": 5.0}  # fmt: skip
    flags = ["--slots", "16", "--steps-per-call", str(args.steps_per_call), "--max-context", "256",
             "--max-prefill-batch", "1", "--timeout", "600"]  # fmt: skip
    proc, port = start_server(checkpoint, flags, log)
    try:
        prewarm_scoring(port)
        levels = [
            run_level(port, n, stream, seconds, args.max_tokens, kind, settings["warmup"])
            for n in args.chat_levels
            for kind, stream in (("chat", False), ("chat", True), ("score", False))
        ]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {"checkpoint": str(checkpoint), "settings": settings, "levels": levels}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per level")
    parser.add_argument("--seconds", type=float, default=10.0, help="per level and mode (default 10)")
    parser.add_argument("--slots", type=int, default=32, help="server slots (default 32)")
    parser.add_argument("--steps-per-call", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--levels", type=int, nargs="+", default=list(LEVELS))
    parser.add_argument(
        "--chat-checkpoint",
        type=Path,
        default=Path("runs/smollm2"),
        help="a checkpoint with a chat template for the chat and scoring rows (default runs/smollm2)",
    )
    parser.add_argument("--chat-levels", type=int, nargs="+", default=list(CHAT_LEVELS))
    parser.add_argument("--chat-seconds", type=float, default=30.0, help="per chat/scoring level (default 30)")
    args = parser.parse_args()
    seconds = 2.0 if args.quick else args.seconds
    load_before = os.getloadavg()[0]
    chat, skipped = None, None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        flags = ["--slots", str(args.slots), "--steps-per-call", str(args.steps_per_call)]
        proc, port = start_server(checkpoint, flags, Path(tmp) / "server.log")
        try:
            levels = [
                run_level(port, n, stream, seconds, args.max_tokens) for n in args.levels for stream in (False, True)
            ]
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        if (args.chat_checkpoint / "config.yaml").is_file():
            chat_seconds = 2.0 if args.quick else args.chat_seconds
            chat = run_chat(args.chat_checkpoint, args, chat_seconds, Path(tmp) / "chat_server.log")
        else:
            skipped = f"{args.chat_checkpoint} is not a checkpoint: `make demo` imports SmolLM2 there"
            print(f"note: chat and scoring rows skipped: {skipped}", file=sys.stderr)
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
        **({"chat": chat} if chat else {"chat_skipped": skipped}),
    }
    text = markdown(results)
    write_results(f"serve_load_{cpu_slug(results['machine']['cpu'])}", results, text)  # one file per CPU model
    print(text)


if __name__ == "__main__":
    main()
