"""The serving engine's scheduler: continuous batching, slot independence, cancellation, time limits, errors.

Slow engines (`slowed`) sleep in their per-decode hook so that requests overlap on 2 CPU cores; they
share the session engine's shapes (4 slots, context 48), so they reuse its compiled code. Requests
meant to run long are greedy: on this checkpoint greedy text never meets end-of-text within 40 tokens.
"""

import threading
import time

import pytest

from jaxllm import Sampling, generate_text
from jaxllm.generation import complete
from jaxllm.serve import Engine, EngineSettings, create_app
from jaxllm.serve import engine as engine_module
from jaxllm.serve.engine import Delta, Failed, Finished
from jaxllm.serve.protocol import CompletionParams, to_request

from serve_helpers import SLOTS, collect, reference, sse_data


def make_request(checkpoint, tokenizer, prompt, **fields):
    cfg = checkpoint[2]
    return to_request(CompletionParams(prompts=[prompt], **fields), cfg, tokenizer)[0]


def slowed(checkpoint, tokenizer, delay_s=0.02, **settings):
    """A started engine whose every decode call takes at least `delay_s` longer."""
    _, _, cfg, params = checkpoint
    engine = Engine(cfg, params, tokenizer, EngineSettings(slots=SLOTS, warmup=False, **settings)).start()
    engine.on_decode = lambda busy: time.sleep(delay_s)
    return engine


def slowed_app(checkpoint, tokenizer, delay_s=0.02, **settings):
    """(engine, app): as `slowed`, keeping the app's metrics hook."""
    engine = slowed(checkpoint, tokenizer, delay_s, **settings)
    app = create_app(engine)
    observe = engine.on_decode
    engine.on_decode = lambda busy: (observe(busy), time.sleep(delay_s))
    return engine, app


def wait_for(condition, timeout=10.0):
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, "timed out waiting"
        time.sleep(0.01)


def test_a_request_gives_the_same_text_in_any_slot_and_beside_any_batch_mates(checkpoint, serve_tokenizer,
                                                                                monkeypatch):  # fmt: skip
    _, _, cfg, params = checkpoint
    probe = dict(max_tokens=20, temperature=1.2, top_k=40, top_p=0.95, seed=42)
    expected = generate_text(cfg, params, serve_tokenizer, ["the dog"], Sampling(20, 1.2, 40, 0.95, 42))
    engine = slowed(checkpoint, serve_tokenizer, delay_s=0.0)
    slots_of_probe = []
    real = engine._prefill_rows

    def spy(chunk, b):
        slots_of_probe.extend(slot for slot, row in chunk if row.job.req.top_k == 40)
        return real(chunk, b)

    monkeypatch.setattr(engine, "_prefill_rows", spy)
    try:
        alone = collect(engine.submit(make_request(checkpoint, serve_tokenizer, "the dog", **probe)))
        # Three requests with other settings take slots 0-2 and hold there (the gate) until the probe is queued.
        gate = threading.Event()
        engine.on_decode = lambda busy: gate.wait(10)
        mates = [engine.submit(make_request(checkpoint, serve_tokenizer, p, max_tokens=40, temperature=t, seed=s))
                 for p, t, s in [("a cat", 0.0, 1), ("one small model", 1.5, 2), ("the", 0.7, 3)]]  # fmt: skip
        wait_for(lambda: engine.busy_slots() == 3)
        probe_job = engine.submit(make_request(checkpoint, serve_tokenizer, "the dog", **probe))
        gate.set()
        together = collect(probe_job)
        for job in mates:
            collect(job)
    finally:
        engine.stop()
    assert slots_of_probe[0] == 0 and slots_of_probe[1] != 0
    assert [c.text for c in alone] == [c.text for c in together] == expected


def test_requests_join_and_leave_between_decode_steps(checkpoint, serve_tokenizer):
    engine = slowed(checkpoint, serve_tokenizer, delay_s=0.02, steps_per_call=1)
    batches = []
    engine.on_decode = lambda busy: (batches.append(busy), time.sleep(0.02))
    try:
        long = engine.submit(make_request(checkpoint, serve_tokenizer, "the cat", max_tokens=40, temperature=0))
        wait_for(lambda: engine.busy_slots() == 1)
        short_req = make_request(checkpoint, serve_tokenizer, "a dog", max_tokens=3, temperature=0)
        short_done = collect(engine.submit(short_req))
        assert engine.busy_slots() == 1, "the long request is still running when the short one has left"
        collect(long)
    finally:
        engine.stop()
    _, _, cfg, params = checkpoint
    assert short_done == complete(cfg, params, short_req.prompts, tokenizer=serve_tokenizer, max_new_tokens=3,
                                  stop=short_req.stop_ids)  # fmt: skip
    assert 2 in batches and batches[0] == 1 and batches[-1] == 1  # joined after the start, left before the end


def test_more_rows_than_slots_wait_for_free_slots_and_all_finish(checkpoint, serve_tokenizer, serve_engine):
    _, _, cfg, params = checkpoint
    req = make_request(checkpoint, serve_tokenizer, "the cat", n=9, max_tokens=10, temperature=1.0, seed=8)
    results = collect(serve_engine.submit(req))
    expected = generate_text(cfg, params, serve_tokenizer, ["the cat"] * 9, max_new_tokens=10, temperature=1.0, seed=8)
    assert [c.text for c in results] == expected
    assert len(set(expected)) > 1


def test_client_that_disconnects_mid_stream_frees_its_slot(checkpoint, serve_tokenizer):
    engine, app = slowed_app(checkpoint, serve_tokenizer, delay_s=0.1, steps_per_call=1)  # 40 tokens: >= 4 s
    try:
        r = app.test_client().post(
            "/v1/completions",
            json={"prompt": "the cat", "max_tokens": 40, "n": 2, "temperature": 0, "stream": True},
            buffered=False,
        )
        first = next(chunk for chunk in r.response if not chunk.startswith(b": ping"))  # (pings while compiling)
        assert first.startswith(b"data: ") and engine.busy_slots() == 2
        r.close()  # what the WSGI server does when the client goes away
        wait_for(lambda: engine.busy_slots() == 0, timeout=1.0)
        assert app.extensions["jaxllm"]["metrics"].completions.labels("cancelled")._value.get() == 1
        ok = app.test_client().post("/v1/completions", json={"prompt": "the", "max_tokens": 2})
        assert ok.status_code == 200  # the slots are usable again
    finally:
        engine.stop()


def test_a_request_past_its_time_limit_gets_504_and_frees_its_slot(checkpoint, serve_tokenizer):
    engine, app = slowed_app(checkpoint, serve_tokenizer, delay_s=0.05, timeout_s=0.3)
    client = app.test_client()
    try:
        r = client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 40, "temperature": 0})
        assert r.status_code == 504
        assert r.json["error"]["code"] == "timeout" and r.json["error"]["type"] == "timeout_error"
        assert engine.busy_slots() == 0
        body = {"prompt": "the", "max_tokens": 40, "temperature": 0, "stream": True}
        events = sse_data(client.post("/v1/completions", json=body).data)
        assert events[-1] == "[DONE]" and '"code":"timeout"' in events[-2]
        assert client.post("/v1/completions", json={"prompt": "the", "max_tokens": 1}).status_code == 200
    finally:
        engine.stop()


def test_an_engine_error_fails_the_requests_in_flight_with_500_and_the_engine_keeps_serving(
    checkpoint, serve_tokenizer, monkeypatch
):
    engine = slowed(checkpoint, serve_tokenizer, delay_s=0.0)
    real, calls = engine_module.decode_jit, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("device lost")
        return real(*args)

    monkeypatch.setattr(engine_module, "decode_jit", flaky)
    client = create_app(engine).test_client()
    try:
        r = client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 5})
        assert r.status_code == 500 and r.json["error"]["type"] == "server_error"
        assert "device lost" not in r.json["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "the cat", "max_tokens": 5}).status_code == 200
        assert engine.ready
    finally:
        engine.stop()


def test_stop_fails_queued_and_running_jobs_with_503(checkpoint, serve_tokenizer):
    engine = slowed(checkpoint, serve_tokenizer, delay_s=0.05)
    job = engine.submit(make_request(checkpoint, serve_tokenizer, "the cat", max_tokens=40, temperature=0))
    wait_for(lambda: engine.busy_slots() == 1)
    engine.stop()
    events = []
    while not events or not isinstance(events[-1], Failed | Finished):
        events.append(job.events.get(timeout=5))
    assert isinstance(events[-1], Failed) and events[-1].error.status == 503
    assert all(isinstance(e, Delta) for e in events[:-1])


@pytest.mark.parametrize("field", ["slots", "max_queue", "steps_per_call"])
def test_engine_settings_refuse_nonsense(field):
    from jaxllm.errors import InputError

    with pytest.raises(InputError, match=field):
        EngineSettings(**{field: 0})
    with pytest.raises(InputError, match="power of two"):
        EngineSettings(max_prefill_batch=3)


def test_a_failure_in_one_requests_prefill_fails_only_that_request(checkpoint, serve_tokenizer, monkeypatch):
    """The culprit shares a prefill with others: the chunk is run again row by row; only it fails."""
    engine = slowed(checkpoint, serve_tokenizer, delay_s=0.01, max_prefill_batch=2)
    real = engine_module.pack_prompts

    def poisoned(rows, *args):
        if any(req.seed == 666 for _, req, _ in rows):
            raise RuntimeError("poisoned row")
        return real(rows, *args)

    monkeypatch.setattr(engine_module, "pack_prompts", poisoned)
    try:
        fields = [("the cat", 1), ("a dog", 2), ("the", 3)]
        others = [make_request(checkpoint, serve_tokenizer, p, max_tokens=8, seed=s) for p, s in fields]
        culprit = make_request(checkpoint, serve_tokenizer, "the mat", max_tokens=8, seed=666)
        jobs = [engine.submit(others[0]), engine.submit(culprit), engine.submit(others[1]), engine.submit(others[2])]
        with pytest.raises(Exception) as failed:
            collect(jobs[1])
        assert getattr(failed.value, "status", None) == 500
        for job, (prompt, seed) in zip([jobs[0], jobs[2], jobs[3]], fields, strict=True):
            [done] = collect(job)
            assert done.text == reference(checkpoint, serve_tokenizer, [prompt], max_tokens=8, seed=seed)[0]
        later = engine.submit(make_request(checkpoint, serve_tokenizer, "the cat", max_tokens=4, seed=5))
        assert len(collect(later)[0].tokens) == 4 and engine.ready
    finally:
        engine.stop()


def test_a_failed_decode_fails_only_the_rows_in_flight_and_the_queue_is_served(checkpoint, serve_tokenizer,
                                                                               monkeypatch):  # fmt: skip
    engine = slowed(checkpoint, serve_tokenizer, delay_s=0.01)
    real, calls = engine_module.decode_jit, []

    def flaky(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("device hiccup")
        return real(*args)

    monkeypatch.setattr(engine_module, "decode_jit", flaky)
    try:
        running = [engine.submit(make_request(checkpoint, serve_tokenizer, "the cat", max_tokens=30, temperature=0))
                   for _ in range(SLOTS)]  # fmt: skip
        queued = engine.submit(make_request(checkpoint, serve_tokenizer, "a dog", max_tokens=4, seed=1))
        for job in running:
            with pytest.raises(Exception) as failed:
                collect(job)
            assert getattr(failed.value, "status", None) == 500
        assert len(collect(queued)[0].tokens) == 4 and engine.ready
    finally:
        engine.stop()


def test_max_context_cuts_a_rope_models_cache_and_is_refused_for_learned_positions(checkpoint, serve_tokenizer):
    from jaxllm import ModelConfig, init_params
    from jaxllm.errors import InputError
    from jaxllm.serve import Engine, EngineSettings

    _, _, gpt_cfg, params = checkpoint
    with pytest.raises(InputError, match="needs a RoPE model"):
        Engine(gpt_cfg, params, serve_tokenizer, EngineSettings(max_context=16))
    cfg = ModelConfig.preset("advanced").replace(vocab_size=gpt_cfg.vocab_size, n_layers=1, d_model=64, n_heads=4,
                                                 n_kv_heads=2, d_ff=128, context_length=1024)  # fmt: skip
    engine = Engine(cfg, init_params(cfg, 0), serve_tokenizer, EngineSettings(slots=2, max_context=32)).start()
    try:
        assert engine.wait_ready(120)
        assert engine.cfg.context_length == 32
        assert engine._state.seq_BS.shape == (1, 32)  # 32 positions per slot, not 1024 (one slot while idle)
    finally:
        engine.stop()
