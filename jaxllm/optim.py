"""AdamW with decoupled weight decay, warmup + cosine schedule and global-norm clipping (optax).

The weight-decay rule and the schedule are the ones torch_ref uses: decay every matrix (kernels and
embedding tables), never biases, norm scales or gains.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm.config import TrainConfig
from jaxllm.model import Params

NO_DECAY_LEAVES = ("bias", "scale")


def learning_rate(cfg: TrainConfig, step: int | jax.Array, xp: Any = jnp) -> jax.Array:
    """Linear warmup to the peak over `warmup_steps` (step 0 already gets peak/warmup), then a
    cosine decay to `peak * min_lr_ratio` at `steps`. Step counts optimizer updates from 0.

    `xp` is the array module: `jax.numpy` (traced inside the optax update) or `numpy` (torch_ref
    sets each step's rate from it), so both frameworks share this one definition, in float32.
    """
    step = xp.asarray(step, xp.float32)
    peak, floor = cfg.learning_rate, cfg.learning_rate * cfg.min_lr_ratio
    warm = peak * (step + 1) / max(cfg.warmup_steps, 1)
    progress = xp.clip((step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1), 0.0, 1.0)
    cosine = floor + 0.5 * (peak - floor) * (1 + xp.cos(math.pi * progress))
    return xp.where(step < cfg.warmup_steps, warm, cosine)


def decay_mask(params: Params) -> Params:
    """True where weight decay applies: every leaf except biases and norm scales."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key not in NO_DECAY_LEAVES, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    """clip_by_global_norm -> AdamW (decoupled decay, masked), with the schedule above."""
    adamw = optax.adamw(
        learning_rate=lambda step: learning_rate(cfg, step),
        b1=cfg.beta1,
        b2=cfg.beta2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        mask=decay_mask,
    )
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw) if cfg.grad_clip > 0 else adamw
