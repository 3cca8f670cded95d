"""Shared by the serving tests: engine shapes, the reference output, and reading jobs and SSE bodies."""

import json

from jaxllm import generate_text
from jaxllm.completion import Completion
from jaxllm.request import Sampling
from jaxllm.serve.engine import Failed, Finished, Job

SLOTS = 4  # every test engine has 4 slots (and the checkpoint's context of 48): one set of compiled shapes


def reference(checkpoint, tokenizer, prompts, n=1, max_tokens=16, temperature=1.0, top_k=0, top_p=1.0, seed=0,
              stop=()) -> list[str]:  # fmt: skip
    """What `jaxllm.generate_text` gives for a completion request: one row per prompt x n, prompt-major."""
    _, _, cfg, params = checkpoint
    rows = [p for p in prompts for _ in range(n)]
    stop = [stop] if isinstance(stop, str) else list(stop)
    sampling = Sampling(max_tokens, temperature, top_k, top_p, seed, stop)
    return generate_text(cfg, params, tokenizer, rows, sampling)


def collect(job: Job, timeout: float = 60.0) -> list[Completion]:
    """Every row's `Completion`, in row order; raises the job's error if it failed."""
    results: list[Completion | None] = [None] * len(job.req.prompts)
    while any(r is None for r in results):
        event = job.events.get(timeout=timeout)
        if isinstance(event, Failed):
            raise event.error
        if isinstance(event, Finished):
            results[event.row] = event.completion
    return results  # type: ignore[return-value]


def sse_data(body: bytes) -> list[str]:
    """The `data:` payloads of an SSE body (comments dropped), checking the framing as it goes."""
    text = body.decode()
    assert text.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in text[:-2].split("\n\n"):
        assert "\n" not in block, f"one line per event: {block!r}"
        if block.startswith(":"):
            continue
        assert block.startswith("data: "), block
        events.append(block[len("data: ") :])
    return events


def stream_choices(events: list[str]) -> tuple[dict[int, str], dict[int, str], list[dict]]:
    """(text per choice index, finish_reason per index, the parsed chunks) of a streamed completion."""
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    chunks = [json.loads(e) for e in events[:-1]]
    texts: dict[int, str] = {}
    reasons: dict[int, str] = {}
    for c in chunks:
        assert c["object"] == "text_completion" and c["id"] == chunks[0]["id"]
        for choice in c["choices"]:
            i = choice["index"]
            assert i not in reasons, "nothing follows a choice's finish_reason"
            texts[i] = texts.get(i, "") + choice["text"]
            if choice["finish_reason"] is not None:
                reasons[i] = choice["finish_reason"]
    return texts, reasons, chunks
