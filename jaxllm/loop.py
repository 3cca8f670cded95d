"""The edges every training loop shares — jaxllm's (`jaxllm/train.py`) and torch_ref's
(`torch_ref/train.py`, plain/DDP and DeepSpeed) — written once, with neither JAX nor torch.

- the run directory: checks before any work (`check_run`), the files written at the start
  (`start_run`: config.yaml, run.json with the MFU peak and its source), the result (`RunResult`);
- the loop itself (`run_loop`): step (an asynchronous one is read one step late), non-finite
  handling, the logging / evaluation / checkpoint cadence (`Cadence`), step rates and MFU, the
  progress bar; a framework supplies one step, one evaluation and one checkpoint as functions;
- the validation split's check (`eval_checked`) and the mean of its batches' losses;
- the command-line flags `jaxllm train`, `python -m torch_ref.train` and `torch_ref.train_deepspeed`
  have in common (`add_run_flags`, `add_overrides`).

Run directory layout (both frameworks)::

    RUN/config.yaml        the resolved config
    RUN/run.json           {"peak_flops", "peak_flops_source"}: the peak every `mfu` divides by
    RUN/metrics.jsonl      {"step", "loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu"}; eval rows
                           {"step", "eval_loss"}; skipped steps {"step", "skipped", "loss"}
    RUN/checkpoints/N/     the framework's checkpoint of step N
    RUN/final/             a jaxllm params directory (`jaxllm.load_params`), with tokenizer.json (LoRA with
                           train.lora_merge=false: a peft adapter directory, docs/finetune.md)
    RUN/loss_curve.png
    RUN/profile/           jaxllm, with train.profile_steps: a jax.profiler trace (`jaxllm/profiler.py`)
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml

from jaxllm.config import Config, ModelConfig, TrainConfig, flops_per_token
from jaxllm.errors import ConfigError, InputError, JaxllmError
from jaxllm.interrupt import Interrupted, StopFlag
from jaxllm.metrics import MetricsLogger, StepClock


class TrainingError(JaxllmError):
    """Training stopped on purpose (a non-finite loss or gradient)."""


@dataclass
class RunResult:
    run_dir: Path
    final_dir: Path
    start_step: int
    end_step: int
    last_loss: float

    def summary(self) -> str:
        return (
            f"trained steps {self.start_step + 1}-{self.end_step}, last loss {self.last_loss:.4f}; "
            f"params in {self.final_dir}"
        )


@dataclass(frozen=True)
class StepOutput:
    """What one optimizer update reports (on every rank / process)."""

    loss: float  # mean over the global batch
    grad_norm: float  # global norm before clipping
    finite: bool
    applied: bool  # whether the update reached the parameters (only if finite, except under DeepSpeed)
    lr: float = math.nan  # the learning rate of this update (a loop may fill it in later)


@dataclass(frozen=True)
class Cadence:
    """Which steps (counted from 1) log, evaluate and checkpoint: every N-th and the final one."""

    steps: int
    log_every: int
    eval_every: int  # 0: never
    checkpoint_every: int  # 0: never

    @classmethod
    def of(cls, tcfg: TrainConfig) -> Cadence:
        return cls(tcfg.steps, tcfg.log_every, tcfg.eval_every, tcfg.checkpoint_every)

    def is_final(self, step: int) -> bool:
        return step == self.steps

    def logs(self, step: int) -> bool:
        return step % self.log_every == 0 or self.is_final(step)

    def evals(self, step: int) -> bool:
        return bool(self.eval_every) and (step % self.eval_every == 0 or self.is_final(step))

    def checkpoints(self, step: int) -> bool:
        return bool(self.checkpoint_every) and (step % self.checkpoint_every == 0 or self.is_final(step))


# The run directory --------------------------------------------------------------------------------
def check_run(config: Config, run_dir: str | Path, resume: bool, init: str | Path | None = None) -> Path:
    """Check the data and the run directory before any work; the run directory, absolute.

    `init`: the params directory the run starts from; the data must be tokenized with its tokenizer
    (a model vocabulary larger than the tokenizer's, padded, is then fine).
    Every process calls this, and waits for the others before process 0 writes to the directory.
    """
    from jaxllm.base_checkpoint import check_data_tokenizer, is_params_dir
    from jaxllm.data.loader import check_data_matches_model

    if not config.data.path:
        raise ConfigError("no training data: pass --data DATA_DIR (from `jaxllm preprocess`) or set data.path")
    from_ck = init is not None and is_params_dir(init)
    check_data_matches_model(Path(config.data.path), config.model, allow_larger_model_vocab=from_ck)
    if from_ck:
        check_data_tokenizer(config.data.path, init)
    run_dir = Path(run_dir).absolute()
    if not resume and ((run_dir / "checkpoints").exists() or (run_dir / "final").exists()):
        raise InputError(f"{run_dir} already holds a run: pass --resume to continue it, or --out for a new run")
    if resume:
        if (run_dir / "final").exists() and not has_checkpoints(run_dir):
            raise InputError(
                f"{run_dir} holds finished params in final/ but no checkpoint to resume from: "
                "use --out for a new run (or train.checkpoint_every > 0 to make runs resumable)"
            )
        check_same_shapes(config, run_dir / "config.yaml")
    return run_dir


def has_checkpoints(run_dir: Path) -> bool:
    """Whether RUN/checkpoints/ holds a step directory (a name that is a number)."""
    d = run_dir / "checkpoints"
    return d.is_dir() and any(p.name.isdigit() for p in d.iterdir())


# Model fields that decide the shapes (and dtypes) of parameters (and so of optimizer state and checkpoints).
SHAPE_FIELDS = ("family", "vocab_size", "context_length", "d_model", "n_layers", "n_heads", "n_kv_heads",
                "head_dim", "d_ff", "tie_embeddings", "qkv_bias", "param_dtype")  # fmt: skip


def check_same_shapes(config: Config, saved_config: Path) -> None:
    """Refuse to resume when a model field that decides shapes differs from the run's config.yaml."""
    if not saved_config.is_file():
        return
    try:
        saved = Config.model_validate(yaml.safe_load(saved_config.read_text())).model
    except Exception:  # an older or hand-edited file: the checkpoint's own shapes are checked on restore
        return
    now = config.model

    def shapes(m: ModelConfig) -> tuple:  # n_kv_heads None and n_kv_heads = n_heads are the same shapes
        return (*(getattr(m, f) for f in SHAPE_FIELDS), m.kv_heads, m.dim_per_head)

    if shapes(saved) == shapes(now):
        return
    diff = [
        f"model.{f}: run has {getattr(saved, f)!r}, now {getattr(now, f)!r}"
        for f in SHAPE_FIELDS
        if getattr(saved, f) != getattr(now, f)
    ]
    if diff:
        raise ConfigError(
            f"cannot resume {saved_config.parent}: the model's shapes changed ({'; '.join(diff)}); "
            "resume with the run's values, or use --out for a new run"
        )


def start_run(run_dir: Path, config: Config, peak: tuple[float, str], *, start: int, is_main: bool) -> MetricsLogger:
    """Write config.yaml and run.json (process 0) and open metrics.jsonl, cut back to `start` on resume."""
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        run = {"peak_flops": peak[0], "peak_flops_source": peak[1]}
        (run_dir / "run.json").write_text(json.dumps(run, indent=1) + "\n")
    return MetricsLogger(run_dir, enabled=is_main, truncate_after_step=start)


def eval_checked(config: Config, make_val_batches: Callable[[], object], is_main: bool) -> Config:
    """`config`, with evaluation turned off (and a warning) when the validation split has no batch."""
    if not config.train.eval_every:
        return config
    try:
        make_val_batches()
    except InputError as err:
        if is_main:
            print(f"warning: evaluation disabled: {err}", flush=True)
        return config.model_copy(update={"train": config.train.model_copy(update={"eval_every": 0})})
    return config


def mean_eval_loss(batch_loss: Callable[[], float], n_batches: int) -> float:
    """The mean of `n_batches` calls of `batch_loss` (one validation batch each, in file order)."""
    losses = [batch_loss() for _ in range(n_batches)]
    return sum(losses) / len(losses)


# The loop ----------------------------------------------------------------------------------------
# What a framework's step returns: its output, or a function that reads it (blocking until the step is
# done). A reader is called one step late, after the next step is dispatched (see `run_loop`).
StepResult = StepOutput | Callable[[], StepOutput]


def run_loop(
    config: Config,
    *,
    start: int,
    train_step: Callable[[int], StepResult],
    evaluate: Callable[[], float],
    save: Callable[[int], None],
    logger: MetricsLogger,
    peak: tuple[float, str],
    progress: bool,
    is_main: bool,
    stop: StopFlag | None = None,
) -> float:
    """Steps `start + 1` to `train.steps`: each runs `train_step(step)`, then logs, evaluates and
    checkpoints (`save(step)`) on the cadence; returns the last finite loss.

    A step that returns a reader (an asynchronous device step) is read one step late: after the next
    step has been dispatched, so the device never idles while the host reads, logs and feeds data.
    Steps that evaluate, checkpoint, stop or end the run are read before then: every checkpoint
    holds only steps whose outputs were checked. The rows written are the same either way.

    `stop` (a signal arrived, see `jaxllm/interrupt.py`): after a step it says stop, that step is
    checkpointed (if the cadence did not already) and `Interrupted` is raised.

    Evaluation and checkpoint time are not step time (the clock pauses). A non-finite update stops
    the run with `TrainingError` (read one step late, the step after it has been computed too, and
    is discarded: nothing is saved after it), or is logged as skipped under `train.nonfinite=skip`.
    """
    from tqdm.auto import tqdm

    mcfg, tcfg = config.model, config.train
    cadence = Cadence.of(tcfg)
    tokens = tcfg.batch_size * mcfg.context_length
    clock = StepClock(tokens, flops_per_token(mcfg)["train"], peak[0], peak[1], warn=is_main)
    bar = tqdm(total=tcfg.steps, initial=start, disable=not (progress and is_main), unit="step")
    last_loss = math.nan

    def finish(step: int, result: StepResult) -> None:
        """Read a step's output (waiting for it), then check and log it."""
        nonlocal last_loss
        out = result if isinstance(result, StepOutput) else result()
        clock.step_done()
        if not out.finite:
            _non_finite(step, out, tcfg, logger, is_main)
        else:
            last_loss = out.loss
        if cadence.logs(step):
            row = {"step": step, "loss": out.loss, "lr": out.lr, "grad_norm": out.grad_norm, **clock.rates()}
            logger.log(row)
            bar.set_postfix(loss=f"{out.loss:.4f}", refresh=False)
        bar.update(1)

    pending: tuple[int, StepResult] | None = None  # the previous step, dispatched but not yet read
    try:
        for step in range(start + 1, tcfg.steps + 1):
            result = train_step(step)
            if pending is not None:
                finish(*pending)
                pending = None
            stopping = stop is not None and stop.stop_at(step) and not cadence.is_final(step)
            if cadence.evals(step) or cadence.checkpoints(step) or stopping or cadence.is_final(step):
                finish(step, result)
            else:
                pending = (step, result)
            if cadence.evals(step):
                logger.log({"step": step, "eval_loss": evaluate()})
                clock.pause()  # evaluation time is not step time
            if cadence.checkpoints(step):
                save(step)
                clock.pause()  # nor is checkpointing
            if stopping:
                if not cadence.checkpoints(step):
                    save(step)
                raise Interrupted(stop.signum, step, None)
    finally:
        bar.close()
    return last_loss


def _non_finite(step: int, out: StepOutput, tcfg: TrainConfig, logger: MetricsLogger, is_main: bool) -> None:
    """Stop (raising `TrainingError`) or log a skipped step, per `train.nonfinite`."""
    what = f"non-finite loss or gradient at step {step} (loss={out.loss}, grad_norm={out.grad_norm})"
    if out.applied:
        raise TrainingError(f"{what}: stopping. The update was already applied; checkpoints hold finite states")
    if tcfg.nonfinite == "stop":
        raise TrainingError(
            f"{what}: stopping. The update was not applied; checkpoints hold only finite states "
            "(set train.nonfinite=skip to skip such steps instead)"
        )
    logger.log({"step": step, "skipped": True, "loss": out.loss})
    if is_main:
        print(f"warning: {what}: step skipped", flush=True)


# Command line -------------------------------------------------------------------------------------
def add_run_flags(p: argparse.ArgumentParser, *, sections: str, default_out: str) -> None:
    """The flags of every training command: --config, --data, --out, --resume, --no-progress."""
    p.add_argument("--config", help=f"a preset name or YAML config ({sections} sections; optional with --init CK)")
    p.add_argument("--data", help="DATA_DIR from `jaxllm preprocess` (sets data.path)")
    p.add_argument("--out", help=f"run directory (default: {default_out})")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_overrides(p: argparse.ArgumentParser) -> None:
    """The trailing KEY=VALUE config overrides (added last: after every flag in the help)."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides, e.g. train.steps=200")


def load_config(args: argparse.Namespace) -> Config:
    """The config of `--config`, the overrides and `--data`; with `--init CK` (a params directory) the
    model section is CK's (`jaxllm.base_checkpoint.config_from_checkpoint`) and `--config` optional."""
    from jaxllm.base_checkpoint import config_from_checkpoint, is_params_dir

    overrides = [*args.overrides, *([f"data.path={args.data}"] if args.data else [])]
    init = getattr(args, "init", None)
    if init is not None and is_params_dir(init):
        return config_from_checkpoint(init, args.config, overrides)
    if args.config is None:
        raise ConfigError("pass --config CONFIG (a preset name or YAML file), or --init CK to start from a checkpoint")
    return Config.load(args.config, overrides)
