"""`jaxllm train`: the training loop — set-up, loop, eval, checkpoints, final params.

This is the edge around the pure `train_step`: it builds the mesh and shardings, places state and
batches, runs the jitted step, logs, evaluates, checkpoints with orbax, and writes `final/`.

The run directory, the loop's cadence and its logging are `jaxllm/loop.py`'s, shared with torch_ref;
here `RUN/checkpoints/N/` is an orbax CheckpointManager step (train state, data-loader state).
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
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxllm.checkpoint import save_params
from jaxllm.config import Config
from jaxllm.data.loader import make_loader
from jaxllm.loop import (
    RunResult,
    StepOutput,
    TrainingError,
    check_run,
    eval_checked,
    mean_eval_loss,
    run_loop,
    start_run,
)
from jaxllm.metrics import plot_loss_curve
from jaxllm.model import abstract_params, init_params
from jaxllm.optim import make_optimizer
from jaxllm.peak import run_peak_flops
from jaxllm.sharding import batch_sharding, make_mesh, param_shardings, replicated, tracing_on
from jaxllm.train_step import eval_step, init_state, train_step

__all__ = ["TrainResult", "TrainingError", "train"]


@dataclass
class TrainResult(RunResult):
    param_shardings: Any = None  # the sharding each parameter had during training


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
    run_dir = check_run(config, run_dir, resume)
    data_dir = Path(config.data.path)
    if jax.process_count() > 1:  # every process has looked at run_dir before process 0 writes to it
        multihost_utils.sync_global_devices("jaxllm: run directory checked")
    is_main = jax.process_index() == 0
    mesh = make_mesh(config.mesh, devices)
    device = mesh.devices.flat[0]
    # Before anything else starts (on a CPU the figure is measured once per machine, then cached).
    kind, precision = device.device_kind, tcfg.matmul_precision
    nan = (float("nan"), "")
    peak = run_peak_flops(device.platform, kind, mesh.size, mcfg.dtype, precision, tcfg.peak_flops) if is_main else nan

    optimizer = make_optimizer(tcfg)
    step_fn, state_sh, batch_sh = sharded_train_step(config, mesh, optimizer)
    rep = replicated(mesh)
    init_fn = jax.jit(lambda: init_state(init_params(mcfg, tcfg.seed), optimizer), out_shardings=state_sh)
    eval_fn = jax.jit(partial(eval_step, mcfg), in_shardings=(state_sh["params"], batch_sh), out_shardings=rep)

    loader = make_loader(data_dir, "train", mcfg.context_length, tcfg.batch_size, tcfg.seed, sharding=batch_sh)
    config = eval_checked(config, lambda: _val_loader(config, batch_sh), is_main)
    tcfg = config.train
    manager = ocp.CheckpointManager(
        run_dir / "checkpoints",
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
        logger = start_run(run_dir, config, peak, start=start, is_main=is_main)
        loop = _Loop(config, state, step_fn, eval_fn, loader, batch_sh, manager)
        try:
            last_loss = run_loop(
                config, start=start, train_step=loop.step, evaluate=loop.evaluate, save=loop.save, logger=logger,
                peak=peak, progress=progress, is_main=is_main,
            )  # fmt: skip
        finally:
            manager.wait_until_finished()
            manager.close()
            logger.close()
    state = loop.state
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
    return TrainResult(run_dir, final_dir, start, tcfg.steps, last_loss, param_shardings=shardings)


@dataclass
class _Loop:
    """jaxllm's step, evaluation and checkpoint for `run_loop`; holds the (donated, replaced) state."""

    config: Config
    state: dict
    step_fn: Callable
    eval_fn: Callable
    loader: Any
    batch_sh: NamedSharding
    manager: ocp.CheckpointManager

    def step(self, step: int) -> StepOutput:
        batch = self.loader.to_global(next(self.loader), self.batch_sh)
        self.state, metrics = self.step_fn(self.state, batch)
        m = jax.device_get(metrics)
        return StepOutput(float(m["loss"]), float(m["grad_norm"]), bool(m["finite"]), False, float(m["lr"]))

    def evaluate(self) -> float:
        return evaluate(self.config, self.state["params"], self.eval_fn, self.batch_sh)

    def save(self, step: int) -> None:
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), loader=ocp.args.JsonSave(self.loader.get_state())
        )
        self.manager.save(step, args=args)


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
    return mean_eval_loss(lambda: float(eval_fn(params, loader.to_global(next(loader), batch_sh))),
                          config.train.eval_batches)  # fmt: skip
