"""The OpenAI chat completions protocol: `messages` -> the engine request; results -> chat JSON / chunks.

Pure functions (no Flask, no threads). A chat request is a completion request whose one prompt is
the conversation rendered with the checkpoint's chat template (`jaxllm.text.TextCodec.encode_chat`,
as transformers' `apply_chat_template(..., add_generation_prompt=True)`); generation stops at the
model's end-of-turn tokens. Fields besides `/v1/completions`' (see `jaxllm.serve.protocol`):

| field | rule |
|---|---|
| `messages` | required: a non-empty list of `{role, content}`; content a string or text parts |
| `max_completion_tokens`, `max_tokens` | default: the rest of the context (as OpenAI's chat does) |
| `logprobs` | boolean, default false: each completion token's log-probability (`choices[i].logprobs.content`) |
| `top_logprobs` | integer 0 to 20 (needs `logprobs: true`): the most likely tokens at each position |

`stream` with `logprobs` is refused (400 naming `logprobs`): scores are computed after generation.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

from jaxllm.errors import InputError
from jaxllm.serve import protocol
from jaxllm.serve.errors import bad_request
from jaxllm.serve.logprobs import MAX_TOP
from jaxllm.text import TextCodec

NEUTRAL = {"frequency_penalty": (0,), "presence_penalty": (0,), "logit_bias": ({},), "parallel_tool_calls": (),
           "tools": (), "tool_choice": ()}  # fmt: skip
FIELDS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n", "stop",
          "seed", "stream", "stream_options", "user", "ignore_eos", "logprobs", "top_logprobs", *NEUTRAL}  # fmt: skip


def parse_chat(body: Any, context_length: int, tokenizer: Any) -> protocol.CompletionParams:
    """Check a `/v1/chat/completions` body; the conversation becomes the one (token-id) prompt."""
    body = protocol.check_fields(body, FIELDS, NEUTRAL)
    logprobs = protocol._boolean(body, "logprobs")
    top = protocol._integer(body, "top_logprobs", 0, 0, MAX_TOP)
    if protocol._given(body, "top_logprobs") and not logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    if logprobs and protocol._boolean(body, "stream"):
        raise bad_request("logprobs cannot be combined with stream on this server: send stream false", "logprobs")
    codec = TextCodec.wrap(tokenizer)
    if not codec.chat_template:
        raise bad_request("this model has no chat template: use /v1/completions", "messages", "no_chat_template")
    if "messages" not in body or body["messages"] is None:
        raise bad_request("messages is required", "messages")
    try:
        ids = codec.encode_chat(body["messages"])
    except InputError as err:
        raise bad_request(str(err), _field(str(err))) from None
    given = [k for k in ("max_completion_tokens", "max_tokens") if protocol._given(body, k)]
    key = given[0] if given else "max_tokens"
    limit = protocol._integer(body, key, max(context_length - len(ids), 0), 0)
    shared = protocol.FIELDS - set(protocol.NEUTRAL) - {"logprobs", "echo"}  # the sampling fields both take
    completion_like = {k: v for k, v in body.items() if k in shared}
    params = protocol.parse_completion({**completion_like, "prompt": ids or [0], "max_tokens": limit})
    return dataclasses.replace(params, prompts=[ids], logprobs=top if logprobs else None)


def _field(message: str) -> str:
    """The field a message names ("messages[1].role: ..." -> "messages[1].role"), else "messages"."""
    head = message.split(" ", 1)[0]
    return head if head.startswith("messages[") else "messages"


def _choice(index: int, content: str, finish_reason: str | None, logprobs: Any = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": content}, "logprobs": logprobs,
            "finish_reason": finish_reason}  # fmt: skip


def _delta_choice(index: int, text: str, finish_reason: str | None, logprobs: Any = None) -> dict[str, Any]:
    delta = {"content": text} if text or finish_reason is None else {}
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


# The chat endpoint's bodies: the completions' with chat's object names and choice shapes.
chat_response = partial(protocol.completion_response, object_="chat.completion", choice=_choice)
chat_chunk = partial(protocol.chunk, object_="chat.completion.chunk", choice=_delta_choice)


def role_chunk(id: str, model: str, created: int, n: int) -> dict[str, Any]:
    """The first chunk of a chat stream: each choice's `delta.role`, as OpenAI sends it."""
    return {"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                         "finish_reason": None} for i in range(n)]}  # fmt: skip


def chat_id() -> str:
    return protocol.completion_id().replace("cmpl-", "chatcmpl-", 1)
