"""AdamW with decoupled weight decay and the warmup + cosine schedule, as `jaxllm/optim.py` in torch.

- Decay rule: every matrix (Linear weights, embedding tables) decays; biases and norm gains
  (1-D parameters) do not — jaxllm's `decay_mask` (all leaves but `bias` and `scale`) in torch terms.
- Schedule: `jaxllm.optim.learning_rate` itself, evaluated with numpy: one definition for both.
- AdamW math is the same as optax's: p <- p - lr * (m_hat / (sqrt(v_hat) + eps) + wd * p)
  (torch applies the decay term first, as a multiply by 1 - lr * wd).
- Clipping: torch's `clip_grad_norm_` scales by max_norm / (norm + 1e-6) where optax's
  `clip_by_global_norm` scales by max_norm / norm: a relative difference of 1e-6 / norm, far below
  float32 parity tolerances (and Adam is nearly invariant to a common gradient scale anyway).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from jaxllm.config import TrainConfig
from jaxllm.optim import learning_rate as _shared_learning_rate


def decays(param: torch.Tensor) -> bool:
    """True where weight decay applies: matrices, not biases or norm gains."""
    return param.ndim >= 2


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and undecayed vectors (tied weights listed once)."""
    params = list(model.parameters())  # deduplicates a tied head
    return [
        {"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
        {"params": [p for p in params if not decays(p)], "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over `param_groups`; the learning rate is set before every update (`set_learning_rate`)."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=learning_rate(cfg, 0),
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """The rate of optimizer update `step` (counted from 0), from jaxllm's one schedule definition."""
    return float(_shared_learning_rate(cfg, step, xp=np))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
