"""The training loop shared by `torch_ref.train` (plain / DDP) and `torch_ref.train_deepspeed`.

A `Trainer` owns the model, optimizer and distribution (one optimizer update from a batch, its
checkpoints, the full weights); this module owns everything around it, as `jaxllm/train.py` does
for jaxllm — the same data order (`TorchBatches`), schedule, loss, logging and run directory:

    RUN/config.yaml        the resolved config
    RUN/metrics.jsonl      {"step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu"}; eval rows
                           {"step", "eval_loss"} (jaxllm's `MetricsLogger`)
    RUN/checkpoints/N/     the trainer's state and the data position (torch.save, or DeepSpeed's layout)
    RUN/final/             a jaxllm params directory (`jaxllm.load_params`), plus model.safetensors (the
                           torch_ref state dict, `jaxllm.torch_io`) and tokenizer.json
    RUN/loss_curve.png

Ranks come from the launcher's environment (`torchrun`, `deepspeed`): RANK, WORLD_SIZE, LOCAL_RANK.
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from jaxllm.config import Config, ModelConfig, TrainConfig, flops_per_token
from jaxllm.errors import ConfigError, InputError, JaxllmError
from jaxllm.metrics import MetricsLogger, StepClock, datasheet_peak, plot_loss_curve
from torch_ref.data import TorchBatches
from torch_ref.optim import learning_rate

WEIGHTS_FILE = "model.safetensors"


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
        if self.world_size == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        torch.distributed.all_reduce(t)
        return float(t.item()) / self.world_size


@dataclass(frozen=True)
class StepOutput:
    loss: float  # mean over the global batch
    grad_norm: float  # global norm before clipping
    finite: bool
    applied: bool  # whether the update reached the parameters (plain: only if finite; DeepSpeed: always)


class Trainer(Protocol):
    """What a loop needs from a training strategy; collective methods are called on every rank."""

    device: torch.device

    def train_step(self, batch_BT1: torch.Tensor) -> StepOutput: ...  # one optimizer update, this rank's rows

    def eval_loss(self, batch_BT1: torch.Tensor) -> float: ...  # mean loss over this rank's rows

    def save(self, ckpt_dir: Path, step: int, extra: dict[str, Any]) -> None: ...  # collective

    def restore(self, ckpt_dir: Path) -> tuple[int, dict[str, Any]] | None: ...  # collective; (step, extra)

    def full_state_dict(self) -> dict[str, np.ndarray]: ...  # collective; float32, torch_ref names


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    start_step: int
    end_step: int
    last_loss: float


# The pure pieces -------------------------------------------------------------------------------
def loss_fn(model: nn.Module, batch_BT1: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over a (B, T+1) window batch, as `jaxllm.train_step.loss_fn`."""
    inputs_BT, targets_BT = batch_BT1[:, :-1], batch_BT1[:, 1:]
    logits_BTV = model(inputs_BT)
    return F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), targets_BT.reshape(-1))


def micro_batches(batch_BT1: torch.Tensor, k: int) -> list[torch.Tensor]:
    """Micro-batch j of k is rows j, j+k, j+2k, … (jaxllm's split)."""
    return [batch_BT1[j::k] for j in range(k)]


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


def build(cfg: ModelConfig, seed: int, device: torch.device, init: str | Path | None) -> nn.Module:
    """torch_ref's model for `cfg`: seeded torch init, or the weights in `init`; `model.remat` applied."""
    from torch_ref.model import build_model

    torch.manual_seed(seed)
    model = build_model(cfg, device)
    if init is not None:
        load_init(model, init, cfg)
    apply_remat(model, cfg.remat)
    return model


def prepare_run(config: Config, run_dir: str | Path, resume: bool, dist: Dist) -> Path:
    """Check the data and the run directory (as jaxllm's `train` does) before any work."""
    from jaxllm.data.loader import check_data_matches_model

    if not config.data.path:
        raise ConfigError("no training data: pass --data DATA_DIR (from `jaxllm preprocess`) or set data.path")
    check_data_matches_model(Path(config.data.path), config.model)
    run_dir = Path(run_dir).absolute()
    if not resume and ((run_dir / "checkpoints").exists() or (run_dir / "final").exists()):
        raise InputError(f"{run_dir} already holds a run: pass --resume to continue it, or --out for a new run")
    dist.barrier()  # every rank has looked at run_dir before rank 0 writes to it
    return run_dir


def measure_matmul_flops(device: torch.device, n: int = 1024, reps: int = 10) -> float:
    """Best-of-`reps` float32 FLOP/s of an n x n matmul with torch (the CPU "peak")."""
    a = torch.ones((n, n), device=device)
    a @ a
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ a
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(config: Config, device: torch.device, dist: Dist) -> float:
    """Total peak FLOP/s of the run, for MFU: `train.peak_flops`, the datasheet table, or (CPU) a
    matmul measured on this rank times the ranks (launchers give each CPU rank its share of cores)."""
    mcfg, tcfg = config.model, config.train
    if tcfg.peak_flops:
        return tcfg.peak_flops * dist.world_size
    if device.type == "cuda":
        per = datasheet_peak(torch.cuda.get_device_name(device), mcfg.dtype, tcfg.matmul_precision)
        return per * dist.world_size if per else float("nan")
    return measure_matmul_flops(device) * dist.world_size


# Checkpoints and final weights --------------------------------------------------------------------
def checkpoint_steps(ckpt_dir: Path) -> list[int]:
    """Steps of the checkpoint directories (named by step), oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(int(p.name) for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit())


def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for step in checkpoint_steps(ckpt_dir)[:-keep]:
        shutil.rmtree(ckpt_dir / str(step), ignore_errors=True)


def save_final(run_dir: Path, cfg: ModelConfig, state_dict: dict[str, np.ndarray], data_dir: Path) -> Path:
    """RUN/final: a jaxllm params directory with the torch_ref weights file and the tokenizer beside it
    (written under a temporary name and renamed, by `jaxllm.save_params`)."""
    from jaxllm.checkpoint import save_params
    from jaxllm.convert import from_torch_state_dict, to_numpy_state_dict
    from jaxllm.torch_io import write_state_dict

    params = from_torch_state_dict(cfg, state_dict)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".final-") as tmp:
        weights = write_state_dict(Path(tmp) / WEIGHTS_FILE, cfg, to_numpy_state_dict(cfg, params))
        extra = [weights, *[p for p in [data_dir / "tokenizer.json"] if p.exists()]]
        return save_params(run_dir / "final", cfg, params, overwrite=True, extra_files=extra)


# The loop ----------------------------------------------------------------------------------------
def run(config: Config, run_dir: Path, trainer: Trainer, dist: Dist, *, resume: bool, progress: bool) -> TrainResult:
    """Train `config` with `trainer` into `run_dir` (from `prepare_run`); every rank calls this."""
    mcfg, tcfg = config.model, config.train
    data_dir = Path(config.data.path)
    ckpt_dir = run_dir / "checkpoints"
    restored = trainer.restore(ckpt_dir) if resume else None
    start, extra = restored or (0, {})
    loader = TorchBatches(
        data_dir, "train", mcfg.context_length, tcfg.batch_size, tcfg.seed, dist.rank, dist.world_size,
        device=trainer.device,
    )  # fmt: skip
    if "loader" in extra:
        loader.load_state_dict(extra["loader"])
    if tcfg.eval_every and not _val_has_a_batch(config, dist):
        tcfg = tcfg.model_copy(update={"eval_every": 0})
        config = config.model_copy(update={"train": tcfg})
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    logger = MetricsLogger(run_dir, enabled=dist.is_main, truncate_after_step=start)
    peak = peak_flops(config, trainer.device, dist) if dist.is_main else float("nan")
    try:
        last_loss = _loop(config, trainer, dist, start, loader, ckpt_dir, logger, progress, peak)
    finally:
        logger.close()
    state_dict = trainer.full_state_dict()
    if dist.is_main:
        save_final(run_dir, mcfg, state_dict, data_dir)
        if logger.path.exists():
            plot_loss_curve(logger.path, run_dir / "loss_curve.png")
    dist.barrier()
    return TrainResult(run_dir, run_dir / "final", start, tcfg.steps, last_loss)


def _loop(
    config: Config,
    trainer: Trainer,
    dist: Dist,
    start: int,
    loader: TorchBatches,
    ckpt_dir: Path,
    logger: MetricsLogger,
    progress: bool,
    peak: float,
) -> float:
    from tqdm.auto import tqdm

    mcfg, tcfg = config.model, config.train
    clock = StepClock(tcfg.batch_size * mcfg.context_length, flops_per_token(mcfg)["train"], peak)
    bar = tqdm(total=tcfg.steps, initial=start, disable=not (progress and dist.is_main), unit="step")
    last_loss = float("nan")
    for step in range(start + 1, tcfg.steps + 1):
        out = trainer.train_step(next(loader))
        clock.step_done()
        if not out.finite:
            _non_finite(step, out, tcfg, logger, dist)
        else:
            last_loss = out.loss
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            # The rate of update `step` (counted from 1 here, from 0 in the schedule), as jaxllm logs it.
            row = {"step": step, "loss": out.loss, "lr": learning_rate(tcfg, step - 1), "grad_norm": out.grad_norm}
            logger.log({**row, **clock.rates()})
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
            logger.log({"step": step, "eval_loss": evaluate(config, trainer, dist)})
            clock.pause()  # evaluation time is not step time
        if tcfg.checkpoint_every and (step % tcfg.checkpoint_every == 0 or step == tcfg.steps):
            trainer.save(ckpt_dir, step, {"loader": loader.state_dict()})
            if dist.is_main:
                prune_checkpoints(ckpt_dir, tcfg.keep_checkpoints)
            dist.barrier()
            clock.pause()  # nor is checkpointing
        bar.update(1)
    bar.close()
    return last_loss


def _non_finite(step: int, out: StepOutput, tcfg: TrainConfig, logger: MetricsLogger, dist: Dist) -> None:
    """Stop (raising jaxllm's `TrainingError`) or log a skipped step, per `train.nonfinite`."""
    what = f"non-finite loss or gradient at step {step} (loss={out.loss}, grad_norm={out.grad_norm})"
    if tcfg.nonfinite == "stop" or out.applied:
        from jaxllm.train import TrainingError

        if out.applied:
            raise TrainingError(f"{what}: stopping. The update was already applied; checkpoints hold finite states")
        raise TrainingError(
            f"{what}: stopping. The update was not applied; checkpoints hold only finite states "
            "(set train.nonfinite=skip to skip such steps instead)"
        )
    logger.log({"step": step, "skipped": True, "loss": out.loss})
    if dist.is_main:
        print(f"warning: {what}: step skipped", flush=True)


def _val_batches(config: Config, dist: Dist, device: torch.device) -> TorchBatches:
    """The validation split in file order, batches of train.batch_size (as jaxllm's `evaluate`)."""
    return TorchBatches(
        config.data.path, "val", config.model.context_length, config.train.batch_size, 0, dist.rank,
        dist.world_size, shuffle=False, device=device,
    )  # fmt: skip


def _val_has_a_batch(config: Config, dist: Dist) -> bool:
    try:
        _val_batches(config, dist, torch.device("cpu"))
    except InputError as err:
        if dist.is_main:
            print(f"warning: evaluation disabled: {err}", flush=True)
        return False
    return True


def evaluate(config: Config, trainer: Trainer, dist: Dist) -> float:
    """Mean loss over the first `train.eval_batches` batches of the validation split, in file order."""
    batches = _val_batches(config, dist, trainer.device)
    losses = [trainer.eval_loss(next(batches)) for _ in range(config.train.eval_batches)]
    return dist.mean(sum(losses) / len(losses), trainer.device)


# Command line -------------------------------------------------------------------------------------
def build_parser(prog: str, description: str) -> argparse.ArgumentParser:
    """The flags both entry points share (as `jaxllm train`), plus torch_ref's own."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", required=True, help="a preset name or YAML config (model/data/train sections)")
    p.add_argument("--data", help="DATA_DIR from `jaxllm preprocess` (sets data.path)")
    p.add_argument("--out", help="run directory (default: runs/MODEL_NAME-torch)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--init", metavar="FILE.safetensors", help="initial weights (jaxllm export-torch, or RUN/final)")
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU if any, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.steps=200")
    return p


def main(
    parser: argparse.ArgumentParser,
    start: Callable[[argparse.Namespace, Config], TrainResult],
    argv: Sequence[str] | None = None,
) -> None:
    """Parse, load the config, call `start`; a `JaxllmError` prints one `error:` line and exits 2."""
    import jax

    jax.config.update("jax_platforms", "cpu")  # jax only converts the final weights: keep it off the GPUs
    args = parser.parse_args(argv)
    try:
        overrides = [*args.overrides, *([f"data.path={args.data}"] if args.data else [])]
        config = Config.load(args.config, overrides)
        result = start(args, config)
        if Dist.from_env().is_main:
            print(
                f"trained steps {result.start_step + 1}-{result.end_step}, last loss {result.last_loss:.4f}; "
                f"params in {result.final_dir}"
            )
    except JaxllmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
