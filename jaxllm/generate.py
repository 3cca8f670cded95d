"""Generation: a preallocated KV cache, one jitted prefill, a jitted decode loop, and the host edge.

The engine (pure, jit-able; a continuous-batching server reuses it as is)
---------------------------------------------------------------------------
A `DecodeState` holds a fixed number of *slots*. Each slot is an independent sequence with its own
position, end, stop token ids, sampling settings and PRNG key, so one compiled step serves requests
that started at different times with different settings:

- `init_state(cfg, slots, cache_len)`: every slot empty (done).
- `prefill(cfg, params, state, prompts, slots_B)`: run a batch of right-padded prompts through the
  model into a fresh cache, copy each one's keys/values into its slot, and sample its first token.
- `decode_step(cfg, params, state)`: one token for every active slot, each at its own position.
- `decode(cfg, params, state, max_steps)`: `decode_step` in a `lax.while_loop`, until `max_steps`
  steps are done or every slot has finished (a stop token id, or its `max_new` tokens).

Slot b's tokens are `seq_BS[b, :positions_B[b] + 1]`: the prompt, then what was generated. A
server keeps one state, prefills a request into a free (done) slot between decode calls, reads
tokens from `seq_BS`, and frees a slot by leaving it done. Shapes depend only on the number of
slots, the cache length, the prompt bucket and the stop-id width, so requests coming and going,
and their settings, never recompile.

Padding: prompts are right-padded to a bucket length (`bucket`). Every token sits at its own
position (0 for each prompt's first token, as in a full forward pass) and attends only to cache
entries at positions <= its own (`jaxllm.model.forward_cached`). Padding entries lie past their
row's position and are overwritten by generated tokens before any query can reach them, so they
never leak into attention; stale entries of a reused slot are unreachable for the same reason.

The host edge
-------------
`generate` (token ids in and out) and `generate_text` (strings, via a tokenizer) validate input,
choose buckets, run the engine, and handle what needs Python: stop strings (which need text),
per-token callbacks for streaming, and the results. See docs/generate.md.

The package exports the *function* `jaxllm.generate`, which hides this module as an attribute of
`jaxllm`: import engine names with `from jaxllm.generate import prefill, ...` (or
`importlib.import_module("jaxllm.generate")`), not `import jaxllm.generate as m`.
"""

from __future__ import annotations

import math
import operator
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.model import Cache, KVCache, Params, forward_cached, init_cache
from jaxllm.sampling import SamplingParams, sample

MIN_BUCKET = 16  # the shortest prompt / cache bucket; longer ones double up to the context length
TOKENIZER_FILE = "tokenizer.json"


# Engine ---------------------------------------------------------------------------------------


class Prompts(NamedTuple):
    """A batch of requests for `prefill`: prompts right-padded to a bucket length T."""

    tokens_BT: jax.Array  # int32, padding after each prompt (any id; it is never attended to)
    lengths_B: jax.Array  # int32, >= 1
    max_new_B: jax.Array  # int32, tokens to generate at most (0: none; for batch padding)
    keys_B: jax.Array  # PRNG keys; the token after position p is drawn with fold_in(key, p)
    sampling: SamplingParams
    stop_ids_BX: jax.Array  # int32 stop token ids per row, padded with -1


class DecodeState(NamedTuple):
    """Every slot's sequence, cache and settings (see the module docstring)."""

    cache: Cache  # per layer, (slots, kv heads, S, head_dim)
    seq_BS: jax.Array  # int32 token at each position: prompt, then generated tokens
    positions_B: jax.Array  # int32 position of the newest token: the next step's input
    end_B: jax.Array  # int32 prompt length + max_new: the slot stops at position end_B - 1
    done_B: jax.Array  # bool: finished or empty; its steps are computed but change nothing
    keys_B: jax.Array
    sampling: SamplingParams
    stop_ids_BX: jax.Array


def init_state(cfg: ModelConfig, slots: int, cache_len: int, max_stop_ids: int = 1) -> DecodeState:
    """`slots` empty slots with room for `cache_len` positions each (prompt + generated)."""
    return DecodeState(  # distinct buffers (no shared zeros): the state is donated
        cache=init_cache(cfg, slots, cache_len),
        seq_BS=jnp.zeros((slots, cache_len), jnp.int32),
        positions_B=jnp.zeros((slots,), jnp.int32),
        end_B=jnp.zeros((slots,), jnp.int32),
        done_B=jnp.ones((slots,), bool),
        keys_B=jax.random.split(jax.random.key(0), slots),
        sampling=SamplingParams.full(slots),
        stop_ids_BX=jnp.full((slots, max_stop_ids), -1, jnp.int32),
    )


def _is_stop(tokens_B: jax.Array, stop_ids_BX: jax.Array) -> jax.Array:
    return jnp.any(tokens_B[:, None] == stop_ids_BX, axis=-1)


def prefill(
    cfg: ModelConfig, params: Params, state: DecodeState, prompts: Prompts, slots_B: jax.Array
) -> tuple[DecodeState, jax.Array]:
    """Put `prompts` into slots `slots_B` and sample their first tokens; returns (state, logits_BV).

    Needs T <= the cache length. A slot index >= the number of slots drops that row (batch
    padding). `logits_BV` are the logits at each prompt's last token.
    """
    b, t = prompts.tokens_BT.shape
    s = state.seq_BS.shape[1]
    positions_BT = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    last_B = prompts.lengths_B - 1
    logits_B1V, new_cache = forward_cached(
        cfg, params, prompts.tokens_BT, positions_BT, init_cache(cfg, b, t), logits_at_B=last_B
    )
    logits_BV = logits_B1V[:, 0]
    first_B = sample(logits_BV, jax.vmap(jax.random.fold_in)(prompts.keys_B, last_B), prompts.sampling)
    wants_B = prompts.max_new_B > 0
    rows_B = jnp.arange(b)
    seq_BS = jnp.zeros((b, s), jnp.int32).at[:, :t].set(prompts.tokens_BT)
    seq_BS = seq_BS.at[rows_B, jnp.where(wants_B, prompts.lengths_B, s)].set(first_B, mode="drop")
    done_B = ~wants_B | (prompts.max_new_B == 1) | _is_stop(first_B, prompts.stop_ids_BX)

    def put(all_slots: jax.Array, rows: jax.Array) -> jax.Array:
        return all_slots.at[slots_B].set(rows.astype(all_slots.dtype), mode="drop")

    def put_cache(all_slots_BKSH: jax.Array, rows_BKTH: jax.Array) -> jax.Array:
        return all_slots_BKSH.at[slots_B, :, :t].set(rows_BKTH.astype(all_slots_BKSH.dtype), mode="drop")

    state = DecodeState(
        cache=tuple(
            KVCache(put_cache(old.k_BKSH, new.k_BKSH), put_cache(old.v_BKSH, new.v_BKSH))
            for old, new in zip(state.cache, new_cache, strict=True)
        ),
        seq_BS=put(state.seq_BS, seq_BS),
        positions_B=put(state.positions_B, last_B + wants_B),
        end_B=put(state.end_B, prompts.lengths_B + prompts.max_new_B),
        done_B=put(state.done_B, done_B),
        keys_B=put(state.keys_B, prompts.keys_B),
        sampling=SamplingParams(*(put(a, r) for a, r in zip(state.sampling, prompts.sampling, strict=True))),
        stop_ids_BX=put(state.stop_ids_BX, prompts.stop_ids_BX),
    )
    return state, logits_BV


def decode_step(cfg: ModelConfig, params: Params, state: DecodeState) -> tuple[DecodeState, jax.Array]:
    """Feed every slot's newest token at its own position and sample the next; (state, logits_BV).

    Done slots are computed too (a fixed shape) but change nothing: their position does not advance
    and nothing is written to `seq_BS`. Logits are those of each slot's newest token.
    """
    b, s = state.seq_BS.shape
    rows_B = jnp.arange(b)
    tokens_B = state.seq_BS[rows_B, state.positions_B]
    logits_B1V, cache = forward_cached(cfg, params, tokens_B[:, None], state.positions_B[:, None], state.cache)
    logits_BV = logits_B1V[:, 0]
    next_B = sample(logits_BV, jax.vmap(jax.random.fold_in)(state.keys_B, state.positions_B), state.sampling)
    active_B = ~state.done_B
    positions_B = state.positions_B + active_B
    seq_BS = state.seq_BS.at[rows_B, jnp.where(active_B, positions_B, s)].set(next_B, mode="drop")
    finished_B = _is_stop(next_B, state.stop_ids_BX) | (positions_B >= state.end_B - 1)
    done_B = state.done_B | (active_B & finished_B)
    return state._replace(cache=cache, seq_BS=seq_BS, positions_B=positions_B, done_B=done_B), logits_BV


def decode(cfg: ModelConfig, params: Params, state: DecodeState, max_steps: jax.Array | int) -> DecodeState:
    """Up to `max_steps` decode steps (a traced value: no recompiling), ending early once all are done."""

    def cond(carry: tuple[jax.Array, DecodeState]) -> jax.Array:
        i, st = carry
        return (i < max_steps) & ~jnp.all(st.done_B)

    def body(carry: tuple[jax.Array, DecodeState]) -> tuple[jax.Array, DecodeState]:
        i, st = carry
        return i + 1, decode_step(cfg, params, st)[0]

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def request_keys(seed: int, n: int) -> jax.Array:
    """PRNG keys for rows 0..n-1 of a request: fold_in(key(seed), row); seed taken modulo 2**32."""
    return _request_keys(np.uint32(seed % 2**32), n)


@partial(jax.jit, static_argnums=1)
def _request_keys(seed: jax.Array, n: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(n))


# Jitted once per (cfg, shapes); the state is donated so the cache is updated in place.
init_state_jit = jax.jit(init_state, static_argnums=(0, 1, 2, 3))
prefill_jit = jax.jit(prefill, static_argnums=0, donate_argnums=2)
decode_step_jit = jax.jit(decode_step, static_argnums=0, donate_argnums=2)
decode_jit = jax.jit(decode, static_argnums=0, donate_argnums=2)


@jax.jit
def mark_done(state: DecodeState, finished_B: jax.Array) -> DecodeState:
    """Mark the slots in `finished_B` done (stopped, cancelled or freed); they take no more tokens."""
    return state._replace(done_B=state.done_B | finished_B)


# Host edge: validation and buckets --------------------------------------------------------------


def bucket(n: int, cap: int) -> int:
    """The static length for n tokens: MIN_BUCKET doubled until it holds n, at most `cap`."""
    return min(MIN_BUCKET << max(0, math.ceil(math.log2(max(n, 1) / MIN_BUCKET))), cap)


def batch_bucket(n: int) -> int:
    """Batches are padded to a power of two, so each size class compiles once."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


@dataclass(frozen=True)
class Request:
    """Checked, normalised arguments of one `generate` call (shared with torch_ref.generate)."""

    prompts: list[list[int]]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_ids: list[int]
    stop_strings: list[str]


def _as_int(x: Any, what: str) -> int:
    if isinstance(x, bool):
        raise InputError(f"{what} must be an integer, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise InputError(f"{what} must be an integer, got {x!r}") from None


def check_request(
    cfg: ModelConfig,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    stop: Sequence[int | str],
    tokenizer: Any = None,
) -> Request:
    """Raise `InputError` with a clear message for any bad argument; else the normalised request.

    Refused: no prompts, an empty prompt, a token id outside the vocabulary, temperature < 0 (or
    not finite), top_k < 0, top_p outside (0, 1], max_new_tokens < 0, a prompt longer than the
    context, prompt + max_new_tokens past the context, stop strings without a tokenizer.
    """
    if isinstance(prompts, np.ndarray):
        prompts = list(prompts)
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence | np.ndarray):
            raise InputError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        ids = [_as_int(t, f"prompt {i}'s tokens") for t in np.asarray(prompt).reshape(-1).tolist()]
        if not ids:
            raise InputError(f"prompt {i} is empty: generation needs at least one token to continue")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        checked.append(ids)
    max_new_tokens = _as_int(max_new_tokens, "max_new_tokens")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    c = cfg.context_length
    for i, ids in enumerate(checked):
        if len(ids) > c:
            raise InputError(f"prompt {i} has {len(ids)} tokens, more than the context length {c}")
        if len(ids) + max_new_tokens > c:
            raise InputError(
                f"prompt {i} ({len(ids)} tokens) + max_new_tokens {max_new_tokens} = {len(ids) + max_new_tokens} "
                f"tokens overflows the context length {c}; use max_new_tokens <= {c - len(ids)}"
            )
    try:
        temperature = float(temperature)
        top_p = float(top_p)
    except (TypeError, ValueError):
        raise InputError(f"temperature and top_p must be numbers, got {temperature!r}, {top_p!r}") from None
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    top_k = _as_int(top_k, "top_k")
    if top_k < 0:
        raise InputError(f"top_k must be >= 0 (0 switches it off), got {top_k}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 switches it off), got {top_p}")
    seed = _as_int(seed, "seed")
    if isinstance(stop, str | int):
        stop = [stop]
    stop_ids, stop_strings = [], []
    for item in stop:
        if isinstance(item, str):
            if not item:
                raise InputError("a stop string must not be empty")
            stop_strings.append(item)
        else:
            tok = _as_int(item, "a stop token id")
            if not 0 <= tok < cfg.vocab_size:
                raise InputError(f"stop token id {tok} is outside the vocabulary [0, {cfg.vocab_size})")
            stop_ids.append(tok)
    if stop_strings and tokenizer is None:
        raise InputError("stop strings need a tokenizer (to turn tokens into text); pass tokenizer=...")
    return Request(checked, max_new_tokens, temperature, top_k, top_p, seed, sorted(set(stop_ids)), stop_strings)


# Host edge: stop strings ----------------------------------------------------------------------


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """The index in `text` where the earliest stop string begins, or None."""
    found = [i for s in stop_strings if (i := text.find(s)) >= 0]
    return min(found) if found else None


def _partial_stop_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (it may yet complete)."""
    return max((n for s in stop_strings for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


def _tokens_within(tokens: list[int], prefix: str, decode: Callable[[list[int]], str]) -> int:
    """The most leading tokens whose text is a prefix of `prefix`."""
    for j in range(len(tokens), 0, -1):
        if prefix.startswith(decode(tokens[:j])):
            return j
    return 0


def settle(
    tokens: list[int], stop_strings: Sequence[str], decode: Callable[[list[int]], str], finished: bool
) -> tuple[int, int | None]:
    """(how many leading tokens are final, where a stop string begins in their text or None).

    Without a stop string in the text, tokens are final except those that could be the beginning of
    one (held back until it completes or not); once a stop string appears, the final tokens are
    those whose text ends before it, and generation stops. Shared with torch_ref.generate.
    """
    if not stop_strings:
        return len(tokens), None
    text = decode(tokens)
    cut = find_stop(text, stop_strings)
    if cut is not None:
        return _tokens_within(tokens, text[:cut], decode), cut
    if finished:
        return len(tokens), None
    return _tokens_within(tokens, text[: len(text) - _partial_stop_len(text, stop_strings)], decode), None


@dataclass
class Completion:
    """One prompt's result: `tokens` (prompt and stop tokens excluded), `text` when a tokenizer was
    given (cut right before a stop string), and why it ended: "stop" or "length"."""

    tokens: list[int]
    text: str | None
    finish_reason: str


class Collector:
    """Host bookkeeping shared by jaxllm and torch_ref: turns each row's raw generated tokens into
    final ones (stop ids and stop strings), and calls the callback once per final token, in order."""

    def __init__(self, req: Request, tokenizer: Any, callback: Callable[[int, int], None] | None):
        self.req, self.callback = req, callback
        self.decode = (lambda ids: tokenizer.decode(ids)) if tokenizer is not None else None
        n = len(req.prompts)
        self.delivered, self.final = [0] * n, [False] * n
        self.results: list[Completion | None] = [None] * n

    def update(self, raw: list[list[int]], done: Sequence[bool]) -> list[int]:
        """Take each row's generated tokens so far; returns rows that a stop string has just ended."""
        stop_ids = set(self.req.stop_ids)
        fresh: list[list[int]] = []
        ended = []
        for b, tokens in enumerate(raw):
            if self.final[b]:
                fresh.append([])
                continue
            hit_id = bool(done[b]) and bool(tokens) and tokens[-1] in stop_ids
            if hit_id:
                tokens = tokens[:-1]
            n_final, cut = settle(tokens, self.req.stop_strings, self.decode, bool(done[b]))
            fresh.append(tokens[self.delivered[b] : n_final])
            self.delivered[b] = n_final
            if cut is not None or done[b]:
                self.final[b] = True
                text = None
                if self.decode is not None:
                    text = self.decode(tokens) if cut is None else self.decode(tokens)[:cut]
                reason = "stop" if (cut is not None or hit_id) else "length"
                self.results[b] = Completion(tokens[:n_final], text, reason)
                if cut is not None and not done[b]:
                    ended.append(b)
        if self.callback is not None:
            for i in range(max(map(len, fresh), default=0)):
                for b, new in enumerate(fresh):
                    if i < len(new):
                        self.callback(b, new[i])
        return ended

    @property
    def all_final(self) -> bool:
        return all(self.final)


# Host edge: generate ----------------------------------------------------------------------------


def complete(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[int | str] = (),
    *,
    tokenizer: Any = None,
    callback: Callable[[int, int], None] | None = None,
    steps_per_call: int | None = None,
) -> list[Completion]:
    """`generate`, returning a `Completion` (tokens, text, finish reason) per prompt."""
    req = check_request(cfg, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop, tokenizer)
    if req.max_new_tokens == 0:
        return [Completion([], "" if tokenizer is not None else None, "length") for _ in req.prompts]
    cfg, b, state = _prefilled(cfg, params, req)
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
        state = decode_jit(cfg, params, state, np.int32(steps))
    return rows.results  # type: ignore[return-value]


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """Recomputation (remat) only matters for gradients: inference shares the compiled code without it."""
    return cfg if cfg.remat == "none" else cfg.replace(remat="none")


def _prefilled(cfg: ModelConfig, params: Params, req: Request) -> tuple[ModelConfig, int, DecodeState]:
    """(inference config, slots, engine state after the prefill of `req`'s prompts)."""
    cfg = inference_config(cfg)
    b, s, x, prompts_in = _plan(cfg, req)
    state, _ = prefill_jit(cfg, params, init_state_jit(cfg, b, s, x), prompts_in, np.arange(b, dtype=np.int32))
    return cfg, b, state


def _plan(cfg: ModelConfig, req: Request) -> tuple[int, int, int, Prompts]:
    """(slots, cache length, stop-id width, engine prompts) for a request, shapes padded to buckets."""
    n = len(req.prompts)
    lengths = [len(p) for p in req.prompts]
    b = batch_bucket(n)
    t = bucket(max(lengths), cfg.context_length)
    s = bucket(max(lengths) + req.max_new_tokens, cfg.context_length)
    x = batch_bucket(len(req.stop_ids))
    tokens_BT = np.zeros((b, t), np.int32)
    for i, p in enumerate(req.prompts):
        tokens_BT[i, : len(p)] = p
    lengths_B = np.array(lengths + [1] * (b - n), np.int32)
    max_new_B = np.array([req.max_new_tokens] * n + [0] * (b - n), np.int32)
    stop_ids_BX = np.full((b, x), -1, np.int32)
    stop_ids_BX[:, : len(req.stop_ids)] = req.stop_ids
    sampling = SamplingParams.full(b, req.temperature, req.top_k, req.top_p)
    return b, s, x, Prompts(tokens_BT, lengths_B, max_new_B, request_keys(req.seed, b), sampling, stop_ids_BX)


def precompile(cfg: ModelConfig, params: Params, req: Request) -> None:
    """Compile the prefill and decode that `generate` will run for `req` (to time generation apart).

    Runs the prefill once: the decode is compiled for the state it returns, whose placement
    (committed to the device of `params` or not) is part of what a compiled function is keyed on.
    """
    cfg, _, state = _prefilled(cfg, params, req)
    decode_jit.lower(cfg, params, state, np.int32(1)).compile()


def generate(
    cfg: ModelConfig,
    params: Params,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[int | str] = (),
    *,
    tokenizer: Any = None,
    callback: Callable[[int, int], None] | None = None,
    steps_per_call: int | None = None,
) -> list[list[int]]:
    """Generated token ids for each prompt (a list of token-id lists); the prompt is not included.

    - Sampling: `temperature` 0 is greedy; else temperature, then `top_k` (0: off), then `top_p`
      (1: off), in the order of `jaxllm.sampling`. Each row draws from its own key, derived from
      `seed` and its index: the same seed and prompts give the same tokens.
    - Stopping: after `max_new_tokens` tokens, or at a stop token id in `stop` (the id is not
      returned), or at a stop string in `stop` (needs `tokenizer`, anything with `.decode(ids)`;
      the tokens that reach into the stop string are not returned).
    - `callback(row, token_id)` is called once per returned token, in generation order, as the
      tokens become final (a token that may begin a stop string waits until that is decided).
    - `steps_per_call`: decode steps per jitted call between host checks (default: all of them in
      one call, or 8 when a callback or stop strings need the host).

    Bad input raises `InputError` (see `check_request`).
    """
    done = complete(
        cfg,
        params,
        prompts,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop,
        tokenizer=tokenizer,
        callback=callback,
        steps_per_call=steps_per_call,
    )
    return [c.tokens for c in done]


def end_of_text_id(tokenizer: Any) -> int | None:
    """The id of the tokenizer's end-of-text token, or None when it has none."""
    try:
        from jaxllm.data.tokenizer import eot_of
    except ImportError:  # the data package is optional here
        return tokenizer.get_vocab(with_added_tokens=True).get("<|endoftext|>")
    try:
        return eot_of(tokenizer)[1]
    except InputError:
        return None


def load_tokenizer(checkpoint_dir: str | Path, path: str | Path | None = None) -> Any:
    """The `tokenizer.json` stored with a checkpoint (or at `path`), as a `tokenizers.Tokenizer`."""
    file = Path(path) if path is not None else Path(checkpoint_dir) / TOKENIZER_FILE
    if not file.is_file():
        if path is not None:
            raise InputError(f"tokenizer file not found: {file}")
        raise InputError(
            f"{file} not found: this checkpoint has no tokenizer; pass --tokenizer PATH "
            f"(the {TOKENIZER_FILE} of the dataset it was trained on)"
        )
    try:
        from jaxllm.data.tokenizer import load_tokenizer as load
    except ImportError:
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a plain Exception for a bad file
            raise InputError(f"{file} is not a valid {TOKENIZER_FILE}: {err}") from None
    return load(file)


def generate_text(
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    prompts: str | Sequence[str],
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    stop: Sequence[str | int] = (),
    *,
    on_text: Callable[[int, str], None] | None = None,
    callback: Callable[[int, int], None] | None = None,
    steps_per_call: int | None = None,
) -> list[str]:
    """Generated text for each prompt string (one string: a list of one), via `tokenizer`.

    Stops at the tokenizer's end-of-text token (when it has one) besides `stop`; the text ends right
    before a stop string. `on_text(row, piece)` streams each row's text: its pieces add up to the
    returned string. `callback(row, token_id)` as in `generate`.
    """
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    token_prompts = [tokenizer.encode(t).ids for t in texts]
    return _complete_text(
        cfg,
        params,
        tokenizer,
        token_prompts,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop,
        on_text=on_text,
        callback=callback,
        steps_per_call=steps_per_call,
    )


def _text_stops(cfg: ModelConfig, tokenizer: Any, stop: str | int | Sequence[str | int]) -> list[str | int]:
    """`stop` plus the tokenizer's end-of-text id."""
    eot = end_of_text_id(tokenizer)
    stop = [stop] if isinstance(stop, str | int) else list(stop)
    return [*stop, *([eot] if eot is not None and eot < cfg.vocab_size else [])]


def _complete_text(
    cfg: ModelConfig,
    params: Params,
    tokenizer: Any,
    token_prompts: list[list[int]],
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    stop: Sequence[str | int],
    *,
    on_text: Callable[[int, str], None] | None = None,
    callback: Callable[[int, int], None] | None = None,
    steps_per_call: int | None = None,
) -> list[str]:
    """`generate_text` from prompts already tokenized."""
    shown = [""] * len(token_prompts)
    seen: list[list[int]] = [[] for _ in token_prompts]

    def on_token(row: int, token: int) -> None:
        if callback is not None:
            callback(row, token)
        if on_text is not None:
            seen[row].append(token)
            text = tokenizer.decode(seen[row]).rstrip("\ufffd")  # hold back a partial UTF-8 character
            if text.startswith(shown[row]) and len(text) > len(shown[row]):
                on_text(row, text[len(shown[row]) :])
                shown[row] = text

    results = complete(
        cfg,
        params,
        token_prompts,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        _text_stops(cfg, tokenizer, stop),
        tokenizer=tokenizer,
        callback=on_token if (on_text or callback) else None,
        steps_per_call=steps_per_call,
    )
    out = [c.text or "" for c in results]
    if on_text is not None:
        for row, text in enumerate(out):
            if text.startswith(shown[row]) and len(text) > len(shown[row]):
                on_text(row, text[len(shown[row]) :])
    return out


# Host edge: the `jaxllm generate` command ----------------------------------------------------------


@dataclass
class SampleStats:
    tokens: int
    seconds: float  # generation, compilation excluded
    compile_seconds: float

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"{self.tokens} tokens in {self.seconds:.2f} s: {rate:.1f} tokens/s "
            f"(compilation before that: {self.compile_seconds:.1f} s)"
        )


def sample_checkpoint(
    checkpoint: str | Path,
    prompt: str,
    *,
    tokenizer_path: str | Path | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    out: Any = None,
) -> SampleStats:
    """What `jaxllm generate` does: load a checkpoint and its tokenizer, sample, print to `out`.

    One sample streams as it is generated; several print one after another. An empty prompt
    starts from the end-of-text token (unconditional samples). `max_new_tokens` None: as many as
    the context leaves, at most 256.
    """
    from jaxllm.checkpoint import load_params

    out = out or sys.stdout
    cfg, params = load_params(checkpoint)
    tokenizer = load_tokenizer(checkpoint, tokenizer_path)
    n_vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_vocab > cfg.vocab_size:
        raise InputError(f"the tokenizer has {n_vocab} tokens, more than the model's vocabulary of {cfg.vocab_size}")
    num_samples = _as_int(num_samples, "num_samples")
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    ids = tokenizer.encode(prompt).ids
    eot = end_of_text_id(tokenizer)
    if not ids and eot is not None:
        ids = [eot]
    if max_new_tokens is None:
        max_new_tokens = max(0, min(256, cfg.context_length - len(ids)))
    start = time.perf_counter()
    all_stops = _text_stops(cfg, tokenizer, stop)
    req = check_request(cfg, [ids] * num_samples, max_new_tokens, temperature, top_k, top_p, seed, all_stops, tokenizer)
    if req.max_new_tokens > 0:
        precompile(cfg, params, req)
    compile_seconds = time.perf_counter() - start
    stream = num_samples == 1
    if stream:
        print(prompt, end="", file=out, flush=True)
    counted: list[int] = []

    def on_text(row: int, piece: str) -> None:
        print(piece, end="", file=out, flush=True)

    start = time.perf_counter()
    texts = _complete_text(
        cfg,
        params,
        tokenizer,
        [ids] * num_samples,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        seed,
        stop,
        on_text=on_text if stream else None,
        callback=lambda row, token: counted.append(token),
    )
    elapsed = time.perf_counter() - start
    if stream:
        print(file=out)
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} ---\n{prompt}{text}", file=out)
    return SampleStats(len(counted), elapsed, compile_seconds)
