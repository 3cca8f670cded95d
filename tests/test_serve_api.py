"""The HTTP API through Flask's test client: every endpoint, every error, SSE framing, OpenAI shapes.

The app runs over the session's tiny engine (conftest.py: 4 slots, context 48, a BPE tokenizer).
"""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from jaxllm import generate
from jaxllm.completion import end_of_text_id
from jaxllm.serve import Engine, EngineSettings, create_app

from serve_helpers import SLOTS, reference, sse_data, stream_choices

PROMPT = "the cat"


@pytest.fixture(scope="module")
def app(serve_engine):
    return create_app(serve_engine)


@pytest.fixture
def client(app):
    return app.test_client()


# Endpoints ---------------------------------------------------------------------------------------


def test_health_answers_before_the_model_is_ready_and_ready_says_503_until_warmed_up(checkpoint, serve_tokenizer):
    _, _, cfg, params = checkpoint
    cold = create_app(Engine(cfg, params, serve_tokenizer, EngineSettings(slots=SLOTS))).test_client()  # never started
    assert cold.get("/health").status_code == 200
    r = cold.get("/ready")
    assert r.status_code == 503
    assert r.json["error"]["code"] == "not_ready" and r.json["error"]["type"] == "server_error"


def test_ready_is_200_once_the_engine_has_warmed_up(client):
    r = client.get("/ready")
    assert r.status_code == 200 and r.json["status"] == "ready"


def test_models_lists_the_served_model_and_retrieves_it_by_id(client):
    r = client.get("/v1/models")
    assert r.status_code == 200 and r.json["object"] == "list"
    [card] = r.json["data"]
    assert card["id"] == "mini" and card["object"] == "model" and card["context_length"] == 48
    assert client.get("/v1/models/mini").json["id"] == "mini"
    r = client.get("/v1/models/gpt-9")
    assert r.status_code == 404 and r.json["error"]["code"] == "model_not_found"


def test_index_page_is_html_that_streams_completions(client):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    page = r.get_data(as_text=True)
    assert "<textarea" in page and "/v1/completions" in page and "stream: true" in page and "getReader" in page


def test_metrics_are_prometheus_text_with_every_family(client):
    client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3})
    r = client.get("/metrics")
    assert r.status_code == 200 and r.mimetype == "text/plain"
    families = {f.name for f in text_string_to_metric_families(r.get_data(as_text=True))}
    assert {
        "jaxllm_http_requests", "jaxllm_completion_requests", "jaxllm_prompt_tokens", "jaxllm_generated_tokens",
        "jaxllm_request_latency_seconds", "jaxllm_time_to_first_token_seconds", "jaxllm_queue_depth",
        "jaxllm_busy_slots", "jaxllm_slots", "jaxllm_batch_size",
    } <= families  # fmt: skip


def test_completion_has_openai_shape_choices_finish_reason_and_usage(client, checkpoint, serve_tokenizer):
    r = client.post("/v1/completions", json={"model": "mini", "prompt": PROMPT, "max_tokens": 5, "seed": 1})
    assert r.status_code == 200 and r.mimetype == "application/json"
    body = r.json
    assert body["id"].startswith("cmpl-") and body["object"] == "text_completion" and body["model"] == "mini"
    assert isinstance(body["created"], int)
    [choice] = body["choices"]
    assert choice["index"] == 0 and choice["logprobs"] is None and choice["finish_reason"] in ("stop", "length")
    ids = serve_tokenizer.encode(PROMPT).ids
    _, _, cfg, params = checkpoint
    stop = [end_of_text_id(serve_tokenizer)]
    [tokens] = generate(cfg, params, [ids], max_new_tokens=5, temperature=1.0, seed=1, stop=stop)
    assert body["usage"] == {
        "prompt_tokens": len(ids),
        "completion_tokens": len(tokens),
        "total_tokens": len(ids) + len(tokens),
    }
    assert choice["finish_reason"] == ("length" if len(tokens) == 5 else "stop")


@pytest.mark.parametrize(
    "request_",
    [
        {"prompt": PROMPT, "max_tokens": 20, "temperature": 0},
        {"prompt": [PROMPT, "a dog met"], "n": 3, "max_tokens": 12, "temperature": 1.3, "seed": 11},
        {"prompt": "one small", "max_tokens": 20, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 5},
    ],
    ids=["greedy", "prompts-x-n-sampled", "top-k-top-p"],
)
def test_fixed_seed_gives_what_generate_text_gives_streamed_or_not(client, checkpoint, serve_tokenizer, request_):
    prompts = request_["prompt"] if isinstance(request_["prompt"], list) else [request_["prompt"]]
    expected = reference(checkpoint, serve_tokenizer, prompts, **{k: v for k, v in request_.items() if k != "prompt"})
    r = client.post("/v1/completions", json=request_)
    assert [c["text"] for c in r.json["choices"]] == expected
    assert [c["index"] for c in r.json["choices"]] == list(range(len(expected)))
    stream = client.post("/v1/completions", json={**request_, "stream": True})
    streamed, reasons, _ = stream_choices(sse_data(stream.data))
    assert [streamed[i] for i in range(len(expected))] == expected
    assert [reasons[i] for i in range(len(expected))] == [c["finish_reason"] for c in r.json["choices"]]


def test_stream_is_sse_data_chunks_ending_with_done_and_usage_when_asked(client):
    body = {"prompt": [PROMPT, "the dog"], "n": 2, "max_tokens": 10, "seed": 3, "stream": True}
    r = client.post("/v1/completions", json={**body, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    assert r.headers["Cache-Control"] == "no-cache"
    texts, reasons, chunks = stream_choices(sse_data(r.data))
    assert sorted(texts) == sorted(reasons) == [0, 1, 2, 3]
    *text_chunks, last = chunks
    assert last["choices"] == [] and set(last["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}
    assert all(c["usage"] is None for c in text_chunks)
    plain = client.post("/v1/completions", json={**body, "stream": False}).json
    assert last["usage"] == plain["usage"]
    assert [texts[i] for i in range(4)] == [c["text"] for c in plain["choices"]]
    no_usage = stream_choices(sse_data(client.post("/v1/completions", json=body).data))[2]
    assert all("usage" not in c for c in no_usage)


def test_stop_string_ends_the_text_right_before_it_with_finish_reason_stop(client):
    free = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "temperature": 0}).json
    text = free["choices"][0]["text"]
    stop = text[4:6]
    assert text.find(stop) == 4
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": [stop]})
    assert r.json["choices"][0] == {"index": 0, "text": text[:4], "logprobs": None, "finish_reason": "stop"}
    streamed, reasons, _ = stream_choices(sse_data(client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 20, "temperature": 0, "stop": stop, "stream": True}
    ).data))  # fmt: skip
    assert streamed == {0: text[:4]} and reasons == {0: "stop"}


def test_max_tokens_ends_with_finish_reason_length_and_zero_gives_empty_text(client):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0})
    if r.json["choices"][0]["finish_reason"] == "length":
        assert r.json["usage"]["completion_tokens"] == 4
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 0})
    assert r.status_code == 200
    assert r.json["choices"][0]["text"] == "" and r.json["usage"]["completion_tokens"] == 0


def test_token_id_prompts_and_an_empty_prompt_are_accepted(client, serve_tokenizer, checkpoint):
    ids = serve_tokenizer.encode(PROMPT).ids
    by_text = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0}).json
    by_ids = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 6, "temperature": 0}).json
    assert by_ids["choices"] == by_text["choices"]
    two = client.post("/v1/completions", json={"prompt": [ids, ids], "max_tokens": 6, "temperature": 0}).json
    assert [c["text"] for c in two["choices"]] == [by_text["choices"][0]["text"]] * 2
    empty = client.post("/v1/completions", json={"prompt": "", "max_tokens": 6, "temperature": 0})
    assert empty.status_code == 200 and empty.json["usage"]["prompt_tokens"] == 1  # the end-of-text token


# Errors ------------------------------------------------------------------------------------------


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.data
    assert r.mimetype == "application/json"
    error = r.json["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param and error["code"] == code
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[1, 2], "x"]}, "prompt"),
        ({"prompt": [1, True]}, "prompt"),
        ({"prompt": [99999]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": "x", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"prompt": "x", "max_tokens": 2.5}, "max_tokens"),
        ({"prompt": "x", "temperature": 2.5}, "temperature"),
        ({"prompt": "x", "temperature": -0.1}, "temperature"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "temperature": 10**400}, "temperature"),
        ({"prompt": "x", "top_p": 0}, "top_p"),
        ({"prompt": "x", "top_p": 1.5}, "top_p"),
        ({"prompt": "x", "top_k": -1}, "top_k"),
        ({"prompt": "x", "top_k": 1.5}, "top_k"),
        ({"prompt": "x", "n": 0}, "n"),
        ({"prompt": "x", "n": 129}, "n"),
        ({"prompt": ["x"] * 3, "n": 50}, "n"),
        ({"prompt": "x", "stop": 5}, "stop"),
        ({"prompt": "x", "stop": [""]}, "stop"),
        ({"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": "x", "seed": "x"}, "seed"),
        ({"prompt": "x", "stream": "yes"}, "stream"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": "x", "stream": True, "stream_options": {"include_usage": 1}}, "include_usage"),
        ({"prompt": "x", "stream": True, "stream_options": []}, "stream_options"),
        ({"prompt": "x", "logprobs": 6}, "logprobs"),
        ({"prompt": "x", "echo": 1}, "echo"),
        ({"prompt": "x", "best_of": 3}, "best_of"),
        ({"prompt": "x", "frequency_penalty": 0.5}, "frequency_penalty"),
        ({"prompt": "x", "model": 7}, "model"),
        ({"prompt": "x", "temprature": 0.5}, "temprature"),
    ],
)
def test_invalid_fields_get_400_naming_the_field(client, body, param):
    error = assert_error(client.post("/v1/completions", json=body), 400, param)
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "data",
    [b"", b"{", b"[1, 2]", b'"prompt"', b"null", b'{"prompt": NaN}', b"\xff\xfe", b"[" * 100_000],
    ids=["empty", "truncated", "array", "string", "null", "nan", "not-utf8", "deep"],
)
def test_a_body_that_is_not_a_json_object_gets_400(client, data):
    assert_error(client.post("/v1/completions", data=data, content_type="application/json"), 400)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "the cat", "max_tokens": 47}, "max_tokens"),  # 2 prompt tokens + 47 > 48
        ({"prompt": [[1] * 49]}, "max_tokens"),  # the prompt alone is past the context
        ({"prompt": ["x", "the cat sat on the mat. " * 4], "max_tokens": 20}, "max_tokens"),
    ],
)
def test_prompt_plus_max_tokens_past_the_context_gets_context_length_exceeded(client, body, param):
    error = assert_error(client.post("/v1/completions", json=body), 400, param, "context_length_exceeded")
    assert "maximum context length is 48 tokens" in error["message"]


def test_a_model_the_server_does_not_serve_gets_404_model_not_found(client):
    r = client.post("/v1/completions", json={"prompt": "x", "model": "gpt-4"})
    assert_error(r, 404, "model", "model_not_found")


def test_oversized_body_gets_413_json(serve_engine):
    client = create_app(serve_engine, max_body_bytes=1000).test_client()
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1, "user": "u" * 900}).status_code == 200
    error = assert_error(client.post("/v1/completions", json={"prompt": "x" * 2000}), 413, code="request_too_large")
    assert "1000 bytes" in error["message"]


def test_unknown_routes_get_404_and_wrong_methods_405_with_allow(client):
    assert_error(client.get("/v2/completions"), 404)
    assert_error(client.post("/v1/embeddings", json={}), 404)
    r = client.get("/v1/completions")
    assert_error(r, 405)
    assert r.headers["Allow"] == "OPTIONS, POST"
    assert_error(client.post("/health"), 405)
    assert_error(client.delete("/v1/models"), 405)


def test_api_key_is_required_on_v1_when_configured(serve_engine):
    client = create_app(serve_engine, api_key="s3cret").test_client()
    body = {"prompt": "x", "max_tokens": 1}
    wrong = [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}, {"Authorization": "Basic s3cret"}]
    for headers in wrong:
        r = client.post("/v1/completions", json=body, headers=headers)
        assert_error(r, 401, code="invalid_api_key")
        assert r.headers["WWW-Authenticate"] == "Bearer"
    assert_error(client.get("/v1/models"), 401, code="invalid_api_key")
    ok = {"Authorization": "Bearer s3cret"}
    assert client.post("/v1/completions", json=body, headers=ok).status_code == 200
    assert client.get("/v1/models", headers=ok).status_code == 200
    assert client.get("/health").status_code == client.get("/ready").status_code == 200  # probes stay open


def test_a_full_queue_gets_429_with_retry_after(checkpoint, serve_tokenizer):
    _, _, cfg, params = checkpoint
    engine = Engine(
        cfg, params, serve_tokenizer, EngineSettings(slots=SLOTS, max_queue=1)
    )  # not started: nothing drains
    client = create_app(engine).test_client()
    waiting = client.post("/v1/completions", json={"prompt": "x", "stream": True}, buffered=False)
    assert waiting.status_code == 200 and engine.queue_depth() == 1
    r = client.post("/v1/completions", json={"prompt": "x"})
    assert_error(r, 429, code="queue_full")
    assert r.headers["Retry-After"] == "1"
    waiting.close()


def test_an_unexpected_exception_is_a_500_json_error_without_a_traceback(serve_engine, monkeypatch):
    from jaxllm.serve import protocol

    monkeypatch.setattr(protocol, "to_request", lambda *a: 1 / 0)
    r = create_app(serve_engine).test_client().post("/v1/completions", json={"prompt": "x"})
    error = assert_error(r, 500)
    assert error["type"] == "server_error" and "ZeroDivision" not in error["message"]


def test_http_requests_are_counted_by_route_and_status(serve_engine):
    app = create_app(serve_engine)
    client = app.test_client()
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
    client.post("/v1/completions", json={"prompt": "x", "n": 0})
    client.get("/nope")
    counter = app.extensions["jaxllm"]["metrics"].http_requests
    assert counter.labels("/v1/completions", "POST", "200")._value.get() == 1
    assert counter.labels("/v1/completions", "POST", "400")._value.get() == 1
    assert counter.labels("unmatched", "GET", "404")._value.get() == 1


# Hardening: integer ranges, lone surrogates, Content-Type, Host, /metrics ---------------------------


def post_raw(client, body, **kw):
    """POST `body` as JSON text (json.dumps writes a lone surrogate as a \\ud800 escape, as a client may)."""
    import json

    return client.post("/v1/completions", data=json.dumps(body), content_type="application/json", **kw)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x", "seed": 2**32}, "seed"),
        ({"prompt": "x", "seed": -1}, "seed"),
        ({"prompt": "x", "seed": 2**64}, "seed"),
        ({"prompt": "x", "seed": 2**70}, "seed"),
        ({"prompt": "x", "top_k": 2**31}, "top_k"),
        ({"prompt": "x", "top_k": 2**70}, "top_k"),
        ({"prompt": "x", "n": 2**70}, "n"),
        ({"prompt": "x", "best_of": 2**70}, "best_of"),
        ({"prompt": "x", "max_tokens": 2**70}, "max_tokens"),
        ({"prompt": [1, 2**70]}, "prompt"),
        ({"prompt": [[2**63, 1]]}, "prompt"),
        ({"prompt": [-(2**70)]}, "prompt"),
    ],
)
def test_integers_past_their_range_get_400_naming_the_field(client, body, param):
    assert_error(post_raw(client, body), 400, param, "context_length_exceeded" if param == "max_tokens" else None)


def test_seeds_are_32_bit_the_largest_is_served_and_differs_from_zero(client):
    def text(seed):
        r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8, "seed": seed})
        assert r.status_code == 200, r.data
        return r.json["choices"][0]["text"]

    assert text(2**32 - 1) == text(2**32 - 1) and text(2**32 - 1) != text(0)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "a\ud800b"}, "prompt"),
        ({"prompt": ["the cat", "a\udcffb"]}, "prompt"),
        ({"prompt": "the cat", "stop": "\ud800"}, "stop"),
        ({"prompt": "the cat", "stop": ["x", "y\udfff"]}, "stop"),
        ({"prompt": "a\ud800b", "stream": True}, "prompt"),
        ({"prompt": "the cat", "stop": ["\ud83d"], "stream": True}, "stop"),
        ({"prompt": "the cat", "model": "mini\ud800"}, "model"),
    ],
)
def test_lone_surrogates_get_400_naming_the_field(client, body, param):
    error = assert_error(post_raw(client, body), 400, param)
    assert "surrogate" in error["message"]


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "text/json"])
def test_completions_require_a_json_content_type(client, content_type):
    import json

    headers = {"Content-Type": content_type} if content_type else {}
    r = client.post("/v1/completions", data=json.dumps({"prompt": "x", "max_tokens": 1}), headers=headers)
    assert_error(r, 415, None, "unsupported_media_type")
    ok = client.post("/v1/completions", data=json.dumps({"prompt": "x", "max_tokens": 1}),
                     content_type="application/json; charset=utf-8")  # fmt: skip
    assert ok.status_code == 200


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.2", "localhost.evil.example", ""])
def test_a_host_header_the_server_does_not_answer_to_gets_421(client, host):
    for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("POST", "/v1/completions")]:
        r = client.open(path, method=method, json={"prompt": "x", "max_tokens": 1}, headers={"Host": host})
        assert_error(r, 421, None, "misdirected_request")


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:8000", "localhost", "LOCALHOST:80", "[::1]", "[::1]:8000"])
def test_loopback_host_headers_are_answered(client, host):
    assert client.get("/health", headers={"Host": host}).status_code == 200


def test_allowed_hosts_add_names_and_star_allows_any(serve_engine):
    named = create_app(serve_engine, allowed_hosts=["api.example", "10.0.0.5"]).test_client()
    assert named.get("/health", headers={"Host": "api.example:8000"}).status_code == 200
    assert named.get("/health", headers={"Host": "10.0.0.5"}).status_code == 200
    assert named.get("/health", headers={"Host": "other.example"}).status_code == 421
    anyone = create_app(serve_engine, allowed_hosts=["*"]).test_client()
    assert anyone.get("/health", headers={"Host": "other.example"}).status_code == 200


def test_metrics_need_the_api_key_when_one_is_set_unless_public(serve_engine):
    keyed = create_app(serve_engine, api_key="k").test_client()
    error = assert_error(keyed.get("/metrics"), 401, None, "invalid_api_key")
    assert "Bearer" in error["message"]
    assert keyed.get("/metrics", headers={"Authorization": "Bearer k"}).status_code == 200
    assert keyed.get("/health").status_code == 200 and keyed.get("/ready").status_code == 200
    public = create_app(serve_engine, api_key="k", public_metrics=True).test_client()
    assert public.get("/metrics").status_code == 200
    assert public.get("/v1/models").status_code == 401
