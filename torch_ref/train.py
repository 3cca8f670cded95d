"""`python -m torch_ref.train`: the torch_ref training loop — plain PyTorch on one process, or DDP
under `torchrun` — as `jaxllm/train.py` is jaxllm's; `torch_ref.train_deepspeed` runs the same loop.

    python -m torch_ref.train --config mini --data DATA_DIR --out RUN [--init W.safetensors] [key=value ...]
    torchrun --nproc_per_node 2 -m torch_ref.train --config mini --data DATA_DIR --out RUN

The same config, data files, batch order, AdamW, schedule, clipping, gradient accumulation and run
directory as `jaxllm train`: the run directory, cadence, logging and MFU peak are `jaxllm/loop.py`'s,
shared with jaxllm. A `Trainer` (`torch_ref/trainer.py`: plain/DDP; `torch_ref/train_deepspeed.py`)
owns the model, optimizer and distribution; this module owns everything around it:

    RUN/checkpoints/N/     the trainer's state and the data position (torch.save, or DeepSpeed's layout)
    RUN/final/             a jaxllm params directory (`jaxllm.load_params`), plus model.safetensors (the
                           torch_ref state dict, `jaxllm.torch_io`) and tokenizer.json

Ranks come from the launcher's environment (`torchrun`, `deepspeed`): RANK, WORLD_SIZE, LOCAL_RANK.
`--compile` runs the model through `torch.compile`.
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from jaxllm.config import Config, ModelConfig
from jaxllm.errors import ConfigError, JaxllmError
from jaxllm.loop import (
    RunResult,
    StepOutput,
    add_overrides,
    add_run_flags,
    check_run,
    eval_checked,
    load_config,
    mean_eval_loss,
    run_loop,
    start_run,
)
from jaxllm.metrics import plot_loss_curve
from jaxllm.peak import run_peak_flops
from torch_ref.data import TorchBatches
from torch_ref.optim import learning_rate
from torch_ref.trainer import Dist, PlainTrainer, Trainer, build, checkpoint_steps, pick_device, set_numerics

WEIGHTS_FILE = "model.safetensors"
TrainResult = RunResult  # torch_ref's result has the fields every loop's has


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
    """Train `config` with plain PyTorch (DDP under a launcher) into `run_dir`; every rank calls this.

    `init`: where the weights start (`torch_ref.trainer.build`): None, jaxllm's init for `train.seed`;
    "torch", torch's seeded init; a params directory (`--init CK`: build `config` with
    `jaxllm.base_checkpoint.config_from_checkpoint`); or a torch_ref safetensors file.
    """
    dist = Dist.from_env()
    torch_device = pick_device(device, dist)
    if dist.world_size > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch_device.type == "cuda" else "gloo")
    run_dir = prepare_run(config, run_dir, resume, dist, init)
    set_numerics(config.train, torch_device)
    model = build(config.model, config.train.seed, torch_device, init)
    trainer = PlainTrainer(model, config, dist, torch_device, compile)
    return run(config, run_dir, trainer, dist, resume=resume, progress=progress, init=init)


def prepare_run(config: Config, run_dir: str | Path, resume: bool, dist: Dist, init: str | Path | None = None) -> Path:
    """Check the data and the run directory (`jaxllm.loop.check_run`) before any work."""
    if config.train.lora_rank:
        raise ConfigError(
            f"train.lora_rank={config.train.lora_rank}: torch_ref does not train LoRA; Hugging Face peft is its "
            "PyTorch reference (docs/finetune.md)"
        )
    from jaxllm.base_checkpoint import check_same_param_shapes, checkpoint_model, is_params_dir

    if init is not None and is_params_dir(init):
        check_same_param_shapes(checkpoint_model(init), config.model, str(init))
    run_dir = check_run(config, run_dir, resume, init)
    dist.barrier()  # every rank has looked at run_dir before rank 0 writes to it
    return run_dir


def peak_flops(config: Config, device: torch.device, dist: Dist) -> tuple[float, str]:
    """Total peak FLOP/s of the run for MFU, and its source (`jaxllm.peak.run_peak_flops`, as jaxllm's)."""
    kind = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    mcfg, tcfg = config.model, config.train
    return run_peak_flops(device.type, kind, dist.world_size, mcfg.dtype, tcfg.matmul_precision, tcfg.peak_flops)


# Checkpoints and final weights --------------------------------------------------------------------
def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    for step in checkpoint_steps(ckpt_dir)[:-keep]:
        shutil.rmtree(ckpt_dir / str(step), ignore_errors=True)


def save_final(
    run_dir: Path, cfg: ModelConfig, state_dict: dict[str, np.ndarray], data_dir: Path, init: str | Path | None = None
) -> Path:
    """RUN/final: a jaxllm params directory with the torch_ref weights file and the tokenizer (and, from
    `--init CK`, CK's chat template and generation files) beside it (written under a temporary name and
    renamed, by `jaxllm.save_params`)."""
    from jaxllm.base_checkpoint import carried_files
    from jaxllm.checkpoint import save_params
    from jaxllm.convert import from_torch_state_dict, to_numpy_state_dict
    from jaxllm.torch_io import write_state_dict

    params = from_torch_state_dict(cfg, state_dict)
    with tempfile.TemporaryDirectory(dir=run_dir, prefix=".final-") as tmp:
        weights = write_state_dict(Path(tmp) / WEIGHTS_FILE, cfg, to_numpy_state_dict(cfg, params))
        extra = [weights, *carried_files(init, data_dir)]
        return save_params(run_dir / "final", cfg, params, overwrite=True, extra_files=extra)


# The loop ----------------------------------------------------------------------------------------
def run(
    config: Config, run_dir: Path, trainer: Trainer, dist: Dist, *, resume: bool, progress: bool,
    init: str | Path | None = None,
) -> TrainResult:
    """Train `config` with `trainer` into `run_dir` (from `prepare_run`); every rank calls this."""
    mcfg, tcfg = config.model, config.train
    data_dir = Path(config.data.path)
    ckpt_dir = run_dir / "checkpoints"
    # Before anything else starts (on a CPU the figure is measured once per machine, then cached).
    peak = peak_flops(config, trainer.device, dist) if dist.is_main else (float("nan"), "")
    restored = trainer.restore(ckpt_dir) if resume else None
    start, extra = restored or (0, {})
    loader = TorchBatches(
        data_dir, "train", mcfg.context_length, tcfg.batch_size, tcfg.seed, dist.rank, dist.world_size,
        device=trainer.device, doc_mask=config.data.doc_mask,
    )  # fmt: skip
    if "loader" in extra:
        loader.load_state_dict(extra["loader"])
    config = eval_checked(config, lambda: _val_batches(config, dist, torch.device("cpu")), dist.is_main)
    logger = start_run(run_dir, config, peak, start=start, is_main=dist.is_main)

    def train_step(step: int) -> StepOutput:
        # The rate of update `step` (counted from 1 here, from 0 in the schedule), as jaxllm logs it.
        return dataclasses.replace(trainer.train_step(next(loader)), lr=learning_rate(tcfg, step - 1))

    def save(step: int) -> None:
        trainer.save(ckpt_dir, step, {"loader": loader.state_dict()})
        if dist.is_main:
            prune_checkpoints(ckpt_dir, tcfg.keep_checkpoints)
        dist.barrier()

    try:
        last_loss = run_loop(
            config, start=start, train_step=train_step, evaluate=lambda: evaluate(config, trainer, dist), save=save,
            logger=logger, peak=peak, progress=progress, is_main=dist.is_main,
        )  # fmt: skip
    finally:
        logger.close()
    state_dict = trainer.full_state_dict()
    if dist.is_main:
        save_final(run_dir, mcfg, state_dict, data_dir, init)
        if logger.path.exists():
            plot_loss_curve(logger.path, run_dir / "loss_curve.png")
    dist.barrier()
    return TrainResult(run_dir, run_dir / "final", start, tcfg.steps, last_loss)


def _val_batches(config: Config, dist: Dist, device: torch.device) -> TorchBatches:
    """The validation split in file order, batches of train.batch_size (as jaxllm's `evaluate`)."""
    return TorchBatches(
        config.data.path, "val", config.model.context_length, config.train.batch_size, 0, dist.rank,
        dist.world_size, shuffle=False, device=device, doc_mask=config.data.doc_mask,
    )  # fmt: skip


def evaluate(config: Config, trainer: Trainer, dist: Dist) -> float:
    """Mean loss over the first `train.eval_batches` batches of the validation split, in file order."""
    batches = _val_batches(config, dist, trainer.device)
    loss = mean_eval_loss(lambda: trainer.eval_loss(next(batches)), config.train.eval_batches)
    return dist.mean(loss, trainer.device)


# Command line -------------------------------------------------------------------------------------
def build_parser(prog: str, description: str, default_out: str) -> argparse.ArgumentParser:
    """The flags every training command shares (`jaxllm.loop.add_run_flags`), plus torch_ref's own;
    an entry point adds its flags, then `jaxllm.loop.add_overrides`."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    add_run_flags(p, sections="model/data/train", default_out=default_out)
    p.add_argument("--init", metavar="CK|FILE.safetensors|torch",
                   help="initial weights: a params directory (import-hf/import-gguf/train; its model section, "
                   "tokenizer and chat template too), a torch_ref state dict, or torch (torch's own seeded "
                   "init); default: jaxllm's init for train.seed, converted")  # fmt: skip
    p.add_argument("--device", help="cpu, cuda or cuda:N (default: this rank's GPU if any, else cpu)")
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
        result = start(args, load_config(args))
        if Dist.from_env().is_main:
            print(result.summary())
    except JaxllmError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def parser() -> argparse.ArgumentParser:
    p = build_parser("python -m torch_ref.train", "plain PyTorch training, one process or DDP under `torchrun`.",
                     "runs/MODEL_NAME-torch")  # fmt: skip
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    add_overrides(p)
    return p


def _start(args: argparse.Namespace, config: Config) -> TrainResult:
    out = args.out or f"runs/{config.model.name}-torch"
    return train(
        config, out, resume=args.resume, init=args.init, device=args.device, compile=args.compile,
        progress=not args.no_progress,
    )  # fmt: skip


if __name__ == "__main__":
    main(parser(), _start)
