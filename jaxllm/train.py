"""`jaxllm train`: the training loop — set-up, loop, eval, checkpoints, final params.

This is the edge around the pure `train_step`: it builds the mesh and shardings, places state and
batches, runs the jitted step, logs, evaluates, checkpoints with orbax, and writes `final/`.

Run directory layout::

    RUN/config.yaml        the resolved config
    RUN/metrics.jsonl      one JSON object per logged step ({"step", "loss", ...}; eval rows {"step", "eval_loss"})
    RUN/checkpoints/N/     orbax CheckpointManager: train state, data-loader state, config
    RUN/final/             params for generate/serve (`jaxllm.load_params`), with tokenizer.json
    RUN/loss_curve.png
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import optax
import orbax.checkpoint as ocp
import yaml
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxllm.checkpoint import save_params
from jaxllm.config import Config, flops_per_token
from jaxllm.data.loader import check_data_matches_model, make_loader
from jaxllm.errors import ConfigError, InputError, JaxllmError
from jaxllm.metrics import MetricsLogger, StepClock, peak_flops, plot_loss_curve
from jaxllm.model import abstract_params, init_params
from jaxllm.optim import make_optimizer
from jaxllm.sharding import batch_sharding, make_mesh, param_shardings, replicated, tracing_on
from jaxllm.train_step import eval_step, init_state, train_step


class TrainingError(JaxllmError):
    """Training stopped on purpose (a non-finite loss or gradient)."""


@dataclass
class TrainResult:
    run_dir: Path
    final_dir: Path
    start_step: int
    end_step: int
    last_loss: float
    param_shardings: Any  # the sharding each parameter had during training


def state_shardings(config: Config, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> dict:
    """Shardings of the whole train state: optimizer moments follow their parameters."""
    p_sh = param_shardings(config.model, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, abstract_params(config.model))
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, p_sh, transform_non_params=lambda _: replicated(mesh)
    )
    return {"step": replicated(mesh), "params": p_sh, "opt_state": opt_sh}


def sharded_train_step(
    config: Config, mesh: Mesh, optimizer: optax.GradientTransformation
) -> tuple[Callable, dict, NamedSharding]:
    """The jitted train step over `mesh` (state donated), its state shardings and its batch sharding."""
    tcfg = config.train
    batch_sh = batch_sharding(mesh, tcfg.batch_size)
    micro = tcfg.batch_size // tcfg.grad_accum
    micro_sh = batch_sharding(mesh, micro, "micro-batch size (train.batch_size / train.grad_accum)")
    state_sh = state_shardings(config, optimizer, mesh)
    step_fn = jax.jit(
        partial(train_step, config.model, tcfg, optimizer, micro_sharding=micro_sh),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=0,
    )
    return step_fn, state_sh, batch_sh


def abstract_state(config: Config, optimizer: optax.GradientTransformation, shardings: dict) -> dict:
    shapes = jax.eval_shape(lambda: init_state(abstract_params(config.model), optimizer))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    devices: list[jax.Device] | None = None,
) -> TrainResult:
    """Train `config` into `run_dir` (every JAX process calls this with the same arguments).

    `devices`: the devices of the mesh (default: all of them).
    """
    mcfg, tcfg = config.model, config.train
    if not config.data.path:
        raise ConfigError("no training data: pass --data DATA_DIR (from `jaxllm preprocess`) or set data.path")
    data_dir = Path(config.data.path)
    check_data_matches_model(data_dir, mcfg)
    run_dir = Path(run_dir).absolute()
    ckpt_dir = run_dir / "checkpoints"
    if not resume and (ckpt_dir.exists() or (run_dir / "final").exists()):
        raise InputError(f"{run_dir} already holds a run: pass --resume to continue it, or --out for a new run")
    if jax.process_count() > 1:  # every process has looked at run_dir before process 0 writes to it
        multihost_utils.sync_global_devices("jaxllm: run directory checked")
    is_main = jax.process_index() == 0

    mesh = make_mesh(config.mesh, devices)
    optimizer = make_optimizer(tcfg)
    step_fn, state_sh, batch_sh = sharded_train_step(config, mesh, optimizer)
    rep = replicated(mesh)
    init_fn = jax.jit(lambda: init_state(init_params(mcfg, tcfg.seed), optimizer), out_shardings=state_sh)
    eval_fn = jax.jit(partial(eval_step, mcfg), in_shardings=(state_sh["params"], batch_sh), out_shardings=rep)

    loader = make_loader(data_dir, "train", mcfg.context_length, tcfg.batch_size, tcfg.seed, sharding=batch_sh)
    if tcfg.eval_every and not _val_has_a_batch(config, batch_sh):
        tcfg = tcfg.model_copy(update={"eval_every": 0})
        config = config.model_copy(update={"train": tcfg})
    manager = ocp.CheckpointManager(
        ckpt_dir,
        options=ocp.CheckpointManagerOptions(max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=True),
    )
    start = manager.latest_step() if resume else None
    with jax.default_matmul_precision(tcfg.matmul_precision), tracing_on(mesh):
        if start is not None:
            restored = manager.restore(
                start,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state(config, optimizer, state_sh)),
                    loader=ocp.args.JsonRestore(),
                ),
            )
            state = restored.state
            loader.set_state(restored.loader)
        else:
            state = init_fn()
        start = start or 0
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        logger = MetricsLogger(run_dir, enabled=is_main, truncate_after_step=start)
        peak, _ = peak_flops(mcfg.dtype, tcfg.matmul_precision, tcfg.peak_flops)
        try:
            state, last_loss = _loop(
                config, state, start, step_fn, eval_fn, loader, batch_sh, manager, logger, progress, peak
            )
        finally:
            manager.wait_until_finished()
            manager.close()
            logger.close()
    final_dir = save_params(
        run_dir / "final",
        mcfg,
        state["params"],
        overwrite=True,
        extra_files=[p for p in [data_dir / "tokenizer.json"] if p.exists()],
    )
    if is_main and logger.path.exists():
        plot_loss_curve(logger.path, run_dir / "loss_curve.png")
    shardings = jax.tree.map(lambda x: x.sharding, state["params"])
    return TrainResult(run_dir, final_dir, start, tcfg.steps, last_loss, shardings)


def _loop(
    config: Config,
    state: dict,
    start: int,
    step_fn: Any,
    eval_fn: Any,
    loader: Any,
    batch_sh: jax.sharding.NamedSharding,
    manager: ocp.CheckpointManager,
    logger: MetricsLogger,
    progress: bool,
    peak: float,
) -> tuple[dict, float]:
    from tqdm.auto import tqdm

    mcfg, tcfg = config.model, config.train
    clock = StepClock(tcfg.batch_size * mcfg.context_length, flops_per_token(mcfg)["train"], peak)
    bar = tqdm(total=tcfg.steps, initial=start, disable=not (progress and jax.process_index() == 0), unit="step")
    last_loss = float("nan")
    for step in range(start + 1, tcfg.steps + 1):
        batch = loader.to_global(next(loader), batch_sh)
        state, metrics = step_fn(state, batch)
        metrics = jax.device_get(metrics)
        clock.step_done()
        if not metrics["finite"]:
            what = (
                f"non-finite loss or gradient at step {step} (loss={metrics['loss']}, grad_norm={metrics['grad_norm']})"
            )
            if tcfg.nonfinite == "stop":
                raise TrainingError(
                    f"{what}: stopping. The update was not applied; checkpoints hold only finite states "
                    "(set train.nonfinite=skip to skip such steps instead)"
                )
            logger.log({"step": step, "skipped": True, "loss": float(metrics["loss"])})
            print(f"warning: {what}: step skipped", flush=True)
        else:
            last_loss = float(metrics["loss"])
        if step % tcfg.log_every == 0 or step == tcfg.steps:
            row = {
                "step": step,
                "loss": float(metrics["loss"]),
                "lr": float(metrics["lr"]),
                "grad_norm": float(metrics["grad_norm"]),
                **clock.rates(),
            }
            logger.log(row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
        if tcfg.eval_every and (step % tcfg.eval_every == 0 or step == tcfg.steps):
            logger.log({"step": step, "eval_loss": evaluate(config, state["params"], eval_fn, batch_sh)})
            clock.pause()  # evaluation time is not step time
        if tcfg.checkpoint_every and (step % tcfg.checkpoint_every == 0 or step == tcfg.steps):
            manager.save(
                step,
                args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader.get_state())
                ),
            )
            clock.pause()  # nor is checkpointing
        bar.update(1)
    bar.close()
    return state, last_loss


def _val_has_a_batch(config: Config, batch_sh: jax.sharding.NamedSharding) -> bool:
    try:
        _val_loader(config, batch_sh)
    except InputError as err:
        if jax.process_index() == 0:
            print(f"warning: evaluation disabled: {err}", flush=True)
        return False
    return True


def _val_loader(config: Config, batch_sh: jax.sharding.NamedSharding) -> Any:
    """The validation split in file order, batches of train.batch_size."""
    return make_loader(
        config.data.path,
        "val",
        config.model.context_length,
        config.train.batch_size,
        0,
        sharding=batch_sh,
        shuffle=False,
        num_epochs=None,
    )


def evaluate(config: Config, params: Any, eval_fn: Any, batch_sh: jax.sharding.NamedSharding) -> float:
    """Mean loss over the first `train.eval_batches` batches of the validation split, in file order."""
    loader = _val_loader(config, batch_sh)
    batches = (loader.to_global(next(loader), batch_sh) for _ in range(config.train.eval_batches))
    losses = [float(eval_fn(params, batch)) for batch in batches]
    return sum(losses) / len(losses)
