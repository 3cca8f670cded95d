"""The OpenAI completions protocol: JSON body -> checked engine request, results -> response JSON / SSE.

Pure functions (no Flask, no threads). Field rules (null means "not given": the default):

| field | type | default | rule |
|---|---|---|---|
| `prompt` | string, list of strings, token ids, list of token-id lists | required | "" is end-of-text |
| `max_tokens` | integer | 16 | >= 0; prompt + max_tokens <= the context, else 400 `context_length_exceeded` |
| `temperature` | number | 1 | 0 to 2 (0 is greedy) |
| `top_p` | number | 1 | > 0 and <= 1 |
| `top_k` | integer | 0 (off) | >= 0 (an extension of the OpenAI API) |
| `n` | integer | 1 | 1 to 128; prompts x n <= 128 |
| `stop` | string or list of up to 4 non-empty strings | none | |
| `seed` | integer | random | 0 to 2**32 - 1; the same seed and request give the same text |
| `stream`, `stream_options.include_usage` | boolean | false | |
| `model` | string | the served model | must be the served model's id, else 404 |
| `best_of` | integer | n | must equal n |
| `logprobs` | integer | null | 0 to 5: each token's log-probability and the `logprobs` most likely tokens |
| `echo` | boolean | false | the prompt's tokens come first in `text` and in `logprobs` |
| `suffix` | | | only null |
| `frequency_penalty`, `presence_penalty`, `logit_bias` | | | only 0 / 0 / {} |
| `user` | string | | ignored |

Values are then checked by `jaxllm.request.check_request` (token ids, the context), the same check
`jaxllm.generate` makes; its message comes back as a 400. `stream` with `logprobs` or `echo` is
refused (400 naming the field): the scores are computed after generation (`jaxllm.scoring`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from jaxllm.completion import Completion, text_stops
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.request import SEED_MAX, Request, Sampling, check_request
from jaxllm.serve.errors import ServeError, bad_request
from jaxllm.serve.logprobs import Scoring
from jaxllm.text import TextCodec

MAX_ROWS = 128  # prompts x n in one request
MAX_STOP = 4
MAX_LOGPROBS = 5  # OpenAI's limit for the completions endpoint
NEUTRAL = {  # OpenAI fields accepted only at the value that changes nothing
    "suffix": (),
    "frequency_penalty": (0,),
    "presence_penalty": (0,),
    "logit_bias": ({},),
}
FIELDS = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "n", "stop", "seed", "stream",
          "stream_options", "best_of", "user", "ignore_eos", "logprobs", "echo", *NEUTRAL}  # fmt: skip
INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class CompletionParams:
    """A parsed `POST /v1/completions` body (types and ranges checked, defaults filled in)."""

    prompts: list[str | list[int]]
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    ignore_eos: bool = False  # an extension (vLLM's name): do not stop at the model's end tokens
    logprobs: int | None = None  # alternatives per token; None: no log-probabilities
    echo: bool = False  # the prompt's text and scored tokens come first


def scoring_of(params: CompletionParams) -> Scoring | None:
    """What the engine must score for `params` (None: nothing)."""
    if params.logprobs is None:  # echo alone only puts the prompt's text first
        return None
    return Scoring(echo=params.echo, top=params.logprobs or 0)


def parse_json(data: bytes) -> Any:
    """The request body as JSON (no NaN/Infinity), or a 400."""
    try:
        return json.loads(data, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise bad_request(f"the request body is not valid JSON: {err}") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _given(body: dict[str, Any], name: str) -> bool:
    return body.get(name) is not None


def _integer(body: dict[str, Any], name: str, default: int, lo: int | None = None, hi: int | None = None) -> int:
    if not _given(body, name):
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise bad_request(f"{name} must be an integer, got {json.dumps(value)[:40]}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise bad_request(f"{name} must be {_range(lo, hi)}, got {value}", name)
    return value


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    if not _given(body, name):
        return default
    value = body[name]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise bad_request(f"{name} must be a number, got {json.dumps(value)[:40]}", name)
    value = float(value) if abs(value) < 1e300 else math.inf
    if not (lo < value if lo_open else lo <= value) or not value <= hi:
        interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise bad_request(f"{name} must be in {interval}, got {value:g}", name)
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {json.dumps(value)[:40]}", name)
    return bool(value)


def _range(lo: int | None, hi: int | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo} and {hi}"
    return f">= {lo}" if lo is not None else f"<= {hi}"


def _is_ids(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)


def _check_text(text: str, what: str, param: str) -> str:
    """`text` if it is encodable (JSON's "\\ud800" escapes give lone surrogates, which are not text), else a 400."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        message = f"{what} is not valid Unicode text: a lone surrogate at position {err.start}"
        raise bad_request(message, param) from None
    return text


def _prompts(body: dict[str, Any]) -> list[str | list[int]]:
    if "prompt" not in body or body["prompt"] is None:
        raise bad_request("prompt is required", "prompt")
    p = body["prompt"]
    if isinstance(p, str):
        return [_check_text(p, "prompt", "prompt")]
    if _is_ids(p):
        return [p]
    if isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        return [_check_text(x, f"prompt {i}", "prompt") for i, x in enumerate(p)]
    if isinstance(p, list) and p and all(_is_ids(x) for x in p):
        return list(p)
    raise bad_request(
        "prompt must be a string, a non-empty list of strings, a list of token ids or a list of token-id lists",
        "prompt",
    )


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad_request(f"stop must be a non-empty string or a list of at most {MAX_STOP} of them", "stop")
    return [_check_text(s, "stop", "stop") for s in stops]


def check_fields(body: Any, fields: set[str], neutral: dict[str, tuple]) -> dict[str, Any]:
    """`body` if it is a JSON object of known `fields`, each of the `neutral` ones at a value that changes
    nothing; else a 400 naming the field (shared by the completions and chat endpoints)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    unknown = sorted(set(body) - fields)
    if unknown:
        raise bad_request(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0])
    for name, values in neutral.items():
        if _given(body, name) and body[name] not in values:
            raise bad_request(f"{name} is not supported by this server", name)
    return body


def parse_completion(body: Any) -> CompletionParams:
    """Check a `/v1/completions` body's fields (types, ranges); raises `ServeError` 400 naming the field."""
    body = check_fields(body, FIELDS, NEUTRAL)
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string", "model")
    if model is not None:
        _check_text(model, "model", "model")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise bad_request("user must be a string", "user")
    prompts = _prompts(body)
    n = _integer(body, "n", 1, 1, MAX_ROWS)
    if _given(body, "best_of") and _integer(body, "best_of", n) != n:
        raise bad_request("best_of must equal n (this server returns every sample)", "best_of")
    if len(prompts) * n > MAX_ROWS:
        raise bad_request(f"prompts x n must be <= {MAX_ROWS}, got {len(prompts)} x {n}", "n")
    stream = _boolean(body, "stream")
    options = body.get("stream_options")
    if options is not None:
        if not stream:
            raise bad_request("stream_options is only allowed when stream is true", "stream_options")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise bad_request('stream_options must be an object like {"include_usage": true}', "stream_options")
    include_usage = _boolean(options, "include_usage") if isinstance(options, dict) else False
    logprobs = _integer(body, "logprobs", 0, 0, MAX_LOGPROBS) if _given(body, "logprobs") else None
    echo = _boolean(body, "echo")
    for name, wanted in (("logprobs", logprobs is not None), ("echo", echo)):
        if stream and wanted:
            raise bad_request(f"{name} cannot be combined with stream on this server: send stream false", name)
    return CompletionParams(
        prompts=prompts,
        max_tokens=_integer(body, "max_tokens", 16, 0),
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=_integer(body, "top_k", 0, 0, INT32_MAX),
        n=n,
        stop=_stop(body),
        seed=_integer(body, "seed", 0, 0, SEED_MAX) if _given(body, "seed") else None,
        stream=stream,
        include_usage=include_usage,
        model=model,
        ignore_eos=_boolean(body, "ignore_eos"),
        logprobs=logprobs,
        echo=echo,
    )


def to_request(params: CompletionParams, cfg: ModelConfig, tokenizer: Any) -> tuple[Request, int]:
    """(the engine request: one row per prompt x n, prompt-major; prompt tokens counted once per prompt).

    Tokenizes string prompts ("" is the end-of-text token alone), refuses a prompt + max_tokens past
    the context (400 `context_length_exceeded`), then checks everything with `check_request`.
    """
    codec = TextCodec.wrap(tokenizer)
    prompts = []
    for i, p in enumerate(params.prompts):
        ids = codec.encode(p) if isinstance(p, str) else p
        if not ids:
            try:
                ids = codec.start_ids()
            except InputError as err:
                raise bad_request(f"prompt {i}: {err}", "prompt") from None
        prompts.append(ids)
    c = cfg.context_length
    for i, ids in enumerate(prompts):
        if len(ids) + params.max_tokens > c:
            raise bad_request(
                f"This model's maximum context length is {c} tokens, however you requested "
                f"{len(ids) + params.max_tokens} tokens ({len(ids)} in prompt {i}; {params.max_tokens} for the "
                f"completion). Please reduce the prompt or max_tokens.",
                "max_tokens",
                "context_length_exceeded",
            )
    seed = params.seed if params.seed is not None else secrets.randbits(32)
    stops = params.stop if params.ignore_eos else text_stops(cfg, tokenizer, params.stop)
    sampling = Sampling(params.max_tokens, params.temperature, params.top_k, params.top_p, seed, stops)
    try:
        req = check_request(cfg, prompts, sampling, tokenizer)
    except InputError as err:
        raise bad_request(str(err), "prompt" if str(err).startswith("prompt") else None) from None
    rows = [p for p in req.prompts for _ in range(params.n)]
    return dataclasses.replace(req, prompts=rows), sum(map(len, prompts))


# Responses ---------------------------------------------------------------------------------------


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _choice(index: int, text: str, finish_reason: str | None, logprobs: Any = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def completion_response(
    id: str, model: str, created: int, results: Sequence[Completion], prompt_tokens: int,
    object_: str = "text_completion", choice: Callable[..., dict[str, Any]] = _choice,
    texts: Sequence[str] | None = None, logprobs: Sequence[Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The non-streaming response body (`object_` and `choice` make the chat endpoint's); `texts`
    replace the choices' texts (echo), `logprobs` are the choices' log-probability objects."""
    texts = texts if texts is not None else [c.text or "" for c in results]
    logprobs = logprobs if logprobs is not None else [None] * len(results)
    return {
        "id": id,
        "object": object_,
        "created": created,
        "model": model,
        "choices": [choice(i, texts[i], c.finish_reason, logprobs[i]) for i, c in enumerate(results)],
        "usage": usage(prompt_tokens, sum(len(c.tokens) for c in results)),
    }


def chunk(
    id: str,
    model: str,
    created: int,
    choices: list[tuple[int, str, str | None]],
    usage_: dict[str, int] | None = None,
    with_usage: bool = False,
    object_: str = "text_completion",
    choice: Callable[..., dict[str, Any]] = _choice,
) -> dict[str, Any]:
    """One streamed chunk: (index, text, finish_reason) per choice; `usage` only when requested."""
    body: dict[str, Any] = {
        "id": id,
        "object": object_,
        "created": created,
        "model": model,
        "choices": [choice(i, text, reason) for i, text, reason in choices],
    }
    if with_usage:
        body["usage"] = usage_
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One Server-Sent Event: `data: <json>` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n".encode()


SSE_DONE = sse("[DONE]")
SSE_PING = b": ping\n\n"  # a comment line: clients ignore it; writing it notices a client that left


def error_event(err: ServeError) -> bytes:
    return sse(err.body())


def now() -> int:
    return int(time.time())


def check_model(params: CompletionParams, served: str) -> None:
    if params.model is not None and params.model != served:
        raise ServeError(
            404, f"The model '{params.model}' does not exist; this server serves '{served}'", param="model",
            code="model_not_found",
        )  # fmt: skip
