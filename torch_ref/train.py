"""`python -m torch_ref.train`: plain PyTorch training, one process or DDP under `torchrun`.

    python -m torch_ref.train --config mini --data DATA_DIR --out RUN [--init W.safetensors] [key=value ...]
    torchrun --nproc_per_node 2 -m torch_ref.train --config mini --data DATA_DIR --out RUN

The same config, data files, batch order, AdamW, schedule, clipping, gradient accumulation and run
directory as `jaxllm train` (the loop is `torch_ref/run.py`); this file is the strategy: DDP averages
gradients over ranks, micro-batches accumulate under `no_sync`, a non-finite update is not applied.
`--compile` runs the model through `torch.compile`.
"""

from __future__ import annotations

import argparse
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jaxllm.config import Config
from torch_ref.optim import learning_rate, make_optimizer, set_learning_rate
from torch_ref.run import (
    Dist,
    StepOutput,
    TrainResult,
    build,
    build_parser,
    checkpoint_steps,
    loss_fn,
    main,
    micro_batches,
    pick_device,
    prepare_run,
    run,
    set_numerics,
)

STATE_FILE = "state.pt"


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

    def train_step(self, batch_BT1: torch.Tensor) -> StepOutput:
        k = self.tcfg.grad_accum
        total = torch.zeros((), device=self.device)
        for j, micro in enumerate(micro_batches(batch_BT1, k)):
            sync = self.ddp is None or j == k - 1  # DDP all-reduces only on the last micro-batch
            with nullcontext() if sync else self.ddp.no_sync():
                loss = loss_fn(self.net, micro)
                (loss / k).backward()
            total += loss.detach()
        loss = self.dist.mean(float(total) / k, self.device)
        max_norm = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        finite = math.isfinite(loss) and math.isfinite(grad_norm)
        if finite:
            set_learning_rate(self.optimizer, learning_rate(self.tcfg, self.updates_applied()))
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepOutput(loss, grad_norm, finite, applied=finite)

    @torch.no_grad()
    def eval_loss(self, batch_BT1: torch.Tensor) -> float:
        return float(loss_fn(self.model, batch_BT1))

    def save(self, ckpt_dir: Path, step: int, extra: dict[str, Any]) -> None:
        """RUN/checkpoints/STEP/state.pt, written by rank 0 under a temporary name and renamed."""
        if self.dist.is_main:
            import shutil

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


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    init: str | Path | None = None,
    device: str | None = None,
    compile: bool = False,
    progress: bool = True,
) -> TrainResult:
    """Train `config` into `run_dir` (every rank calls this with the same arguments).

    `init`: a torch_ref safetensors state dict to start from (default: torch's seeded init).
    """
    dist = Dist.from_env()
    run_dir = Path(run_dir)
    torch_device = pick_device(device, dist)
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    run_dir = prepare_run(config, run_dir, resume, dist)
    set_numerics(config.train, torch_device)
    model = build(config.model, config.train.seed, torch_device, init)
    trainer = PlainTrainer(model, config, dist, torch_device, compile)
    return run(config, run_dir, trainer, dist, resume=resume, progress=progress)


def _start(args: argparse.Namespace, config: Config) -> TrainResult:
    out = args.out or f"runs/{config.model.name}-torch"
    return train(
        config, out, resume=args.resume, init=args.init, device=args.device, compile=args.compile,
        progress=not args.no_progress,
    )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = build_parser("python -m torch_ref.train", __doc__.splitlines()[0].split(": ", 1)[1])
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    return p


if __name__ == "__main__":
    main(parser(), _start)
