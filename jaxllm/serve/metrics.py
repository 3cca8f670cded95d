"""Prometheus metrics of one app, on its own `CollectorRegistry` (two apps in one process never collide).

| metric | kind | what |
|---|---|---|
| `jaxllm_http_requests_total{endpoint,method,status}` | counter | every HTTP request, by route and status |
| `jaxllm_completion_requests_total{outcome}` | counter | ok, rejected (refused: 4xx, 503), timeout, cancelled, failed |
| `jaxllm_prompt_tokens_total`, `jaxllm_generated_tokens_total` | counter | tokens in prompts / returned |
| `jaxllm_scoring_requests_total` | counter | requests with `logprobs` (scored after generation) |
| `jaxllm_scored_tokens_total{part}` | counter | tokens scored and returned: `prompt` (echo), `completion` |
| `jaxllm_request_latency_seconds` | histogram | a completion's whole time, request to last token |
| `jaxllm_time_to_first_token_seconds` | histogram | request to its first sampled token |
| `jaxllm_queue_depth` | gauge | jobs waiting in the engine's queue |
| `jaxllm_busy_slots`, `jaxllm_slots` | gauge | KV-cache slots in use / in all |
| `jaxllm_batch_size` | histogram | busy slots in each decode call |
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from jaxllm.serve.engine import Engine

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TTFT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


@dataclass
class Metrics:
    registry: CollectorRegistry
    http_requests: Counter
    completions: Counter
    prompt_tokens: Counter
    generated_tokens: Counter
    scoring_requests: Counter
    scored_tokens: Counter
    chat_requests: Counter
    latency: Histogram
    ttft: Histogram
    batch_size: Histogram


def make_metrics(engine: Engine) -> Metrics:
    """Collectors for one app over `engine` (the engine reports each decode call's batch size to it)."""
    r = CollectorRegistry()
    slots = engine.settings.slots
    batch_buckets = sorted({*(2**i for i in range(slots.bit_length() + 1) if 2**i <= slots), slots})
    m = Metrics(
        registry=r,
        http_requests=Counter(
            "jaxllm_http_requests", "HTTP requests by route and status", ["endpoint", "method", "status"], registry=r
        ),
        completions=Counter("jaxllm_completion_requests", "Completion requests by outcome", ["outcome"], registry=r),
        prompt_tokens=Counter("jaxllm_prompt_tokens", "Prompt tokens of accepted completions", registry=r),
        generated_tokens=Counter("jaxllm_generated_tokens", "Tokens generated and returned", registry=r),
        scoring_requests=Counter("jaxllm_scoring_requests", "Requests with log-probabilities", registry=r),
        scored_tokens=Counter("jaxllm_scored_tokens", "Tokens returned with log-probabilities", ["part"], registry=r),
        chat_requests=Counter("jaxllm_chat_requests", "Accepted chat completion requests", registry=r),
        latency=Histogram(
            "jaxllm_request_latency_seconds", "Request to last token", buckets=LATENCY_BUCKETS, registry=r
        ),
        ttft=Histogram(
            "jaxllm_time_to_first_token_seconds", "Request to its first sampled token", buckets=TTFT_BUCKETS, registry=r
        ),
        batch_size=Histogram("jaxllm_batch_size", "Busy slots per decode call", buckets=batch_buckets, registry=r),
    )
    Gauge("jaxllm_queue_depth", "Jobs waiting for a slot", registry=r).set_function(engine.queue_depth)
    Gauge("jaxllm_busy_slots", "KV-cache slots in use", registry=r).set_function(engine.busy_slots)
    Gauge("jaxllm_slots", "KV-cache slots", registry=r).set(slots)
    engine.on_decode = m.batch_size.observe
    return m
