"""`python -m torch_ref.train_deepspeed`: torch_ref training under DeepSpeed ZeRO (stage 1, 2 or 3).

    python -m torch_ref.train_deepspeed --config mini --data DATA_DIR --out RUN --deepspeed configs/deepspeed/zero3.json
    torchrun --nproc_per_node 2 -m torch_ref.train_deepspeed ... --deepspeed zero3
    deepspeed --num_gpus 2 torch_ref/train_deepspeed.py ... --deepspeed zero3

The loop, data, schedule and run directory are `torch_ref/train.py`'s; the optimizer is torch_ref's
AdamW (param groups and schedule from the train config), handed to DeepSpeed as a client optimizer.
The DeepSpeed JSON holds what is DeepSpeed's own (the ZeRO stage and its options); batch sizes,
clipping and precision come from the train config and are filled in — a JSON that states them
differently is refused, naming both values (`resolve_deepspeed_config`).

Precision follows `model.dtype` (the compute dtype; parameters stay float32, as in jaxllm):
float32, or bfloat16 run as DeepSpeed's `torch_autocast` mode (float32 weights and optimizer
states, bf16 compute, bf16 gradient communication for Linear layers); `"bf16": {"enabled": true}`
in the JSON asks for that same bf16 training. fp16 is refused: torch_ref has no fp16 mode, and
DeepSpeed's CPU accelerator has none either. Activation checkpointing is `model.remat`.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import socket
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from jaxllm.config import Config
from jaxllm.errors import ConfigError
from jaxllm.loop import add_overrides
from torch_ref.optim import learning_rate, make_optimizer, set_learning_rate
from torch_ref.train import TrainResult, build_parser, main, prepare_run, run
from torch_ref.trainer import (
    Batch,
    Dist,
    StepOutput,
    build,
    global_count,
    loss_fn,
    loss_sum,
    micro_batches,
    pick_device,
    set_numerics,
)

ZERO_STAGES = (1, 2, 3)
AUTO = "auto"  # Hugging Face style: "fill this in from the train config"; the same as leaving the key out


def deepspeed_config_path(name_or_path: str | Path) -> Path:
    """A JSON path, or the name of a shipped one (`zero1`, `zero2`, `zero3` in configs/deepspeed/)."""
    path = Path(name_or_path)
    if path.suffix == ".json" or path.exists():
        return path
    shipped = Path(str(resources.files("jaxllm") / "configs" / "deepspeed")) / f"{name_or_path}.json"
    if shipped.is_file():
        return shipped
    raise ConfigError(f"DeepSpeed config {str(name_or_path)!r} not found (a .json path, or zero1, zero2, zero3)")


def load_deepspeed_config(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    """(the parsed JSON, its path for messages)."""
    path = deepspeed_config_path(name_or_path)
    if not path.is_file():
        raise ConfigError(f"DeepSpeed config file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data, str(path)


def _given(section: Any, key: str) -> Any:
    value = section.get(key, AUTO) if isinstance(section, dict) else AUTO
    return AUTO if value is None else value


def resolve_deepspeed_config(
    ds: dict[str, Any], config: Config, world_size: int, device_type: str, source: str = "DeepSpeed config"
) -> dict[str, Any]:
    """The DeepSpeed config to run: `ds` with batch sizes, clipping and precision from `config`.

    A value `ds` states that contradicts the training config is a `ConfigError` naming both values;
    so are fp16 (refused outright on CPU), optimizer/scheduler sections (the train config owns them),
    and a ZeRO stage other than 1, 2 or 3.
    """
    mcfg, tcfg = config.model, config.train
    if _given(ds.get("fp16"), "enabled") not in (AUTO, False):
        if device_type != "cuda":
            raise ConfigError(
                f"{source}: fp16.enabled=true, but DeepSpeed does not support fp16 on CPU (its CPU accelerator "
                "trains in float32 or bfloat16): remove the fp16 section, and set model.dtype=bfloat16 for bf16"
            )
        raise ConfigError(
            f"{source}: fp16.enabled=true contradicts model.dtype={mcfg.dtype} (torch_ref trains in float32 or "
            "bfloat16 only): remove the fp16 section"
        )
    for key in ("optimizer", "scheduler"):
        if key in ds:
            raise ConfigError(
                f"{source}: remove the {key!r} section: torch_ref's AdamW and warmup + cosine schedule are set by "
                "the train section (learning_rate, weight_decay, beta1, beta2, eps, warmup_steps, min_lr_ratio)"
            )
    if "activation_checkpointing" in ds:
        raise ConfigError(
            f"{source}: remove the 'activation_checkpointing' section and set model.remat=full (or save_dots): "
            "torch_ref checkpoints activations per block with torch.utils.checkpoint"
        )
    zero = ds.get("zero_optimization")
    stage = zero.get("stage") if isinstance(zero, dict) else None
    if stage not in ZERO_STAGES:
        got = "it is missing" if stage is None else f"got {json.dumps(stage)}"
        raise ConfigError(
            f"{source}: zero_optimization.stage must be 1, 2 or 3, {got} "
            "(for training without ZeRO use python -m torch_ref.train)"
        )

    out = copy.deepcopy(ds)
    if tcfg.batch_size % (tcfg.grad_accum * world_size):
        raise ConfigError(
            f"train.batch_size={tcfg.batch_size} is not divisible by train.grad_accum x ranks = "
            f"{tcfg.grad_accum} x {world_size}"
        )
    micro = tcfg.batch_size // (tcfg.grad_accum * world_size)
    derived = {
        "train_batch_size": (tcfg.batch_size, f"train.batch_size={tcfg.batch_size}"),
        "gradient_accumulation_steps": (tcfg.grad_accum, f"train.grad_accum={tcfg.grad_accum}"),
        "train_micro_batch_size_per_gpu": (
            micro,
            f"train.batch_size / (train.grad_accum x ranks) = {tcfg.batch_size} / ({tcfg.grad_accum} x {world_size})"
            f" = {micro}",
        ),
        "gradient_clipping": (tcfg.grad_clip, f"train.grad_clip={tcfg.grad_clip}"),
    }
    for key, (want, what) in derived.items():
        got = _given(ds, key)
        if got != AUTO and got != want:
            raise ConfigError(f"{source}: {key}={json.dumps(got)} contradicts {what}")
        out[key] = want

    bf16 = mcfg.dtype == "bfloat16"
    for key in ("bf16", "torch_autocast"):
        enabled = _given(ds.get(key), "enabled")
        if enabled != AUTO and bool(enabled) != bf16:
            raise ConfigError(f"{source}: {key}.enabled={json.dumps(enabled)} contradicts model.dtype={mcfg.dtype}")
    dtype = _given(ds.get("torch_autocast"), "dtype")
    if dtype not in (AUTO, "bfloat16", "bf16"):
        raise ConfigError(f"{source}: torch_autocast.dtype={json.dumps(dtype)} contradicts model.dtype={mcfg.dtype}")
    out.pop("bf16", None)
    out.pop("fp16", None)
    out["torch_autocast"] = {**(ds.get("torch_autocast") or {}), "enabled": bf16, "dtype": "bfloat16"}
    if not bf16:
        out.pop("torch_autocast")
    return out


class DeepSpeedTrainer:
    """A DeepSpeed engine around torch_ref's model and AdamW; every rank holds its ZeRO partitions."""

    def __init__(self, model: nn.Module, config: Config, ds_config: dict[str, Any], dist: Dist, device: torch.device):
        import deepspeed

        self.tcfg, self.dist, self.device = config.train, dist, device
        self.optimizer = make_optimizer(model, self.tcfg)  # the client optimizer ZeRO steps on its partitions
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=self.optimizer, config=ds_config)

    def train_step(self, batch: Batch) -> StepOutput:
        # DeepSpeed's update count (restored with its checkpoints) drives the schedule.
        set_learning_rate(self.optimizer, learning_rate(self.tcfg, self.engine.global_steps))
        k, count = self.tcfg.grad_accum, global_count(batch, self.dist, self.device)
        total = 0.0
        for micro in micro_batches(batch, k):
            loss = loss_sum(self.engine, micro) / count  # token-weighted over the global batch, as jaxllm
            # DeepSpeed scales by 1 / gradient_accumulation_steps and averages over the ranks itself.
            self.engine.backward(loss * k * self.dist.world_size)
            self.engine.step()  # the optimizer update happens at the last micro-batch
            total += float(loss.detach())
        loss = self.dist.sum(total, self.device)
        norm = self.engine.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")  # None: DeepSpeed did not compute it
        finite = bool(np.isfinite(loss) and (norm is None or np.isfinite(grad_norm)))
        return StepOutput(loss, grad_norm, finite, applied=True)

    @torch.no_grad()
    def eval_loss(self, batch: Batch) -> float:
        return float(loss_fn(self.engine, batch))

    def save(self, ckpt_dir: Path, step: int, extra: dict[str, Any]) -> None:
        """DeepSpeed's checkpoint of every rank's partitions in RUN/checkpoints/STEP (`latest` names it)."""
        self.engine.save_checkpoint(str(ckpt_dir), tag=str(step), client_state={"step": step, **extra})

    def restore(self, ckpt_dir: Path) -> tuple[int, dict[str, Any]] | None:
        if not (ckpt_dir / "latest").is_file():  # written by DeepSpeed once a checkpoint is complete
            return None
        path, client = self.engine.load_checkpoint(str(ckpt_dir))
        if path is None:
            return None
        return int(client["step"]), client

    def full_state_dict(self) -> dict[str, np.ndarray]:
        """The float32 weights, gathered from every rank's partitions (a collective under ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, p in self.engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)
            out[name] = (p.detach() if full is None else full).float().cpu().numpy()
        return out


def _single_process_env() -> None:
    """Run without a launcher: rank 0 of 1, on a free local port."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    defaults = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


def train(
    config: Config,
    run_dir: str | Path,
    deepspeed_config: str | Path | dict[str, Any],
    *,
    resume: bool = False,
    init: str | Path | None = None,
    device: str | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train `config` under DeepSpeed into `run_dir` (every rank calls this with the same arguments).

    `deepspeed_config`: a JSON path, a shipped name (zero1/zero2/zero3) or a dict.
    """
    if config.train.nonfinite == "skip":
        raise ConfigError(
            "train.nonfinite=skip is not supported with DeepSpeed (its engine applies every update): use stop"
        )
    if isinstance(deepspeed_config, dict):
        ds, source = deepspeed_config, "DeepSpeed config"
    else:
        ds, source = load_deepspeed_config(deepspeed_config)
    _single_process_env()
    dist = Dist.from_env()
    torch_device = pick_device(device, dist)
    ds_config = resolve_deepspeed_config(ds, config, dist.world_size, torch_device.type, source)
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if torch_device.type == "cuda" else "gloo")
    run_dir = prepare_run(config, run_dir, resume, dist, init)
    set_numerics(config.train, torch_device)
    model = build(config.model, config.train.seed, torch_device, init)
    trainer = DeepSpeedTrainer(model, config, ds_config, dist, torch_device)
    return run(config, run_dir, trainer, dist, resume=resume, progress=progress, init=init)


def _start(args: argparse.Namespace, config: Config) -> TrainResult:
    out = args.out or f"runs/{config.model.name}-deepspeed"
    return train(
        config, out, args.deepspeed, resume=args.resume, init=args.init, device=args.device,
        progress=not args.no_progress,
    )  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = build_parser("python -m torch_ref.train_deepspeed", __doc__.splitlines()[0].split(": ", 1)[1],
                     "runs/MODEL_NAME-deepspeed")  # fmt: skip
    p.add_argument("--deepspeed", required=True, metavar="JSON", help="DeepSpeed config: a path, or zero1/zero2/zero3")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # passed by the deepspeed launcher
    add_overrides(p)
    return p


if __name__ == "__main__":
    main(parser(), _start)
