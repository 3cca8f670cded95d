"""Property: whatever JSON (or bytes) a client posts, the server answers 2xx or 4xx and keeps serving.

Every field draws integers up to 2**70 and strings with lone surrogates as well as near-valid values."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllm.serve import create_app
from jaxllm.serve.protocol import FIELDS


@pytest.fixture(scope="module")
def fuzz_app(serve_engine):
    return create_app(serve_engine)


# Text with lone surrogates ("\ud800": valid JSON escapes, not valid Unicode text) and integers far past int64.
surrogate = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
texts = st.text(max_size=30) | st.lists(st.text(max_size=4) | surrogate, min_size=1, max_size=6).map("".join)
huge = st.integers(-(2**70), 2**70) | st.sampled_from([2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64, -1, -(2**63)])
json_scalars = st.none() | st.booleans() | huge | st.floats(allow_nan=False) | texts
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip
# Values near the valid ones, so that about half of the bodies get past the checks into the engine.
# Every integer field also draws from `huge`, every string field from `texts`.
near_valid = {
    "max_tokens": st.integers(-1, 50) | huge,
    "temperature": st.floats(-0.5, 2.5, allow_nan=False) | huge,
    "top_p": st.floats(0.0, 1.05, allow_nan=False) | huge,
    "top_k": st.integers(-2, 400) | huge,
    "n": st.integers(0, 4) | huge,
    "best_of": st.integers(0, 4) | huge,
    "stop": st.text(max_size=4) | texts | st.lists(st.text(max_size=4) | texts, max_size=5),
    "seed": st.integers(-(2**40), 2**40) | huge,
    "stream": st.booleans(),
    "model": st.sampled_from(["mini", "other"]) | texts,
    "echo": st.booleans() | st.none(),
    "logprobs": st.none() | st.integers(-1, 6) | huge | st.booleans(),
    "user": st.text(max_size=8) | texts,
}
token_ids = st.integers(-1, 310) | huge
prompts = (
    st.text(max_size=60) | texts | st.lists(st.text(max_size=20) | texts, max_size=3)
    | st.lists(token_ids, max_size=50) | st.lists(st.lists(token_ids, max_size=10), max_size=3)
)  # fmt: skip
bodies = (
    st.fixed_dictionaries({"prompt": prompts}, optional=near_valid)
    | st.fixed_dictionaries(
        {"prompt": prompts, "stream": st.just(True)},
        optional={
            **{k: v for k, v in near_valid.items() if k != "stream"},
            "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        },
    )
    | st.dictionaries(st.sampled_from(sorted(FIELDS)) | texts, json_values, max_size=6)
    | json_values
)


@settings(max_examples=100, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])  # fmt: skip
@given(body=bodies)
def test_random_json_bodies_get_only_2xx_or_4xx(fuzz_app, body):
    answer = post_and_check(fuzz_app, "/v1/completions", body)
    if answer is not None:
        assert len(answer["choices"]) >= 1


def post_and_check(app, route: str, body) -> dict | None:
    """POST `body` as JSON: the status must be 2xx or 4xx, an error has OpenAI's error shape, a stream
    ends with [DONE] and no error; the parsed body of a 2xx JSON answer (None otherwise)."""
    r = app.test_client().post(route, data=json.dumps(body), content_type="application/json")
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (r.status_code, r.data[:300])
    payload = r.get_data()  # a stream is read to its end
    if r.status_code >= 400:
        assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}
        return None
    if r.mimetype == "text/event-stream":
        assert payload.endswith(b"data: [DONE]\n\n") and b'"error"' not in payload
        return None
    return json.loads(payload)


@settings(max_examples=30, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=200))
def test_random_bytes_get_400(fuzz_app, data):
    r = fuzz_app.test_client().post("/v1/completions", data=data, content_type="application/json")
    assert r.status_code in (200, 400), r.data  # 200 only when the bytes happen to be a valid request


def test_the_engine_still_serves_after_the_fuzzing(fuzz_app, serve_engine):
    client = fuzz_app.test_client()
    assert client.get("/ready").status_code == 200 and serve_engine.busy_slots() == 0
    assert client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 3}).status_code == 200
    metrics = fuzz_app.extensions["jaxllm"]["metrics"]
    assert metrics.completions.labels("failed")._value.get() == 0


# The chat route: an engine whose tokenizer has a chat template, and messages near the valid shape.
@pytest.fixture(scope="module")
def chat_app(checkpoint, serve_tokenizer):
    from jaxllm.serve import Engine, EngineSettings
    from jaxllm.text import TextCodec

    from serve_helpers import SLOTS

    codec = TextCodec.wrap(serve_tokenizer)
    codec.chat_template = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}assistant:"
    _, _, cfg, params = checkpoint
    engine = Engine(cfg, params, codec, EngineSettings(slots=SLOTS, max_prefill_batch=2)).start()
    assert engine.wait_ready(120)
    yield create_app(engine)
    engine.stop()


parts = st.lists(st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]), "text": texts}), max_size=3)
roles = st.sampled_from(["system", "user", "assistant", "robot"]) | texts
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": texts | parts | json_values}), max_size=4)
messages = messages | json_values
chat_fields = {
    **{k: v for k, v in near_valid.items() if k not in ("echo", "best_of")},
    "max_completion_tokens": st.integers(-1, 50) | huge,
    "logprobs": st.booleans() | st.none() | huge,
    "top_logprobs": st.none() | st.integers(-1, 21) | huge,
}
chat_bodies = (
    st.fixed_dictionaries({"messages": messages}, optional=chat_fields)
    | st.dictionaries(st.sampled_from(sorted(chat_fields)) | st.just("messages") | texts, json_values, max_size=6)
)


@settings(max_examples=80, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])  # fmt: skip
@given(body=chat_bodies)
def test_random_chat_bodies_get_only_2xx_or_4xx(chat_app, body):
    answer = post_and_check(chat_app, "/v1/chat/completions", body)
    if answer is not None:
        assert answer["object"] == "chat.completion"
