"""The slot engine: a preallocated KV cache, one jitted prefill, a jitted decode loop (pure, jit-able).

A `DecodeState` holds a fixed number of *slots*. Each slot is an independent sequence with its own
position, end, stop token ids, sampling settings and PRNG key, so one compiled step serves requests
that started at different times with different settings:

- `init_state(cfg, slots, cache_len)`: every slot empty (done).
- `prefill(cfg, params, state, prompts, slots_B)`: run a batch of right-padded prompts through the
  model in chunks of `PREFILL_CHUNK` tokens (a loop inside one compiled call), each chunk written
  into a fresh cache at its positions; copy each row's cache into its slot, and sample its first
  token. Compiled once per (batch, cache length, prompt width): callers pass prompts as wide as
  the cache, so a prompt's length never adds a shape. It is `prefill_rows` (the model's part: the
  new rows as a state of their own, whatever the slot count) then `insert` (the rows into slots).
- `resize(state, length, slots)`: a cache of another length (grown with zeros, or cut where no
  active slot reaches) and, optionally, another number of slots (empty ones appended, or free ones
  cut from the end), so a server's state follows what its requests need.
- `decode_step(cfg, params, state)`: one token for every active slot, each at its own position.
- `decode(cfg, params, state, max_steps)`: `decode_step` in a `lax.while_loop`, until `max_steps`
  steps are done or every slot has finished (a stop token id, or its `max_new` tokens).
- `pack_prompts`: the host side of a prefill, rows of checked requests padded into `Prompts`.

Slot b's tokens are `seq_BS[b, :positions_B[b] + 1]`: the prompt, then what was generated. A
server keeps one state, prefills a request into a free (done) slot between decode calls, reads
tokens from `seq_BS`, and frees a slot by leaving it done. Shapes depend only on the number of
slots, the cache length, the prompt width and the stop-id width, so requests coming and going,
and their settings, never recompile.

Padding: prompts are right-padded (to the cache length, by the engine and `generate`). Every token sits at its own
position (0 for each prompt's first token, as in a full forward pass) and attends only to cache
entries at positions <= its own (`jaxllm.model.forward_cached`). Padding entries lie past their
row's position and are overwritten by generated tokens before any query can reach them, so they
never leak into attention; stale entries of a reused slot are unreachable for the same reason.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec

from jaxllm import cpu_kernels
from jaxllm.config import ModelConfig
from jaxllm.model import Cache, Params, cache_axes, forward_cached, init_cache
from jaxllm.request import Request
from jaxllm.sampling import SamplingParams, sample
from jaxllm.scoring import token_scores

MIN_BUCKET = 16  # the shortest prompt / cache bucket; longer ones double up to the context length
PREFILL_CHUNK = 64  # prompt tokens per step of a prefill (at most the cache length)


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

    cache: Cache  # per layer (slots, kv heads, S, head_dim); scan_layers: one with a leading layer axis
    seq_BS: jax.Array  # int32 token at each position: prompt, then generated tokens
    positions_B: jax.Array  # int32 position of the newest token: the next step's input
    end_B: jax.Array  # int32 prompt length + max_new: the slot stops at position end_B - 1
    done_B: jax.Array  # bool: finished or empty; its steps are computed but change nothing
    keys_B: jax.Array
    sampling: SamplingParams
    stop_ids_BX: jax.Array


def state_axes(state: DecodeState) -> DecodeState:
    """The logical axis names of every leaf (a `PartitionSpec`): slots are the "batch" axis; the cache's
    axes are the model's (`jaxllm.model.cache_axes`). The sharding rules place the state by these."""
    rows = lambda x: PartitionSpec("batch", *(None,) * (x.ndim - 1))  # noqa: E731
    return jax.tree.map(rows, state)._replace(cache=cache_axes(state.cache))


def place(state: DecodeState, mesh: Mesh | None) -> DecodeState:
    """Inside jit: `state` constrained to its shardings on `mesh` by the rules table (None: as it is)."""
    if mesh is None:
        return state
    from jaxllm.sharding import constrain  # the sharding module imports the model, as this one does

    return constrain(state, state_axes(state), mesh)


def init_state(
    cfg: ModelConfig, slots: int, cache_len: int, max_stop_ids: int = 1, mesh: Mesh | None = None
) -> DecodeState:
    """`slots` empty slots with room for `cache_len` positions each (prompt + generated), sharded over
    `mesh` when given (slots over the batch axes, kv heads over tensor)."""
    return place(_empty_state(cfg, slots, cache_len, max_stop_ids), mesh)


def _empty_state(cfg: ModelConfig, slots: int, cache_len: int, max_stop_ids: int) -> DecodeState:
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
    cfg: ModelConfig,
    params: Params,
    state: DecodeState,
    prompts: Prompts,
    slots_B: jax.Array,
    mesh: Mesh | None = None,
) -> tuple[DecodeState, jax.Array]:
    """Put `prompts` into slots `slots_B` and sample their first tokens; returns (state, logits_BV).

    Each prompt must be shorter than the cache (its first token is written after it). A slot index
    >= the number of slots drops that row (batch padding). `logits_BV` are the logits at each
    prompt's last token. The prompts run in chunks of `PREFILL_CHUNK` tokens, as many as the longest
    prompt needs (a traced count): chunk i writes positions i*C .. i*C+C-1, each attending to the
    entries at positions <= its own, all written by then.
    """
    rows, logits_BV, _ = prefill_rows(cfg, params, prompts, state.seq_BS.shape[1], mesh)
    return insert(state, rows, slots_B, mesh), logits_BV


class PromptScores(NamedTuple):
    """A scoring prefill's log-probabilities (the model's own, float32): index p of a row holds those of
    the token after position p given positions <= p, for every prompt position (the last one's: the first
    token sampled), and the `top` best (log-probability, id) pairs there, as `jaxllm.scoring.score_tokens`."""

    target_BW: jax.Array
    top_logp_BWK: jax.Array
    top_ids_BWK: jax.Array


def prefill_rows(
    cfg: ModelConfig, params: Params, prompts: Prompts, cache_len: int, mesh: Mesh | None = None, top: int = 0
) -> tuple[DecodeState, jax.Array, PromptScores | None]:
    """`prefill`'s model part: a state of one slot per prompt (cache length `cache_len`), each prefilled
    and given its first token, the logits at each prompt's last token and, with `top` > 0, the prompts'
    `PromptScores` (the output head over every prompt position too, in the same pass). Its shapes do
    not depend on the slot count of the state the rows go into (`insert`)."""
    b, t = prompts.tokens_BT.shape
    s = cache_len
    c = min(PREFILL_CHUNK, s)
    tokens_BW = jnp.pad(prompts.tokens_BT, ((0, 0), (0, -t % c)))  # whole chunks
    w = tokens_BW.shape[1]
    next_BW = jnp.pad(tokens_BW[:, 1:], ((0, 0), (0, 1)))  # the token after each position
    last_B = prompts.lengths_B - 1
    k = min(top, cfg.vocab_size)

    def chunk(i: jax.Array, carry: tuple[Cache, jax.Array, PromptScores | None]) -> tuple:
        cache, logits_BV, scores = carry
        start = i * c
        tokens_BC = jax.lax.dynamic_slice_in_dim(tokens_BW, start, c, axis=1)
        positions_BC = jnp.broadcast_to(start + jnp.arange(c, dtype=jnp.int32), (b, c))
        at_B = jnp.clip(last_B - start, 0, c - 1)
        with cpu_kernels.off(mesh is not None):  # sharded params: XLA's partitioned ops
            logits, cache = forward_cached(cfg, params, tokens_BC, positions_BC, cache, at_B, all_logits=k > 0)
        if k > 0:
            logits, all_BCV = logits
            chunk_scores = token_scores(all_BCV, jax.lax.dynamic_slice_in_dim(next_BW, start, c, axis=1), k)
            scores = PromptScores(*(jax.lax.dynamic_update_slice_in_dim(a, x, start, axis=1)
                                    for a, x in zip(scores, chunk_scores, strict=True)))  # fmt: skip
        here_B = (last_B >= start) & (last_B < start + c)
        return cache, jnp.where(here_B[:, None], logits[:, 0], logits_BV), scores

    chunks = (jnp.max(prompts.lengths_B) + c - 1) // c
    zero_scores = None
    if k > 0:
        zero_scores = PromptScores(jnp.zeros((b, w), jnp.float32), jnp.zeros((b, w, k), jnp.float32),
                                   jnp.zeros((b, w, k), jnp.int32))  # fmt: skip
    empty = (init_cache(cfg, b, s), jnp.zeros((b, cfg.vocab_size), jnp.float32), zero_scores)
    new_cache, logits_BV, scores = jax.lax.fori_loop(0, chunks, chunk, empty)
    first_B = sample(logits_BV, jax.vmap(jax.random.fold_in)(prompts.keys_B, last_B), prompts.sampling)
    if scores is not None:  # the last position's token is the one sampled, from the logits it was sampled from
        logp_first_B = jnp.take_along_axis(jax.nn.log_softmax(logits_BV, axis=-1), first_B[:, None], axis=-1)[:, 0]
        scores = scores._replace(target_BW=scores.target_BW.at[jnp.arange(b), last_B].set(logp_first_B))
    wants_B = prompts.max_new_B > 0
    rows_B = jnp.arange(b)
    seq_BS = jnp.zeros((b, s), jnp.int32).at[:, : min(t, s)].set(prompts.tokens_BT[:, :s])
    seq_BS = seq_BS.at[rows_B, jnp.where(wants_B, prompts.lengths_B, s)].set(first_B, mode="drop")
    done_B = ~wants_B | (prompts.max_new_B == 1) | _is_stop(first_B, prompts.stop_ids_BX)
    rows = DecodeState(
        cache=new_cache,
        seq_BS=seq_BS,
        positions_B=last_B + wants_B,
        end_B=prompts.lengths_B + prompts.max_new_B,
        done_B=done_B,
        keys_B=prompts.keys_B,
        sampling=SamplingParams(*(jnp.asarray(a) for a in prompts.sampling)),
        stop_ids_BX=prompts.stop_ids_BX,
    )
    return rows, logits_BV, scores


def insert(state: DecodeState, rows: DecodeState, slots_B: jax.Array, mesh: Mesh | None = None) -> DecodeState:
    """`rows` (from `prefill_rows`, the same cache length) into slots `slots_B` of `state`; a slot index
    >= the number of slots drops that row (batch padding)."""

    def put(all_slots: jax.Array, new: jax.Array, axes: PartitionSpec) -> jax.Array:
        slot_axis = tuple(axes).index("batch")  # whatever axes lead it (e.g. stacked layers)
        new = jnp.moveaxis(new, slot_axis, 0).astype(all_slots.dtype)
        moved = jnp.moveaxis(all_slots, slot_axis, 0).at[slots_B].set(new, mode="drop")
        return jnp.moveaxis(moved, 0, slot_axis)

    return place(jax.tree.map(put, state, rows, state_axes(state)), mesh)


def decode_step(
    cfg: ModelConfig, params: Params, state: DecodeState, mesh: Mesh | None = None
) -> tuple[DecodeState, jax.Array]:
    """Feed every slot's newest token at its own position and sample the next; (state, logits_BV).

    Done slots are computed too (a fixed shape) but change nothing: their position does not advance
    and nothing is written to `seq_BS`. Logits are those of each slot's newest token.
    """
    b, s = state.seq_BS.shape
    rows_B = jnp.arange(b)
    tokens_B = state.seq_BS[rows_B, state.positions_B]
    with cpu_kernels.off(mesh is not None):  # sharded params: XLA's partitioned ops
        logits_B1V, cache = forward_cached(cfg, params, tokens_B[:, None], state.positions_B[:, None], state.cache)
    logits_BV = logits_B1V[:, 0]
    next_B = sample(logits_BV, jax.vmap(jax.random.fold_in)(state.keys_B, state.positions_B), state.sampling)
    active_B = ~state.done_B
    positions_B = state.positions_B + active_B
    seq_BS = state.seq_BS.at[rows_B, jnp.where(active_B, positions_B, s)].set(next_B, mode="drop")
    finished_B = _is_stop(next_B, state.stop_ids_BX) | (positions_B >= state.end_B - 1)
    done_B = state.done_B | (active_B & finished_B)
    state = state._replace(cache=cache, seq_BS=seq_BS, positions_B=positions_B, done_B=done_B)
    return place(state, mesh), logits_BV


def decode(
    cfg: ModelConfig, params: Params, state: DecodeState, max_steps: jax.Array | int, mesh: Mesh | None = None
) -> DecodeState:
    """Up to `max_steps` decode steps (a traced value: no recompiling), ending early once all are done."""

    def cond(carry: tuple[jax.Array, DecodeState]) -> jax.Array:
        i, st = carry
        return (i < max_steps) & ~jnp.all(st.done_B)

    def body(carry: tuple[jax.Array, DecodeState]) -> tuple[jax.Array, DecodeState]:
        i, st = carry
        return i + 1, decode_step(cfg, params, st, mesh)[0]

    return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def resize(state: DecodeState, length: int, mesh: Mesh | None = None, slots: int | None = None) -> DecodeState:
    """The state with room for `length` positions per slot (zeros appended, or the tail cut) and, when
    given, `slots` slots (empty, done slots appended, or the last ones cut).

    Cutting positions is safe when every active slot ends (`end_B`) at or before `length`: entries
    past a slot's position are never read. Cutting slots is safe when the cut ones are free (done).
    Done slots keep their stale values (their steps write nothing in range). The cache's length and
    slot axes are found by their logical names, whatever leads them.
    """
    b, s = state.seq_BS.shape
    n = b if slots is None else slots

    def fit_slots(x: jax.Array, axes: PartitionSpec) -> jax.Array:
        if n == b:
            return x
        # Slots past the old last one repeat it (stale values; they are marked done below).
        return jnp.take(x, jnp.minimum(jnp.arange(n), b - 1), axis=tuple(axes).index("batch"))

    def fit_length(x: jax.Array, axis: int) -> jax.Array:
        if length <= s:
            return jax.lax.slice_in_dim(x, 0, length, axis=axis)
        return jnp.pad(x, [(0, length - s if a == axis else 0) for a in range(x.ndim)])

    state = jax.tree.map(fit_slots, state, state_axes(state))
    cache = jax.tree.map(lambda x, axes: fit_length(x, tuple(axes).index("cache_length")), state.cache,
                         cache_axes(state.cache))  # fmt: skip
    done_B = state.done_B | (jnp.arange(n) >= b)
    return place(state._replace(cache=cache, seq_BS=fit_length(state.seq_BS, 1), done_B=done_B), mesh)


def request_keys(seed: int, n: int) -> jax.Array:
    """PRNG keys for rows 0..n-1 of a request: fold_in(key(seed), row); seed taken modulo 2**32."""
    return _request_keys(np.uint32(seed % 2**32), n)


@partial(jax.jit, static_argnums=1)
def _request_keys(seed: jax.Array, n: int) -> jax.Array:
    return jax.vmap(jax.random.fold_in, (None, 0))(jax.random.key(seed), jnp.arange(n))


# Jitted once per (cfg, shapes, mesh); the state is donated so the cache is updated in place.
init_state_jit = jax.jit(init_state, static_argnums=(0, 1, 2, 3, 4))
prefill_jit = jax.jit(prefill, static_argnums=(0, 5), donate_argnums=2)
prefill_rows_jit = jax.jit(prefill_rows, static_argnums=(0, 3, 4, 5))
insert_jit = jax.jit(insert, static_argnums=3, donate_argnums=0)
decode_step_jit = jax.jit(decode_step, static_argnums=(0, 3), donate_argnums=2)
decode_jit = jax.jit(decode, static_argnums=(0, 4), donate_argnums=2)
resize_jit = jax.jit(resize, static_argnums=(1, 2, 3))  # not donated: no buffer has the new shape


@partial(jax.jit, donate_argnums=0)
def mark_done(state: DecodeState, finished_B: jax.Array) -> DecodeState:
    """Mark the slots in `finished_B` done (stopped, cancelled or freed); they take no more tokens.

    The state is donated (the cache is not copied): use the returned state only."""
    return state._replace(done_B=state.done_B | finished_B)


# Shapes and packing (host side) ---------------------------------------------------------------


def bucket(n: int, cap: int) -> int:
    """The static length for n tokens: MIN_BUCKET doubled until it holds n, at most `cap`."""
    return min(MIN_BUCKET << max(0, math.ceil(math.log2(max(n, 1) / MIN_BUCKET))), cap)


def batch_bucket(n: int) -> int:
    """Batches are padded to a power of two, so each size class compiles once."""
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def inference_config(cfg: ModelConfig) -> ModelConfig:
    """Recomputation (remat) only matters for gradients: inference shares the compiled code without it."""
    return cfg if cfg.remat == "none" else cfg.replace(remat="none")


def row_key_data(seed: int, n: int) -> np.ndarray:
    """Key data of rows 0..n-1 of a request (`request_keys`), for `pack_prompts`."""
    return np.asarray(jax.random.key_data(request_keys(seed, batch_bucket(n))))[:n]


def pack_prompts(
    rows: Sequence[tuple[list[int], Request, np.ndarray]], b: int, t: int, x: int
) -> Prompts:
    """`Prompts` of b rows of t tokens (x stop-id columns) from (prompt, its request, its key data) rows.

    Rows past `len(rows)` are padding: one token, nothing to generate.
    """
    tokens_BT = np.zeros((b, t), np.int32)
    lengths_B = np.ones((b,), np.int32)
    max_new_B = np.zeros((b,), np.int32)
    stop_ids_BX = np.full((b, x), -1, np.int32)
    sampling = SamplingParams.full(b)
    key_data = np.zeros((b, *np.shape(jax.random.key_data(jax.random.key(0)))), np.uint32)
    for i, (prompt, req, key) in enumerate(rows):
        tokens_BT[i, : len(prompt)] = prompt
        lengths_B[i], max_new_B[i] = len(prompt), req.max_new_tokens
        stop_ids_BX[i, : len(req.stop_ids)] = req.stop_ids
        sampling.temperature_B[i], sampling.top_k_B[i], sampling.top_p_B[i] = req.temperature, req.top_k, req.top_p
        key_data[i] = key
    prompts = Prompts(tokens_BT, lengths_B, max_new_B, jax.random.wrap_key_data(key_data), sampling, stop_ids_BX)
    return prompts
