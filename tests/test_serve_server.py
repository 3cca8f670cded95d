"""The real server: `jaxllm serve` in a subprocess on a free loopback port (--port 0), driven over HTTP.

One server per test process (module fixture), with an API key; the SIGTERM test runs last and stops it.
The disconnect test has a server of its own, with one slot, so that a long request lasts seconds.
"""

import http.client
import io
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from serve_helpers import reference, sse_data, stream_choices

API_KEY = "test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
DOCS = Path(__file__).parent.parent / "docs" / "serve.md"


@contextmanager
def running_server(checkpoint_dir, log_dir, *flags):
    """(process, port) of a ready `jaxllm serve` with an API key; stopped (SIGTERM) on exit unless already."""
    log = open(log_dir / "stderr.log", "w+")  # noqa: SIM115 (closed below)
    argv = [sys.executable, "-m", "jaxllm.cli", "serve", "--checkpoint", str(checkpoint_dir), "--port", "0", *flags]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log, text=True,
                            env={**os.environ, "JAXLLM_API_KEY": API_KEY})  # fmt: skip
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 120)
        line = proc.stdout.readline() if ready else ""
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        assert match, f"no address printed: {line!r}; stderr: {_tail(log)}"
        port = int(match.group(1))
        deadline = time.monotonic() + 180
        while call(port, "GET", "/ready")[0] != 200:
            assert proc.poll() is None and time.monotonic() < deadline, f"not ready; stderr: {_tail(log)}"
            time.sleep(0.25)
        yield proc, port
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        log.close()


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    """The module's server: 8 slots; the SIGTERM test, last, stops it."""
    flags = ["--slots", "8", "--max-prefill-batch", "2", "--timeout", "60"]
    with running_server(checkpoint[0], tmp_path_factory.mktemp("serve"), *flags) as proc_port:
        yield proc_port


def _tail(log) -> str:
    log.seek(0)
    return log.read()[-2000:]


def call(port, method, path, body=None, headers=None, timeout=60.0):
    """(status, headers, body bytes); (0, {}, b"") when nothing listens."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, None if body is None else json.dumps(body), headers or AUTH)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    except ConnectionError:
        return 0, {}, b""
    finally:
        conn.close()


def metric_samples(port) -> dict:
    """{(sample name, sorted label items): value} from GET /metrics."""
    status, _, body = call(port, "GET", "/metrics")
    assert status == 200
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(body.decode()) for s in family.samples}  # fmt: skip


VARIANTS = [
    {"prompt": "the cat", "max_tokens": 24, "temperature": 0.8, "top_k": 50},
    {"prompt": "a dog met", "max_tokens": 24, "temperature": 1.2, "top_p": 0.9},
    {"prompt": "one small model", "max_tokens": 24, "temperature": 0},
    {"prompt": "the", "max_tokens": 24, "temperature": 1.0, "stop": ["o"]},
]


def client_request(i: int) -> dict:
    return {**VARIANTS[i % len(VARIANTS)], "seed": 100 + i, "stream": i % 2 == 0,
            **({"stream_options": {"include_usage": True}} if i % 2 == 0 else {})}  # fmt: skip


def test_32_concurrent_clients_all_succeed_with_the_engines_output_and_metrics_add_up(server, checkpoint,
                                                                                      serve_tokenizer):  # fmt: skip
    _, port = server
    before = metric_samples(port)
    requests_ = [client_request(i) for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(lambda body: call(port, "POST", "/v1/completions", body), requests_))
    texts, usages = [], []
    for body, (status, headers, data) in zip(requests_, answers, strict=True):
        assert status == 200, data
        if body["stream"]:
            assert headers["Content-Type"].startswith("text/event-stream")
            streamed, _, chunks = stream_choices(sse_data(data))
            texts.append(streamed[0])
            usages.append(chunks[-1]["usage"])
        else:
            answer = json.loads(data)
            texts.append(answer["choices"][0]["text"])
            usages.append(answer["usage"])
    for body, text in zip(requests_, texts, strict=True):
        fields = {k: v for k, v in body.items() if k not in ("prompt", "stream", "stream_options")}
        assert text == reference(checkpoint, serve_tokenizer, [body["prompt"]], **fields)[0], body

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    deadline = time.monotonic() + 10  # a stream's metrics are recorded as its response closes
    while True:
        after = metric_samples(port)
        if delta("jaxllm_completion_requests_total", outcome="ok") == 32 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert delta("jaxllm_completion_requests_total", outcome="ok") == 32
    assert delta("jaxllm_http_requests_total", endpoint="/v1/completions", method="POST", status="200") == 32
    assert delta("jaxllm_generated_tokens_total") == sum(u["completion_tokens"] for u in usages) > 32
    assert delta("jaxllm_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("jaxllm_request_latency_seconds_count") == delta("jaxllm_time_to_first_token_seconds_count") == 32
    decode_calls = delta("jaxllm_batch_size_count")
    assert decode_calls > 0 and delta("jaxllm_batch_size_sum") / decode_calls > 2, "requests were batched"
    assert after[("jaxllm_queue_depth", ())] == 0 and after[("jaxllm_busy_slots", ())] == 0


def test_openai_client_example_from_the_docs_works_against_the_server(server, checkpoint, serve_tokenizer):
    openai = pytest.importorskip("openai")
    _, port = server
    example = re.search(r"```python\n(from openai import OpenAI\n.*?)```", DOCS.read_text(), re.S).group(1)
    assert "http://127.0.0.1:8000/v1" in example
    code = example.replace("http://127.0.0.1:8000/v1", f"http://127.0.0.1:{port}/v1")
    out = io.StringIO()
    with redirect_stdout(out):
        exec(compile(code, str(DOCS), "exec"), {"__name__": "docs_example"})
    prompt, max_tokens, seed = "def main():", 32, 0
    expected = reference(checkpoint, serve_tokenizer, [prompt], max_tokens=max_tokens, temperature=0.8, seed=seed)[0]
    assert out.getvalue() == f"{expected}\n{expected}\n"  # the whole completion, then the same text streamed
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY)
    assert [m.id for m in client.models.list().data] == ["mini"]
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.completions.create(model="mini", prompt="x", temperature=5)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="wrong").models.list()


def test_server_listens_on_loopback_only(server):
    _, port = server
    tcp = Path("/proc/net/tcp")
    if not tcp.exists():
        pytest.skip("no /proc/net/tcp to read listening sockets from")
    listening = [line.split()[1] for line in tcp.read_text().splitlines()[1:]
                 if line.split()[3] == "0A" and line.split()[1].endswith(f":{port:04X}")]  # fmt: skip
    assert listening == [f"0100007F:{port:04X}"]  # 127.0.0.1, little-endian hex


def test_a_client_that_disconnects_mid_stream_frees_its_slot(checkpoint, tmp_path):
    flags = ["--slots", "1", "--steps-per-call", "1", "--max-prefill-batch", "1"]
    with running_server(checkpoint[0], tmp_path, *flags) as (_, port):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"prompt": "the cat", "n": 128, "max_tokens": 40, "temperature": 0, "stream": True}  # 5120 steps
        conn.request("POST", "/v1/completions", json.dumps(body), AUTH)
        response = conn.getresponse()
        received = b""
        while b"data: " not in received:  # (a ": ping" comment may come first on a busy machine)
            received += response.read1()
        response.close()
        conn.close()
        deadline = time.monotonic() + 10
        cancelled = ("jaxllm_completion_requests_total", (("outcome", "cancelled"),))
        while (samples := metric_samples(port)).get(cancelled) != 1:
            assert time.monotonic() < deadline, "the request was not cancelled"
            time.sleep(0.05)
        assert samples[("jaxllm_busy_slots", ())] == 0
        assert samples[("jaxllm_generated_tokens_total", ())] < 128 * 40
        assert call(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_sigterm_finishes_running_requests_then_exits_cleanly(server):
    proc, port = server
    results = [{}, {}]
    started = threading.Barrier(3)

    def long_stream(result):  # 128 x 40 tokens: about half a second of work on 8 slots, when alone
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        body = {"prompt": "the cat", "n": 128, "max_tokens": 40, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/completions", json.dumps(body), AUTH)
        r = conn.getresponse()
        data = r.read1()
        started.wait()
        while chunk := r.read1():
            data += chunk
        result["status"], result["data"] = r.status, data

    readers = [threading.Thread(target=long_stream, args=(result,)) for result in results]
    for reader in readers:
        reader.start()
    started.wait(60)  # both streams are running
    proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while call(port, "GET", "/ready")[0] == 200:  # the signal handler has run once /ready says 503
        assert time.monotonic() < deadline
        time.sleep(0.01)
    status, _, body = call(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 1})
    assert status == 503 and json.loads(body)["error"]["code"] == "shutting_down"
    for reader, result in zip(readers, results, strict=True):
        reader.join(60)
        assert result["status"] == 200
        _, reasons, _ = stream_choices(sse_data(result["data"]))
        assert sorted(reasons) == list(range(128)), "every running choice finished"
    assert proc.wait(30) == 0
    assert "server stopped" in proc.stdout.read()
