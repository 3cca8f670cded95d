"""Sampling: the next token from a row of logits. Pure and jit-able; per-row settings.

The order, shared with `torch_ref/sampling.py` (documented in docs/generate.md):

1. temperature == 0: greedy, the argmax of the raw logits (the first index on ties); 2-5 skipped.
2. Divide the logits by the temperature.
3. top-k (k > 0): keep the tokens whose scaled logit is >= the k-th largest one.
4. top-p (p < 1): over the distribution that 3 leaves (renormalised), walk the tokens from most to
   least likely and keep each one while the probability mass before it is < p: the smallest set
   whose mass reaches p (always at least the most likely token).
5. Sample from the softmax of the kept scaled logits.

Filters cut at a logit *value*: tokens tied with the last kept one are kept too, so the result never
depends on how a sort orders equal values. Every setting is per row (`SamplingParams`), so one
compiled decode step serves a batch of requests with different settings; top_k = 0 and top_p = 1
switch a filter off, and a filter no row uses costs nothing (`lax.cond`). The cuts are found by a
radix select over the logits' bit patterns, not a sort (see `_largest_key`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


class SamplingParams(NamedTuple):
    """Per-row settings: temperature (0 = greedy), top_k (0 = off), top_p (1 = off)."""

    temperature_B: jax.Array  # float32
    top_k_B: jax.Array  # int32
    top_p_B: jax.Array  # float32

    @classmethod
    def full(cls, batch: int, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0) -> SamplingParams:
        """The same settings for every row (host arrays: no device work until used)."""
        return cls(
            np.full((batch,), temperature, np.float32),
            np.full((batch,), top_k, np.int32),
            np.full((batch,), top_p, np.float32),
        )


def _order_keys(x_BV: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (-0.0 counted as +0.0), so thresholds are exact."""
    u_BV = jax.lax.bitcast_convert_type(jnp.where(x_BV == 0, 0.0, x_BV).astype(jnp.float32), jnp.uint32)
    return jnp.where(u_BV >> 31 == 1, ~u_BV, u_BV | jnp.uint32(1 << 31))


def _largest_key(keys_BV: jax.Array, score: Any, target_B: jax.Array) -> jax.Array:
    """Per row, the largest key t with score(keys >= t) >= target (score non-increasing in t).

    Built bit by bit from the top (a radix select): 32 passes over the row, no sort; XLA's CPU sort
    of a (16, 32000) block takes ~125 ms, these two selections ~4 ms each.
    """

    def set_bit(i: jax.Array, t_B: jax.Array) -> jax.Array:
        candidate_B = t_B | (jnp.uint32(1) << (31 - i).astype(jnp.uint32))
        return jnp.where(score(keys_BV >= candidate_B[:, None]) >= target_B, candidate_B, t_B)

    return jax.lax.fori_loop(0, 32, set_bit, jnp.zeros(keys_BV.shape[:1], jnp.uint32))


def keep_mask(scaled_BV: jax.Array, top_k_B: jax.Array, top_p_B: jax.Array) -> jax.Array:
    """Steps 3-4: True for the tokens top-k then top-p keep, given temperature-scaled logits.

    The top-k cut is the k-th largest value: the largest t with count(x >= t) >= k. The top-p cut
    is the largest t with mass(x >= t) >= p, the mass taken over the top-k tokens renormalised:
    exactly the value of the last token the walk in the module docstring keeps.
    """
    v = scaled_BV.shape[-1]
    keys_BV = _order_keys(scaled_BV)
    k_B = jnp.where((top_k_B > 0) & (top_k_B < v), top_k_B, v)
    kth_B = jax.lax.cond(
        jnp.any(k_B < v),
        lambda: _largest_key(keys_BV, lambda m_BV: m_BV.sum(-1, dtype=jnp.int32), k_B),
        lambda: jnp.zeros(keys_BV.shape[:1], jnp.uint32),
    )
    in_top_k_BV = keys_BV >= kth_B[:, None]

    def top_p_cut() -> jax.Array:
        probs_BV = jax.nn.softmax(jnp.where(in_top_k_BV, scaled_BV, -jnp.inf), axis=-1)
        return _largest_key(keys_BV, lambda m_BV: jnp.where(m_BV, probs_BV, 0.0).sum(-1), top_p_B)

    # max(): if rounding left the mass just short of p everywhere, keep the whole top-k set.
    pth_B = jax.lax.cond(jnp.any(top_p_B < 1.0), lambda: jnp.maximum(top_p_cut(), kth_B), lambda: kth_B)
    return keys_BV >= jnp.where(top_p_B < 1.0, pth_B, kth_B)[:, None]


def filter_logits(logits_BV: jax.Array, params: SamplingParams) -> jax.Array:
    """Steps 2-4: scaled logits with the filtered-out tokens at -inf (greedy rows scale by 1)."""
    t_B = params.temperature_B
    scaled_BV = logits_BV.astype(jnp.float32) / jnp.where(t_B > 0, t_B, 1.0)[:, None]
    return jnp.where(keep_mask(scaled_BV, params.top_k_B, params.top_p_B), scaled_BV, -jnp.inf)


def _first_index(mask_BV: jax.Array) -> jax.Array:
    """Index of the first True per row (V when none): a min-reduction, much faster than argmax on CPU."""
    v = mask_BV.shape[-1]
    return jnp.min(jnp.where(mask_BV, jnp.arange(v, dtype=jnp.int32), v), axis=-1)


def greedy(logits_BV: jax.Array) -> jax.Array:
    """argmax per row, the first index on ties (as numpy and torch)."""
    return _first_index(logits_BV == jnp.max(logits_BV, axis=-1, keepdims=True))


def sample(logits_BV: jax.Array, keys_B: jax.Array, params: SamplingParams) -> jax.Array:
    """One int32 token per row, drawn with that row's PRNG key (steps 1-5).

    Step 5 inverts the cumulative distribution with one uniform number per row (cheaper than a
    Gumbel draw over the vocabulary), taking only tokens of positive probability.
    """
    greedy_B = greedy(logits_BV)
    sampling_B = params.temperature_B > 0

    def draw() -> jax.Array:
        probs_BV = jax.nn.softmax(filter_logits(logits_BV, params), axis=-1)
        cdf_BV = jnp.cumsum(probs_BV, axis=-1)
        u_B1 = jax.vmap(jax.random.uniform)(keys_B)[:, None] * cdf_BV[:, -1:]
        drawn_B = _first_index((cdf_BV > u_B1) & (probs_BV > 0))
        return jnp.where(drawn_B < logits_BV.shape[-1], drawn_B, greedy(probs_BV))  # rounding guard

    drawn_B = jax.lax.cond(jnp.any(sampling_B), draw, lambda: greedy_B)
    return jnp.where(sampling_B, drawn_B, greedy_B)
