"""Post-hoc token scoring: log-probabilities of given tokens under the model (pure, jit-able).

`score_tokens(cfg, params, tokens_BT)` runs one full forward over right-padded sequences and
returns, for every position t >= 1, log_softmax(float32 logits at t - 1)[token t] and the `MAX_TOP`
most likely tokens there (`jax.lax.top_k`). These are the model's own probabilities, not the
temperature-scaled sampling distribution. Padding after a sequence changes nothing before it
(causal attention), so rows of different lengths share one shape.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from jaxllm.config import ModelConfig
from jaxllm.model import Params, forward

MAX_TOP = 20  # alternatives computed at each position (OpenAI's chat allows up to 20; serve.logprobs.MAX_TOP)


@partial(jax.jit, static_argnums=(0, 3))
def score_tokens(
    cfg: ModelConfig, params: Params, tokens_BT: jax.Array, top: int = MAX_TOP
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logp_BT1, top_logp_BT1K, top_ids_BT1K): index t - 1 holds token t's log-probability and the
    `top` best (log-probability, id) pairs at position t, both given tokens 0 .. t - 1."""
    logits_BTV = forward(cfg, params, tokens_BT[:, :-1])
    return token_scores(logits_BTV, tokens_BT[:, 1:], top)


def token_scores(logits_BTV: jax.Array, next_BT: jax.Array, top: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """From logits at each position: (log-probability of `next_BT` there, the `top` best log-probabilities
    and their ids), all float32 log_softmax. Shared by `score_tokens` and a scoring prefill
    (`jaxllm.slots.prefill_rows`)."""
    logp_BTV = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    target_BT = jnp.take_along_axis(logp_BTV, next_BT[..., None], axis=-1)[..., 0]
    top_logp_BTK, top_ids_BTK = jax.lax.top_k(logp_BTV, min(top, logp_BTV.shape[-1]))
    return target_BT, top_logp_BTK, top_ids_BTK
