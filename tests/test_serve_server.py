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
import socket
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
        # The request thread counts the cancellation; the engine thread frees the slot on its next loop.
        busy = ("jaxllm_busy_slots", ())
        while (samples := metric_samples(port)).get(cancelled) != 1 or samples[busy] != 0:
            assert time.monotonic() < deadline, f"the request was not cancelled and its slot freed: {samples}"
            time.sleep(0.05)
        assert samples[("jaxllm_generated_tokens_total", ())] < 128 * 40
        assert call(port, "POST", "/v1/completions", {"prompt": "x", "max_tokens": 2})[0] == 200


def test_150_idle_connections_do_not_lock_other_clients_out(server):
    """Sockets that connect and send nothing (waitress's default limit of 100 would refuse everyone else)."""
    _, port = server
    idle = []
    try:
        for _ in range(150):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        time.sleep(0.5)  # let the server accept them all
        start = time.monotonic()
        assert call(port, "GET", "/health", timeout=2)[0] == 200
        status, _, body = call(port, "POST", "/v1/completions", {"prompt": "the cat", "max_tokens": 2}, timeout=2)
        assert status == 200, body
        assert time.monotonic() - start < 2
    finally:
        for sock in idle:
            sock.close()


def raw_request(port, data: bytes) -> tuple[int, dict, bytes]:
    """(status, headers, body) of a hand-written request (what http.client will not send)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        r = http.client.HTTPResponse(sock)
        r.begin()
        return r.status, dict(r.getheaders()), r.read()


@pytest.mark.parametrize(
    ("head", "status"),
    [
        ("Content-Length: -1", 400),
        ("Content-Length: abc", 400),
        ("Content-Length: 100000000", 413),  # over waitress's own cap (64 MiB): refused before the app runs
        ("Transfer-Encoding: gzip", 501),
    ],
)
def test_errors_waitress_sends_itself_are_json_too(server, head, status):
    _, port = server
    request = f"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{head}\r\n\r\n"
    got, headers, body = raw_request(port, request.encode())
    assert got == status, body
    assert headers["Content-Type"] == "application/json"
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]


def test_the_real_server_checks_the_host_header_and_protects_metrics(server):
    _, port = server
    status, _, body = call(port, "GET", "/v1/models", headers={**AUTH, "Host": "attacker.example"})
    assert status == 421 and json.loads(body)["error"]["code"] == "misdirected_request"
    assert call(port, "GET", "/v1/models", headers={**AUTH, "Host": f"localhost:{port}"})[0] == 200
    status, _, body = call(port, "GET", "/metrics", headers={"Accept": "*/*"})
    assert status == 401 and json.loads(body)["error"]["code"] == "invalid_api_key"
    no_type = {"Authorization": AUTH["Authorization"]}
    status, _, body = call(port, "POST", "/v1/completions", {"prompt": "x"}, headers=no_type)
    assert status == 415 and json.loads(body)["error"]["code"] == "unsupported_media_type"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--port", "IN_USE"], "cannot listen on --host 127.0.0.1 --port IN_USE: Address already in use"),
        (["--host", "256.1.1.1"], "cannot listen on --host 256.1.1.1"),
        (["--host", "no-such-host.invalid"], "cannot listen on --host no-such-host.invalid"),
        (["--port", "-1"], "--port must be between 0 and 65535"),
        (["--port", "65536"], "--port must be between 0 and 65535"),
        (["--port", "70000"], "--port must be between 0 and 65535"),
        (["--connection-limit", "0"], "--connection-limit must be >= 1"),
    ],
)
def test_an_address_serve_cannot_listen_on_is_one_error_line_and_exit_2(checkpoint, flags, message):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        flags = [busy if f == "IN_USE" else f for f in flags]
        argv = [sys.executable, "-m", "jaxllm.cli", "serve", "--checkpoint", str(checkpoint[0]), "--port", "0", *flags]
        start = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message.replace("IN_USE", busy) in proc.stderr and proc.stdout == ""
    assert time.monotonic() - start < 60  # (the model is never loaded)


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
