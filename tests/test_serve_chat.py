"""`POST /v1/chat/completions` through Flask's test client: OpenAI's shapes, the template, streaming, errors.

A tiny engine (conftest.py's checkpoint) whose tokenizer carries a small chat template; the real
SmolLM2 chat through the `openai` client is in tests/test_real_model.py.
"""

import json

import pytest

from jaxllm.generation import complete
from jaxllm.serve import Engine, EngineSettings, create_app

from serve_helpers import SLOTS, sse_data

MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat"}]


@pytest.fixture(scope="module")
def client(checkpoint, chat_codec):
    _, _, cfg, params = checkpoint
    engine = Engine(cfg, params, chat_codec, EngineSettings(slots=SLOTS, max_prefill_batch=2)).start()
    assert engine.wait_ready(120)
    yield create_app(engine).test_client()
    engine.stop()


def expected(checkpoint, chat_codec, max_tokens, **options):
    _, _, cfg, params = checkpoint
    ids = chat_codec.encode_chat(MESSAGES)
    return ids, complete(cfg, params, [ids], tokenizer=chat_codec, max_new_tokens=max_tokens, stop=chat_codec.end_ids,
                         **options)[0]  # fmt: skip


def test_chat_completion_has_openai_shape_and_the_template_rendered_prompt(client, checkpoint, chat_codec):
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 12, "temperature": 0})
    assert r.status_code == 200, r.json
    body = r.json
    ids, want = expected(checkpoint, chat_codec, 12, temperature=0.0)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": want.text}
    assert choice["finish_reason"] == want.finish_reason
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want.tokens),
                             "total_tokens": len(ids) + len(want.tokens)}  # fmt: skip


def test_max_tokens_defaults_to_the_rest_of_the_context(client, checkpoint, chat_codec):
    _, _, cfg, _ = checkpoint
    r = client.post("/v1/chat/completions", json={"messages": MESSAGES, "temperature": 0, "ignore_eos": True})
    ids = chat_codec.encode_chat(MESSAGES)
    assert r.status_code == 200, r.json
    assert r.json["usage"]["completion_tokens"] == cfg.context_length - len(ids)
    assert r.json["choices"][0]["finish_reason"] == "length"


def test_text_parts_equal_a_string_content(client):
    parts = [{"role": "system", "content": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}]},
             MESSAGES[1]]  # fmt: skip
    a = client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 8, "seed": 3})
    b = client.post("/v1/chat/completions", json={"messages": parts, "max_tokens": 8, "seed": 3})
    assert a.status_code == b.status_code == 200
    assert a.json["choices"] == b.json["choices"]


def test_stream_sends_the_role_then_deltas_then_finish_reason_usage_and_done(client, checkpoint, chat_codec):
    body = {"messages": MESSAGES, "max_tokens": 10, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200 and r.mimetype == "text/event-stream"
    events = sse_data(r.get_data())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    _, want = expected(checkpoint, chat_codec, 10, temperature=0.0)
    assert text == want.text and reasons == [want.finish_reason]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == len(want.tokens)


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ([{"role": "robot", "content": "hi"}], "messages[0].role"),
        ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], "messages[0].content[0]"),
        ([{"role": "user", "content": 5}], "messages[0].content"),
        ([{"role": "user", "content": "a\ud800b"}], "messages[0].content"),
        ([{"role": "user", "content": [{"type": "text", "text": "\udcff"}]}], "messages[0].content[0].text"),
        ("hi", "messages"),
    ],
)
def test_bad_messages_get_400_naming_the_field(client, messages, param):
    r = client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 400
    assert r.json["error"]["param"] == param, r.json


def test_chat_requires_a_json_content_type(client):
    r = client.post("/v1/chat/completions", data=json.dumps({"messages": MESSAGES}), content_type="text/plain")
    assert r.status_code == 415


def test_a_checkpoint_without_a_chat_template_gets_a_clear_400(serve_engine):
    r = create_app(serve_engine).test_client().post("/v1/chat/completions", json={"messages": MESSAGES})
    assert r.status_code == 400
    assert r.json["error"]["code"] == "no_chat_template" and "/v1/completions" in r.json["error"]["message"]


def test_metrics_count_accepted_chat_requests(client):
    from prometheus_client.parser import text_string_to_metric_families

    def chats() -> float:
        families = {f.name: f for f in text_string_to_metric_families(client.get("/metrics").get_data(as_text=True))}
        return sum(s.value for s in families["jaxllm_chat_requests"].samples if s.name.endswith("_total"))

    before = chats()
    assert client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}).status_code == 200
    assert client.post("/v1/chat/completions", json={"messages": []}).status_code == 400  # refused: not counted
    assert chats() == before + 1
