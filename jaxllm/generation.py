"""Generation, the host API: token ids or strings in, continuations out (see docs/generate.md).

`generate` (token ids), `generate_text` (strings, via a tokenizer) and `complete` (a `Completion`
per prompt) check their input (`jaxllm.request`), choose buckets, run the slot engine
(`jaxllm.slots`), and do what needs Python: stop strings, per-token callbacks for streaming, and
the results (`jaxllm.completion`).

Sampling options come as a `Sampling` object, as keywords (`max_new_tokens=20, temperature=0.8,
top_k=50, top_p=0.95, seed=0, stop=[...]`), or both (keywords replace the object's fields).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from jaxllm.completion import Collector, Completion, TextStream, text_stops
from jaxllm.config import ModelConfig
from jaxllm.model import Params
from jaxllm.request import Request, Sampling, check_request
from jaxllm.sharding import mesh_of
from jaxllm.slots import (
    DecodeState,
    batch_bucket,
    bucket,
    decode_jit,
    inference_config,
    init_state_jit,
    mark_done,
    pack_prompts,
    prefill_jit,
    row_key_data,
)
from jaxllm.text import TextCodec


def complete(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
    *,
    tokenizer: Any = None,
    callback: Callable[[int, int], None] | None = None,
    steps_per_call: int | None = None,
    **options: Any,
) -> list[Completion]:
    """`generate`, returning a `Completion` (tokens, text, finish reason) per prompt."""
    req = check_request(cfg, prompts, Sampling.make(sampling, options), tokenizer)
    return _complete(cfg, params, req, tokenizer, callback, steps_per_call)


def generate(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
    *,
    tokenizer: Any = None,
    callback: Callable[[int, int], None] | None = None,
    steps_per_call: int | None = None,
    **options: Any,
) -> list[list[int]]:
    """Generated token ids for each prompt (a list of token-id lists); the prompt is not included.

    - Options (`jaxllm.Sampling`'s fields): `max_new_tokens`, `temperature` (0: greedy), `top_k`
      (0: off), `top_p` (1: off), `seed`, `stop` (token ids, and strings when `tokenizer` — anything
      with `.decode(ids)` — is given; the tokens that reach into a stop string are not returned).
    - `callback(row, token_id)` is called once per returned token, in generation order, as the
      tokens become final (a token that may begin a stop string waits until that is decided).
    - `steps_per_call`: decode steps per jitted call between host checks (default: all of them in
      one call, or 8 when a callback or stop strings need the host).

    Bad input raises `InputError` (see `jaxllm.request.check_request`). On the CPU, decode runs
    faster on params held as `jaxllm generate` holds them: `cfg, params = decode_layout.prepare(cfg,
    params)` once (`jaxllm.decode_layout`), then generate with those.
    """
    done = complete(
        cfg, params, prompts, sampling, tokenizer=tokenizer, callback=callback, steps_per_call=steps_per_call, **options
    )
    return [c.tokens for c in done]


def generate_text(
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    prompts: str | Sequence[str],
    sampling: Sampling | None = None,
    *,
    on_text: Callable[[int, str], None] | None = None,
    callback: Callable[[int, int], None] | None = None,
    steps_per_call: int | None = None,
    **options: Any,
) -> list[str]:
    """Generated text for each prompt string (one string: a list of one), via `tokenizer`.

    `tokenizer`: a `jaxllm.text.TextCodec` (a checkpoint's: BOS, end tokens) or a bare tokenizer.
    Stops at the model's end tokens (a bare tokenizer's end-of-text token) besides `stop`, unless
    `ignore_eos`; the text ends right before a stop string. `on_text(row, piece)` streams each
    row's text: its pieces add up to the returned string. `callback(row, token_id)` as in `generate`.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    codec = TextCodec.wrap(tokenizer)
    sampling = with_text_stops(cfg, codec, Sampling.make(sampling, options))
    req = check_request(cfg, [codec.encode(t) for t in texts], sampling, codec)
    return complete_text(cfg, params, tokenizer, req, on_text=on_text, callback=callback, steps_per_call=steps_per_call)


def with_text_stops(cfg: ModelConfig, tokenizer: Any, sampling: Sampling) -> Sampling:
    """`sampling` with the tokenizer's end ids added to its stops (unless `ignore_eos`)."""
    if sampling.ignore_eos:
        return sampling
    return Sampling.make(sampling, {"stop": text_stops(cfg, tokenizer, sampling.stop)})


def complete_text(
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    req: Request,
    *,
    on_text: Callable[[int, str], None] | None = None,
    callback: Callable[[int, int], None] | None = None,
    steps_per_call: int | None = None,
) -> list[str]:
    """`generate_text` for a checked request (prompts already tokenized)."""
    streams = [TextStream(tokenizer.decode) for _ in req.prompts]

    def on_token(row: int, token: int) -> None:
        if callback is not None:
            callback(row, token)
        if on_text is not None:
            streams[row].push(token)
            if piece := streams[row].take():
                on_text(row, piece)

    results = _complete(cfg, params, req, tokenizer, on_token if (on_text or callback) else None, steps_per_call)
    out = [c.text or "" for c in results]
    if on_text is not None:
        for row, text in enumerate(out):
            if piece := streams[row].finish(text):
                on_text(row, piece)
    return out


def precompile(cfg: ModelConfig, params: Params, req: Request) -> None:
    """Compile the prefill and decode that `generate` will run for `req` (to time generation apart).

    Runs the prefill once: the decode is compiled for the state it returns, whose placement
    (committed to the device of `params` or not) is part of what a compiled function is keyed on.
    """
    cfg, _, state = _prefilled(cfg, params, req)
    decode_jit.lower(cfg, params, state, np.int32(1), mesh_of(params)).compile()


def _complete(
    cfg: ModelConfig,
    params: Params,
    req: Request,
    tokenizer: Any,
    callback: Callable[[int, int], None] | None,
    steps_per_call: int | None,
) -> list[Completion]:
    if req.max_new_tokens == 0:
        return [Completion([], "" if tokenizer is not None else None, "length") for _ in req.prompts]
    cfg, b, state = _prefilled(cfg, params, req)
    mesh = mesh_of(params)
    n = len(req.prompts)
    rows = Collector(req, tokenizer, callback)
    interactive = callback is not None or bool(req.stop_strings)
    steps = steps_per_call or (8 if interactive else max(req.max_new_tokens, 1))
    while True:
        seq_BS, positions_B, done_B = (np.array(a) for a in (state.seq_BS, state.positions_B, state.done_B))
        raw = [seq_BS[i, len(p) : positions_B[i] + 1].tolist() for i, p in enumerate(req.prompts)]
        ended = rows.update(raw, done_B[:n])
        if rows.all_final:
            break
        if ended:
            finished_B = np.zeros((b,), bool)
            finished_B[ended] = True
            state = mark_done(state, finished_B)
        state = decode_jit(cfg, params, state, np.int32(steps), mesh)
    return rows.results  # type: ignore[return-value]


def _prefilled(cfg: ModelConfig, params: Params, req: Request) -> tuple[ModelConfig, int, DecodeState]:
    """(inference config, slots, engine state after the prefill of `req`'s prompts).

    Sharded `params` (`jaxllm.sharding.mesh_of`) give a cache sharded by the same rules."""
    cfg = inference_config(cfg)
    mesh = mesh_of(params)
    n = len(req.prompts)
    longest = max(len(p) for p in req.prompts)
    b = batch_bucket(n)
    s = bucket(longest + req.max_new_tokens, cfg.context_length)
    x = batch_bucket(len(req.stop_ids))
    keys = row_key_data(req.seed, n)
    prompts = pack_prompts([(p, req, keys[i]) for i, p in enumerate(req.prompts)], b, s, x)
    state = init_state_jit(cfg, b, s, x, mesh)
    state, _ = prefill_jit(cfg, params, state, prompts, np.arange(b, dtype=np.int32), mesh)
    return cfg, b, state
