"""Property: whatever JSON (or bytes) a client posts, the server answers 2xx or 4xx and keeps serving."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jaxllm.serve import create_app
from jaxllm.serve.protocol import FIELDS


@pytest.fixture(scope="module")
def fuzz_app(serve_engine):
    return create_app(serve_engine)


json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30)
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)  # fmt: skip
# Values near the valid ones, so that about half of the bodies get past the checks into the engine.
near_valid = {
    "max_tokens": st.integers(-1, 50),
    "temperature": st.floats(-0.5, 2.5, allow_nan=False),
    "top_p": st.floats(0.0, 1.05, allow_nan=False),
    "top_k": st.integers(-2, 400),
    "n": st.integers(0, 4),
    "stop": st.text(max_size=4) | st.lists(st.text(max_size=4), max_size=5),
    "seed": st.integers(-(2**40), 2**40),
    "stream": st.booleans(),
    "model": st.sampled_from(["mini", "other"]),
    "echo": st.just(False),
    "user": st.text(max_size=8),
}
prompts = (
    st.text(max_size=60) | st.lists(st.text(max_size=20), max_size=3) | st.lists(st.integers(-1, 310), max_size=50)
)
bodies = (
    st.fixed_dictionaries({"prompt": prompts}, optional=near_valid)
    | st.fixed_dictionaries(
        {"prompt": prompts, "stream": st.just(True)},
        optional={
            **{k: v for k, v in near_valid.items() if k != "stream"},
            "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.booleans()}),
        },
    )
    | st.dictionaries(st.sampled_from(sorted(FIELDS)) | st.text(max_size=8), json_values, max_size=6)
    | json_values
)


@settings(max_examples=100, deadline=10_000, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])  # fmt: skip
@given(body=bodies)
def test_random_json_bodies_get_only_2xx_or_4xx(fuzz_app, body):
    r = fuzz_app.test_client().post("/v1/completions", data=json.dumps(body), content_type="application/json")
    assert 200 <= r.status_code < 300 or 400 <= r.status_code < 500, (r.status_code, r.data[:300])
    payload = r.get_data()  # a stream is read to its end
    if r.status_code >= 400:
        assert set(json.loads(payload)["error"]) == {"message", "type", "param", "code"}
    elif r.mimetype == "text/event-stream":
        assert payload.endswith(b"data: [DONE]\n\n") and b'"error"' not in payload
    else:
        assert len(json.loads(payload)["choices"]) >= 1


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
