"""The training strategies' pieces: this process's place in the run (`Dist`), the model built and
set up for training, the loss, and `PlainTrainer` — torch.optim.AdamW on one process or under DDP.

torch_ref's counterpart of `jaxllm/train_step.py` and the device set-up of `jaxllm/train.py`: a
`Trainer` does one optimizer update from a batch, saves and restores its checkpoints and hands out
the full weights; the loop around it is `torch_ref/train.py`'s (DeepSpeed's trainer:
`torch_ref/train_deepspeed.py`).
"""

from __future__ import annotations

import functools
import math
import os
import shutil
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from jaxllm.config import Config, ModelConfig, TrainConfig
from jaxllm.data.segments import LOSS_MASK, TOKENS, model_inputs
from jaxllm.errors import ConfigError, InputError
from jaxllm.loop import StepOutput
from torch_ref.optim import learning_rate, make_optimizer, set_learning_rate

__all__ = ["Batch", "Dist", "PlainTrainer", "StepOutput", "Trainer", "build", "global_count", "loss_fn", "loss_sum",
           "micro_batches", "pick_device"]

STATE_FILE = "state.pt"
Batch = torch.Tensor | dict[str, torch.Tensor]  # windows (B, T+1), or a `jaxllm.data.segments.Batch`


@dataclass(frozen=True)
class Dist:
    """This process's place in the run (a single process is rank 0 of 1)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Dist:
        env = os.environ
        return cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean(self, value: float, device: torch.device) -> float:
        """The mean of `value` over all ranks."""
        return self.sum(value, device) / self.world_size

    def sum(self, value: float, device: torch.device) -> float:
        """The sum of `value` over all ranks."""
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item())


class Trainer(Protocol):
    """What a loop needs from a training strategy; collective methods are called on every rank."""

    device: torch.device

    def train_step(self, batch: Batch) -> StepOutput: ...  # one optimizer update, this rank's rows

    def eval_loss(self, batch: Batch) -> float: ...  # mean loss over this rank's rows

    def save(self, ckpt_dir: Path, step: int, extra: dict[str, Any]) -> None: ...  # collective

    def restore(self, ckpt_dir: Path) -> tuple[int, dict[str, Any]] | None: ...  # collective; (step, extra)

    def full_state_dict(self) -> dict[str, np.ndarray]: ...  # collective; float32, torch_ref names


# The pure pieces -------------------------------------------------------------------------------
def target_weights(batch: Batch) -> torch.Tensor:
    """(B, T) float32: 1 for each target that counts in the loss, as `jaxllm.train_step.target_weights`."""
    if isinstance(batch, dict):
        if LOSS_MASK in batch:
            return batch[LOSS_MASK][:, 1:].float()
        batch = batch[TOKENS]
    return torch.ones(batch.shape[0], batch.shape[1] - 1, device=batch.device)


def loss_sum(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Sum of the next-token cross-entropies of the targets that count (`jaxllm.train_step.loss_sum`)."""
    inputs_BT, targets_BT, segments = model_inputs(batch)
    logits_BTV = model(inputs_BT, **segments)
    ce = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), targets_BT.reshape(-1), reduction="none")
    return (ce * target_weights(batch).reshape(-1)).sum()


def loss_fn(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the targets that count, as `jaxllm.train_step.loss_fn`."""
    return loss_sum(model, batch) / target_weights(batch).sum().clamp(min=1.0)


def micro_batches(batch: Batch, k: int) -> list[Batch]:
    """Micro-batch j of k is rows j, j+k, j+2k, … (jaxllm's split), of every array of a dict batch."""
    if isinstance(batch, dict):
        return [{name: x[j::k] for name, x in batch.items()} for j in range(k)]
    return [batch[j::k] for j in range(k)]


def global_count(batch: Batch, dist: Dist, device: torch.device) -> float:
    """The targets that count in the whole global batch (every rank's rows), at least 1."""
    return max(dist.sum(float(target_weights(batch).sum()), device), 1.0)


# Set-up -----------------------------------------------------------------------------------------
def pick_device(requested: str | None, dist: Dist) -> torch.device:
    """`requested` ("cpu", "cuda", "cuda:1"), else this rank's GPU when there is one, else the CPU."""
    if requested is None:
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    return device


def set_numerics(cfg: TrainConfig, device: torch.device) -> None:
    """TF32 matmuls/convolutions and cuDNN autotuning on CUDA unless `train.matmul_precision=highest`
    (parity runs); on the CPU always full float32."""
    fast = device.type == "cuda" and cfg.matmul_precision != "highest"
    if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # torch >= 2.9
        torch.backends.cuda.matmul.fp32_precision = "tf32" if fast else "ieee"
        torch.backends.cudnn.fp32_precision = "tf32" if fast else "ieee"
    else:
        torch.backends.cuda.matmul.allow_tf32 = fast
        torch.backends.cudnn.allow_tf32 = fast
    torch.backends.cudnn.benchmark = fast


def _saved_by_save_dots() -> list[Any]:
    """The matmul-like ops whose outputs `save_dots` keeps (jax's `dots_saveable`)."""
    aten = torch.ops.aten
    names = [
        "mm", "addmm", "bmm", "baddbmm",
        "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
    ]  # fmt: skip
    return [getattr(aten, n).default for n in names if hasattr(aten, n)]


def apply_remat(model: nn.Module, remat: str) -> None:
    """Activation checkpointing per block, as `model.remat` does in jaxllm: "full" recomputes the
    whole block in the backward pass, "save_dots" keeps matmul outputs and recomputes the rest."""
    if remat == "none":
        return
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts, noop_context_fn

    if remat == "full":
        context_fn = noop_context_fn
    else:
        context_fn = functools.partial(create_selective_checkpoint_contexts, _saved_by_save_dots())
    for block in model.blocks:
        inner = block.forward

        def forward(*args: Any, _inner: Callable = inner, **kwargs: Any) -> Any:
            return checkpoint(_inner, *args, use_reentrant=False, context_fn=context_fn, **kwargs)

        block.forward = forward


def load_init(model: nn.Module, path: str | Path, cfg: ModelConfig) -> None:
    """Initial weights from a torch_ref safetensors file (`jaxllm export-torch`, or a run's final/)."""
    from jaxllm.torch_io import check_same_architecture, read_state_dict

    saved, tensors = read_state_dict(path)
    if saved is not None:
        check_same_architecture(saved, cfg, str(path))
    if cfg.tie_embeddings and "lm_head.weight" not in tensors and "token_embed.weight" in tensors:
        tensors["lm_head.weight"] = tensors["token_embed.weight"]
    try:
        model.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()}, strict=True)
    except RuntimeError as err:
        raise InputError(f"{path} does not fit the model: {' '.join(str(err).split())[:500]}") from None


TORCH_INIT = "torch"  # `--init torch`: torch's own seeded init instead of jaxllm's


def jaxllm_weights(cfg: ModelConfig, seed: int, ck: str | Path | None = None) -> dict[str, np.ndarray]:
    """jaxllm's initial weights for `seed` (or the weights of the params directory `ck`) as a torch_ref
    state dict. JAX is imported here, pinned to the CPU so that it takes no GPU memory from torch."""
    import jax
    from jax._src import xla_bridge

    if not xla_bridge.backends_are_initialized():  # a torch process: JAX sees only the CPU
        jax.config.update("jax_platforms", "cpu")
    from jaxllm.convert import to_numpy_state_dict

    cpu = jax.devices("cpu")[0]
    with jax.default_device(cpu):
        if ck is None:
            from jaxllm.model import init_params

            params = init_params(cfg, seed)
        else:
            from jaxllm.checkpoint import load_params
            from jaxllm.model import abstract_params

            on_cpu = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(cpu), abstract_params(cfg))
            params = load_params(ck, on_cpu)[1]
        return to_numpy_state_dict(cfg, params)


def build(cfg: ModelConfig, seed: int, device: torch.device, init: str | Path | None) -> nn.Module:
    """torch_ref's model for `cfg`, `model.remat` applied, starting from `init`: None, jaxllm's init for
    `seed` (converted, so both frameworks start alike); "torch", torch's own seeded init; a params
    directory (`--init CK`); or a torch_ref safetensors file."""
    from jaxllm.base_checkpoint import is_params_dir
    from torch_ref.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg, device)
    if init is None or is_params_dir(init):
        weights = jaxllm_weights(cfg, seed, init)
        model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in weights.items()}, strict=True)
    elif str(init) != TORCH_INIT:
        load_init(model, init, cfg)
    apply_remat(model, cfg.remat)
    return model


def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoint directories (named by step), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


# The plain strategy -------------------------------------------------------------------------------
class PlainTrainer:
    """torch.optim.AdamW on one process, or on every rank of a DDP group (gloo on CPU, NCCL on CUDA)."""

    def __init__(self, model: nn.Module, config: Config, dist: Dist, device: torch.device, compile: bool = False):
        self.model, self.tcfg, self.dist, self.device = model, config.train, dist, device
        self.optimizer = make_optimizer(model, self.tcfg)
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        if dist.world_size > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        net = self.ddp or model
        self.net = torch.compile(net) if compile else net

    def updates_applied(self) -> int:
        """AdamW's own update count (skipped steps excluded), which the schedule follows as optax's does."""
        state = self.optimizer.state.get(self.optimizer.param_groups[0]["params"][0])
        return int(state["step"]) if state else 0

    def train_step(self, batch: Batch) -> StepOutput:
        """Token-weighted: each micro-batch's loss sum over the global count (times the ranks, whose
        gradients DDP averages), as jaxllm's `train_step`."""
        k = self.tcfg.grad_accum
        count = global_count(batch, self.dist, self.device)
        total = torch.zeros((), device=self.device)
        for j, micro in enumerate(micro_batches(batch, k)):
            sync = self.ddp is None or j == k - 1  # DDP all-reduces only on the last micro-batch
            with nullcontext() if sync else self.ddp.no_sync():
                loss = loss_sum(self.net, micro) / count
                (loss * self.dist.world_size).backward()
            total += loss.detach()
        loss = self.dist.sum(float(total), self.device)
        max_norm = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            set_learning_rate(self.optimizer, learning_rate(self.tcfg, self.updates_applied()))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss, grad_norm, finite, applied=finite)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        return float(loss_fn(self.model, batch))

    def save(self, ckpt_dir: Path, step: int, extra: dict[str, Any]) -> None:
        """RUN/checkpoints/STEP/state.pt, written by rank 0 under a temporary name and renamed."""
        if self.dist.is_main:
            tmp, final = ckpt_dir / f".{step}.tmp", ckpt_dir / str(step)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            state = {"step": step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
            torch.save({**state, **extra}, tmp / STATE_FILE)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
        self.dist.barrier()

    def restore(self, ckpt_dir: Path) -> tuple[int, dict[str, Any]] | None:
        steps = [s for s in checkpoint_steps(ckpt_dir) if (ckpt_dir / str(s) / STATE_FILE).is_file()]
        if not steps:
            return None
        state = torch.load(ckpt_dir / str(steps[-1]) / STATE_FILE, map_location=self.device, weights_only=True)
        self.model.load_state_dict(state.pop("model"))
        self.optimizer.load_state_dict(state.pop("optimizer"))
        return int(state.pop("step")), state

    def full_state_dict(self) -> dict[str, np.ndarray]:
        return {k: v.detach().float().cpu().numpy() for k, v in self.model.state_dict().items()}
