"""The serving cache follows its requests: cache-length buckets that grow and shrink, chunked prefill.

A tiny Llama with a 512-token context, served with `min_cache=16`: requests of different lengths
span several cache lengths (16 .. 512) and prompts span several prefill chunks. Whatever the cache
length and chunking, a request gives what `jaxllm.generate` gives, and `generate` gives what a
full forward pass gives.
"""

import logging
import threading
import time

import jax
import numpy as np
import pytest

import jaxllm.slots as slots
from jaxllm import ModelConfig, forward, generate, init_params
from jaxllm.request import Sampling, check_request
from jaxllm.serve import Engine, EngineSettings

from serve_helpers import collect

CFG = ModelConfig.preset("advanced").replace(
    vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, context_length=512
)


class Ids:
    """A tokenizer stand-in: text is the ids."""

    def decode(self, ids):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, 0)


def request(prompt, max_new, temperature=0.0, seed=0):
    return check_request(CFG, [prompt], Sampling(max_new, temperature, 0, 1.0, seed, []), None)


def prompt_of(n, seed=0):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, n).tolist()


def test_prefill_in_chunks_matches_a_full_forward_pass(params, monkeypatch):
    """Chunks of 4 tokens: prompts of 1..11 tokens span up to 3 chunks; greedy tokens and logits as uncached."""
    monkeypatch.setattr(slots, "PREFILL_CHUNK", 4)
    jax.clear_caches()  # retrace with the small chunk
    prompts = [prompt_of(n, n) for n in (5, 11, 1, 3)]
    generated = generate(CFG, params, prompts, max_new_tokens=6, temperature=0)
    for prompt, tokens in zip(prompts, generated, strict=True):
        seq = prompt + tokens
        logits = np.asarray(forward(CFG, params, np.asarray([seq])))[0]
        assert tokens == logits[len(prompt) - 1 : -1].argmax(-1).tolist()
    jax.clear_caches()


def test_a_request_needing_a_bigger_cache_mid_flight_leaves_the_others_unchanged(params):
    """A short request runs; a long prompt joins (its cache needs 256) and a third samples; all as `generate`,
    the cache grows to cover them and shrinks back to `min_cache` once they leave."""
    engine = Engine(CFG, params, Ids(), EngineSettings(slots=4, max_prefill_batch=2, steps_per_call=2,
                                                       warmup=False, min_cache=16)).start()  # fmt: skip
    lengths = []
    gate = threading.Event()
    engine.on_decode = lambda busy: (lengths.append(engine._state.seq_BS.shape[1]), gate.wait(10), time.sleep(0.005))
    try:
        reqs = [request(prompt_of(5, 1), 40), request(prompt_of(150, 2), 30), request(prompt_of(20, 3), 25, 1.0, 7)]
        first = engine.submit(reqs[0])
        while not lengths:
            time.sleep(0.01)
        others = [engine.submit(r) for r in reqs[1:]]  # join while the first is decoding
        gate.set()
        results = [collect(job, timeout=300)[0].tokens for job in (first, *others)]
        end = time.monotonic() + 10
        while engine._state.seq_BS.shape[1] != 16 and time.monotonic() < end:
            time.sleep(0.01)
        assert engine._state.seq_BS.shape[1] == 16, "the cache shrinks back once the requests leave"
    finally:
        engine.stop()
    for req, tokens in zip(reqs, results, strict=True):
        assert tokens == generate(CFG, params, req.prompts, Sampling(req.max_new_tokens, req.temperature, 0, 1.0,
                                                                     req.seed, []))[0]  # fmt: skip
    assert lengths[0] == 16 and max(lengths) == 256, lengths  # started short, grew for the long prompt (180)


def test_the_state_holds_only_the_slots_in_use(params):
    """One client's decode computes one row, not `slots`: the state grows to the fewest slots (a power of two)
    holding its busy rows, and shrinks back once they leave; every request still gives what `generate` gives."""
    engine = Engine(CFG, params, Ids(), EngineSettings(slots=8, max_prefill_batch=4, steps_per_call=2,
                                                       warmup=False, min_cache=16)).start()  # fmt: skip
    counts = []
    engine.on_decode = lambda busy: counts.append((busy, engine.state_slots))
    try:
        alone = request(prompt_of(6, 4), 6)
        tokens = collect(engine.submit(alone), timeout=300)[0].tokens
        assert tokens == generate(CFG, params, alone.prompts, max_new_tokens=6)[0]
        assert {n for _, n in counts} == {1}, counts
        counts.clear()
        reqs = [request(prompt_of(4 + i, 10 + i), 8 + 2 * i, 1.0, i) for i in range(3)]
        jobs = [engine.submit(r) for r in reqs]
        results = [collect(job, timeout=300)[0].tokens for job in jobs]
        end = time.monotonic() + 10
        while engine.state_slots != 1 and time.monotonic() < end:
            time.sleep(0.01)
        assert engine.state_slots == 1, "the state shrinks back once the requests leave"
    finally:
        engine.stop()
    assert all(busy <= n <= 4 and n & (n - 1) == 0 for busy, n in counts), counts  # rows take the lowest slots
    assert (3, 4) in counts, counts
    for req, tokens in zip(reqs, results, strict=True):
        assert tokens == generate(CFG, params, req.prompts, Sampling(req.max_new_tokens, req.temperature, 0, 1.0,
                                                                     req.seed, []))[0]  # fmt: skip


def test_prefill_compiles_once_per_batch_and_cache_length_whatever_the_prompt_lengths(params, monkeypatch, caplog):
    traced = []
    real = slots.forward_cached

    def spy(cfg, params, tokens_BT, positions_BT, cache, *a, **k):
        traced.append((tokens_BT.shape, cache[0].k_BKSH.shape[2]))
        return real(cfg, params, tokens_BT, positions_BT, cache, *a, **k)

    jax.clear_caches()
    monkeypatch.setattr(slots, "forward_cached", spy)
    with caplog.at_level(logging.INFO, logger="jaxllm.serve.engine"):
        engine = Engine(CFG, params, Ids(), EngineSettings(slots=4, max_prefill_batch=2, min_cache=64)).start()
        try:
            assert engine.wait_ready(300)
            warm = len(traced)
            jobs = [engine.submit(request(prompt_of(n, n), 4)) for n in (1, 2, 7, 13, 30, 33, 50, 57)]
            for job in jobs:
                collect(job, timeout=300)
            assert all(shape[0] == 2 for shape, _ in traced[warm:]), "only the decode at 2 slots may compile"
            assert all(shape[1] == 1 for shape, _ in traced[warm:]), "prompts of any length compile no prefill"
            collect(engine.submit(request(prompt_of(100, 9), 3)), timeout=300)  # needs cache length 128
        finally:
            engine.stop()
    jax.clear_caches()
    assert warm == 4 and "warm-up: 4 shapes compiled" in caplog.text  # prefill batches 1, 2; decode at 1 and 4 slots
    assert sorted(set(traced)) == sorted(traced), "each shape traced once"
    prefill_shapes = {(shape, s) for shape, s in traced if shape[1] > 1}
    assert prefill_shapes <= {((b, 64), s) for b in (1, 2) for s in (64, 128)}  # one chunk size
    assert "cache length 64 -> 128" in caplog.text
