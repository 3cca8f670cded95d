"""The pure core of training: loss, one optimizer update (with gradient accumulation), evaluation.

`train_step(state, batch)` is jitted by the loop with explicit in/out shardings; everything here is
a pure function of its arguments.

A batch is a (B, T+1) array of token windows, or a dict (`jaxllm.data.segments.training_batch`):
"tokens" (B, T+1), "loss_mask" (B, T+1; 1 where a token is a target that counts) from a packed
dataset, and with document masking "segment_ids" and "positions" (B, T) of the inputs. The loss is the
mean over the counted targets of the whole global batch: token-weighted across micro-batches and
processes (each micro-batch's sum is divided by the global count).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm import lora
from jaxllm.config import ModelConfig, TrainConfig
from jaxllm.data.segments import LOSS_MASK, TOKENS, model_inputs
from jaxllm.model import Params, forward
from jaxllm.optim import learning_rate

TrainState = dict[str, Any]  # {"step": int32 scalar, "params": Params, "opt_state": optax state}
Batch = jax.Array | dict[str, jax.Array]  # windows (B, T+1), or a `jaxllm.data.segments.Batch`


def target_weights(batch: Batch) -> jax.Array:
    """(B, T) float32: 1 for each target that counts in the loss (all of them without a loss mask)."""
    if isinstance(batch, dict):
        if LOSS_MASK in batch:
            return batch[LOSS_MASK][:, 1:].astype(jnp.float32)
        batch = batch[TOKENS]
    return jnp.ones((batch.shape[0], batch.shape[1] - 1), jnp.float32)


def loss_sum(cfg: ModelConfig, params: Params, batch: Batch) -> jax.Array:
    """Sum of the next-token cross-entropies of the targets that count."""
    inputs_BT, targets_BT, segments = model_inputs(batch)
    logits_BTV = forward(cfg, params, inputs_BT, **segments)
    ce_BT = optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT)
    return (ce_BT * target_weights(batch)).sum()


def loss_fn(cfg: ModelConfig, params: Params, batch: Batch) -> jax.Array:
    """Mean next-token cross-entropy over the targets that count (all, for a plain window batch)."""
    return loss_sum(cfg, params, batch) / jnp.maximum(target_weights(batch).sum(), 1.0)


def init_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def train_step(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch: Batch,
    micro_sharding: jax.sharding.Sharding | None = None,
    base: Params | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from a global batch, accumulated over `train_cfg.grad_accum` micro-batches.

    Micro-batch j is rows j, j+k, j+2k, … so every device keeps an equal share of every micro-batch;
    each one's loss sum is divided by the count of the whole batch (a batch with none counts as 1).
    A non-finite loss or gradient leaves params and optimizer state unchanged and sets
    `metrics["finite"]` to False; the loop then stops or carries on (`train.nonfinite`).

    `base` (LoRA): the frozen params; `state["params"]` are then the adapters, the only thing trained
    (merged into the kernels, or with `train.lora_dropout` > 0 applied at the Dense calls: `lora.applied`).
    """
    k = train_cfg.grad_accum
    count = jnp.maximum(target_weights(batch).sum(), 1.0)  # over the global batch

    def model_loss(p: Any, b: Batch, j: jax.Array | int) -> jax.Array:
        if base is None:
            return loss_sum(model_cfg, p, b)
        if train_cfg.lora_dropout == 0:  # LoRA: the adapters merged into the base kernels
            return loss_sum(model_cfg, lora.merge(train_cfg, base, p), b)
        with lora.applied(train_cfg, p, lora.dropout_key(train_cfg, state["step"], j)):  # LoRA dropout: unmerged
            return loss_sum(model_cfg, base, b)

    grad_fn = jax.value_and_grad(lambda p, b, j: model_loss(p, b, j) / count)
    if k == 1:
        loss, grads = grad_fn(state["params"], batch, 0)
    else:
        micro_K = jax.tree.map(lambda x: x.reshape(-1, k, *x.shape[1:]).swapaxes(0, 1), batch)

        def accumulate(carry, micro_j):
            micro, j = micro_j
            if micro_sharding is not None:
                micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
            loss, grads = grad_fn(state["params"], micro, j)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, (micro_K, jnp.arange(k)))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)  # noqa: E731
    new_state = {
        "step": state["step"] + 1,
        "params": keep(params, state["params"]),
        "opt_state": keep(opt_state, state["opt_state"]),
    }
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": learning_rate(train_cfg, state["step"]), "finite": finite}
    return new_state, metrics


def eval_step(model_cfg: ModelConfig, params: Params, batch: Batch) -> jax.Array:
    return loss_fn(model_cfg, params, batch)
