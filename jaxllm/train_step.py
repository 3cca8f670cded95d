"""The pure core of training: loss, one optimizer update (with gradient accumulation), evaluation.

`train_step(state, batch)` is jitted by the loop with explicit in/out shardings; everything here is
a pure function of its arguments.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from jaxllm import lora
from jaxllm.config import ModelConfig, TrainConfig
from jaxllm.model import Params, forward
from jaxllm.optim import learning_rate

TrainState = dict[str, Any]  # {"step": int32 scalar, "params": Params, "opt_state": optax state}


def loss_fn(cfg: ModelConfig, params: Params, batch_BT1: jax.Array) -> jax.Array:
    """Mean next-token cross-entropy over a (B, T+1) window batch."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    logits_BTV = forward(cfg, params, inputs_BT)
    return optax.softmax_cross_entropy_with_integer_labels(logits_BTV, targets_BT).mean()


def init_state(params: Params, optimizer: optax.GradientTransformation) -> TrainState:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


def train_step(
    model_cfg: ModelConfig,
    train_cfg: TrainConfig,
    optimizer: optax.GradientTransformation,
    state: TrainState,
    batch_BT1: jax.Array,
    micro_sharding: jax.sharding.Sharding | None = None,
    base: Params | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update from a global batch, accumulated over `train_cfg.grad_accum` micro-batches.

    Micro-batch j is rows j, j+k, j+2k, … so every device keeps an equal share of every micro-batch.
    A non-finite loss or gradient leaves params and optimizer state unchanged and sets
    `metrics["finite"]` to False; the loop then stops or carries on (`train.nonfinite`).

    `base` (LoRA): the frozen params; `state["params"]` are then the adapters, the only thing trained.
    """
    k = train_cfg.grad_accum
    model_params = (lambda p: p) if base is None else (lambda adapters: lora.merge(train_cfg, base, adapters))
    grad_fn = jax.value_and_grad(lambda p, b: loss_fn(model_cfg, model_params(p), b))
    if k == 1:
        loss, grads = grad_fn(state["params"], batch_BT1)
    else:
        micro_KBT1 = batch_BT1.reshape(-1, k, batch_BT1.shape[-1]).swapaxes(0, 1)

        def accumulate(carry, micro_BT1):
            if micro_sharding is not None:
                micro_BT1 = jax.lax.with_sharding_constraint(micro_BT1, micro_sharding)
            loss, grads = grad_fn(state["params"], micro_BT1)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, state["params"]))
        (loss, grads), _ = jax.lax.scan(accumulate, zeros, micro_KBT1)
        loss, grads = jax.tree.map(lambda x: x / k, (loss, grads))

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


def eval_step(model_cfg: ModelConfig, params: Params, batch_BT1: jax.Array) -> jax.Array:
    return loss_fn(model_cfg, params, batch_BT1)
