"""`jaxllm train`: the training loop — set-up, loop, eval, checkpoints, final params.

This is the edge around the pure `train_step`: it builds the mesh and shardings, places state and
batches, runs the jitted step, logs, evaluates, checkpoints with orbax, and writes `final/`.

The run directory, the loop's cadence and its logging are `jaxllm/loop.py`'s, shared with torch_ref;
here `RUN/checkpoints/N/` is an orbax CheckpointManager step (train state, data-loader state).
"""

from __future__ import annotations

import gc
import inspect
import logging
import sys
import warnings
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

from jaxllm import lora
from jaxllm.base_checkpoint import carried_files, check_same_param_shapes, checkpoint_model
from jaxllm.checkpoint import Base, check_base, load_base, save_params
from jaxllm.config import Config
from jaxllm.data.loader import make_loader
from jaxllm.errors import ConfigError, InputError
from jaxllm.interrupt import Interrupted, StopFlag, exit_on_signal
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
from jaxllm.lora_peft import write_peft_adapter
from jaxllm.metrics import plot_loss_curve
from jaxllm.model import abstract_params, init_params
from jaxllm.optim import make_optimizer
from jaxllm.peak import run_peak_flops
from jaxllm.profiler import StepTrace
from jaxllm.sharding import batch_sharding, make_mesh, param_shardings, replicated, tracing_on, tree_shardings
from jaxllm.train_step import eval_step, init_state, train_step

__all__ = ["Interrupted", "TrainResult", "TrainingError", "train"]


@dataclass
class TrainResult(RunResult):
    param_shardings: Any = None  # the sharding each parameter had during training


def trainable(config: Config) -> Any:
    """The trained pytree's shapes: every parameter, or with LoRA only the adapters."""
    if lora.enabled(config.train):
        return lora.abstract_adapters(config.model, config.train)
    return abstract_params(config.model)


def trainable_shardings(config: Config, mesh: Mesh) -> Any:
    if lora.enabled(config.train):
        return tree_shardings(lora.adapter_axes(config.model, config.train), trainable(config), mesh)
    return param_shardings(config.model, mesh)


def state_shardings(config: Config, optimizer: optax.GradientTransformation, mesh: jax.sharding.Mesh) -> dict:
    """Shardings of the whole train state: optimizer moments follow their parameters."""
    p_sh = trainable_shardings(config, mesh)
    abstract_opt = jax.eval_shape(optimizer.init, trainable(config))
    opt_sh = optax.tree_map_params(
        optimizer, lambda _, s: s, abstract_opt, p_sh, transform_non_params=lambda _: replicated(mesh)
    )
    return {"step": replicated(mesh), "params": p_sh, "opt_state": opt_sh}


def sharded_train_step(
    config: Config, mesh: Mesh, optimizer: optax.GradientTransformation
) -> tuple[Callable, dict, NamedSharding]:
    """The jitted train step over `mesh` (state donated), its state shardings and its batch sharding.

    With LoRA the step takes the frozen base params as a third argument (sharded as parameters)."""
    tcfg = config.train
    batch_sh = batch_sharding(mesh, tcfg.batch_size)
    micro = tcfg.batch_size // tcfg.grad_accum
    micro_sh = batch_sharding(mesh, micro, "micro-batch size (train.batch_size / train.grad_accum)")
    state_sh = state_shardings(config, optimizer, mesh)
    base_sh = (param_shardings(config.model, mesh),) if lora.enabled(tcfg) else ()
    step_fn = jax.jit(
        lambda state, batch, *base: train_step(config.model, tcfg, optimizer, state, batch, micro_sh, *base),
        in_shardings=(state_sh, batch_sh, *base_sh),
        out_shardings=(state_sh, replicated(mesh)),
        donate_argnums=0,
    )
    return step_fn, state_sh, batch_sh


def abstract_state(config: Config, optimizer: optax.GradientTransformation, shardings: dict) -> dict:
    shapes = jax.eval_shape(lambda: init_state(trainable(config), optimizer))
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def train(
    config: Config,
    run_dir: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    devices: list[jax.Device] | None = None,
    handle_signals: bool = False,
    init: str | Path | None = None,
) -> TrainResult:
    """Train `config` into `run_dir` (every JAX process calls this with the same arguments).

    `devices`: the devices of the mesh (default: all of them).
    `resume`: continue from the newest checkpoint that restores (one that does not is moved aside to
    `checkpoints/N.corrupt-TIME` with a warning); none at all: start fresh.
    `handle_signals` (the command line): SIGINT/SIGTERM during the loop checkpoint the last completed
    step and raise `Interrupted` (see `jaxllm/interrupt.py`).
    `init`: a params directory to start from instead of `train.seed`'s init (`jaxllm/base_checkpoint.py`:
    build `config` with `config_from_checkpoint`); with LoRA (`train.lora_rank > 0`) the frozen base.
    `final/` then carries its tokenizer and chat template.
    """
    mcfg, tcfg = config.model, config.train
    lora.check_lora(mcfg, tcfg)
    if lora.enabled(tcfg) and init is None:
        raise ConfigError(f"train.lora_rank={tcfg.lora_rank} trains adapters on base weights: pass --init CK")
    if init is not None:
        check_same_param_shapes(checkpoint_model(init), mcfg, str(init))
    run_dir = check_run(config, run_dir, resume, init)
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
    p_sh = param_shardings(mcfg, mesh)
    base = None if init is None else load_base(init, mcfg, p_sh)
    eval_fn = jax.jit(partial(eval_step, mcfg), in_shardings=(p_sh, batch_sh), out_shardings=rep)
    merged = None
    if lora.enabled(tcfg):  # the state holds the adapters; the model's params are the base merged with them
        merged = jax.jit(partial(lora.merge, tcfg), out_shardings=base.shardings)
        init_fn = jax.jit(lambda: init_state(lora.init_adapters(mcfg, tcfg), optimizer), out_shardings=state_sh)
        eval_fn = partial(_merged_eval, eval_fn, merged, base.params)
    elif base is not None:  # full fine-tuning from CK: its params start the state, no copy is kept apart
        init_fn = partial(jax.jit(lambda p: init_state(p, optimizer), out_shardings=state_sh), base.params)
        base = None
    else:
        init_fn = jax.jit(lambda: init_state(init_params(mcfg, tcfg.seed), optimizer), out_shardings=state_sh)

    loader = make_loader(
        data_dir, "train", mcfg.context_length, tcfg.batch_size, tcfg.seed, sharding=batch_sh,
        doc_mask=config.data.doc_mask,
    )  # fmt: skip
    config = eval_checked(config, lambda: _val_loader(config, batch_sh), is_main)
    tcfg = config.train
    manager = ocp.CheckpointManager(
        run_dir / "checkpoints",
        options=ocp.CheckpointManagerOptions(max_to_keep=tcfg.keep_checkpoints, enable_async_checkpointing=True),
    )
    steps = sorted(manager.all_steps(), reverse=True) if resume else []
    if steps and (steps[0] > tcfg.steps or (steps[0] == tcfg.steps and (run_dir / "final").exists())):
        where = "past" if steps[0] > tcfg.steps else "already finished at"
        raise InputError(
            f"{run_dir} is at step {steps[0]}, {where} train.steps={tcfg.steps}: nothing to train "
            f"(pass train.steps > {steps[0]} to train further)"
        )
    if steps:
        _check_same_state(config, run_dir / "config.yaml")
    elif resume and is_main:
        print(f"no checkpoint in {run_dir}: starting fresh", flush=True)
    stop = StopFlag(multiprocess=jax.process_count() > 1) if handle_signals else None
    with jax.default_matmul_precision(tcfg.matmul_precision), tracing_on(mesh):
        if steps:
            target = abstract_state(config, optimizer, state_sh)
            start, restored = _restore_newest(manager, steps, target, run_dir, is_main, lora.enabled(tcfg))
            state = restored.state
            if lora.enabled(tcfg):
                check_base(restored.base, base, run_dir / "checkpoints" / str(start))
            loader.set_state(restored.loader)  # a changed data plan (batch size, seed…) is refused here
        else:
            start, state = 0, init_fn()
        del init_fn
        logger = start_run(run_dir, config, peak, start=start, is_main=is_main)
        trace = StepTrace(tcfg.profile_steps, run_dir / "profile", enabled=is_main)
        loop = _Loop(config, state, step_fn, eval_fn, loader, batch_sh, manager, trace, base)
        if stop is not None:
            stop.install()
        logging.getLogger("absl").addFilter(quiet := DiskFullLogFilter())
        try:
            last_loss = run_loop(
                config, start=start, train_step=loop.step, evaluate=loop.evaluate, save=loop.save, logger=logger,
                peak=peak, progress=progress, is_main=is_main, stop=stop,
            )  # fmt: skip
            manager.wait_until_finished()
        except Interrupted as stopped:
            manager.wait_until_finished()
            stopped.saved = run_dir / "checkpoints" / str(stopped.step)
            raise
        except Exception as err:
            full = disk_full_error(err, run_dir / "checkpoints", loop.state)
            if full is None:
                raise
            raise full from None
        finally:
            trace.close()
            if stop is not None:
                exit_on_signal()  # writing final/ is atomic: a signal now just ends the process
            try:
                manager.close()
            finally:
                logger.close()
                logging.getLogger("absl").removeFilter(quiet)
    state = loop.state
    final_params = state["params"] if merged is None else merged(base.params, state["params"])
    check_free_space(run_dir / "final", final_params)
    try:
        extra = carried_files(init, data_dir)
        if lora.enabled(tcfg) and not tcfg.lora_merge:
            final_dir = write_peft_adapter(run_dir / "final", mcfg, tcfg, state["params"], base.path, is_main)
        else:
            final_dir = save_params(run_dir / "final", mcfg, final_params, overwrite=True, extra_files=extra)
    except Exception as err:
        full = disk_full_error(err, run_dir / "final", state["params"])
        if full is None:
            raise
        raise full from None
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
    trace: StepTrace  # train.profile_steps
    base: Base | None = None

    def step(self, step: int) -> Callable[[], StepOutput]:
        """Dispatch one step (asynchronously); its output's reader, which `run_loop` calls a step later."""
        batch = self.loader.to_global(next(self.loader), self.batch_sh)
        frozen = (self.base.params,) if lora.enabled(self.config.train) else ()
        self.trace.begin(step, self.state)
        self.state, metrics = self.step_fn(self.state, batch, *frozen)
        self.trace.end(step, metrics)
        for x in jax.tree.leaves(metrics):
            x.copy_to_host_async()

        def read() -> StepOutput:
            m = jax.device_get(metrics)
            return StepOutput(float(m["loss"]), float(m["grad_norm"]), bool(m["finite"]), False, float(m["lr"]))

        return read

    def evaluate(self) -> float:
        return evaluate(self.config, self.state["params"], self.eval_fn, self.batch_sh)

    def save(self, step: int) -> None:
        self.manager.wait_until_finished()  # the previous save's size is on disk before free space is read
        check_free_space(Path(self.manager.directory) / str(step), self.state)
        lora_run = lora.enabled(self.config.train)  # its checkpoints name the base they were trained on
        base = {"base": ocp.args.JsonSave(self.base.record())} if lora_run else {}
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(self.state), loader=ocp.args.JsonSave(self.loader.get_state()), **base
        )
        self.manager.save(step, args=args)


def _merged_eval(eval_fn: Callable, merged: Callable, base: Any, adapters: Any, batch: Any) -> Any:
    return eval_fn(merged(base, adapters), batch)


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
        doc_mask=config.data.doc_mask,
    )


def evaluate(config: Config, params: Any, eval_fn: Any, batch_sh: jax.sharding.NamedSharding) -> float:
    """Mean loss over the first `train.eval_batches` batches of the validation split, in file order."""
    loader = _val_loader(config, batch_sh)
    return mean_eval_loss(lambda: float(eval_fn(params, loader.to_global(next(loader), batch_sh))),
                          config.train.eval_batches)  # fmt: skip


# Resuming ------------------------------------------------------------------------------------------
def _check_same_state(config: Config, saved_config: Path) -> None:
    """Refuse a resume whose train state would have another structure or shapes than the run's
    (the model's shape fields are checked earlier, by `check_run`; here e.g. train.grad_clip 0 vs > 0)."""
    import yaml

    try:
        saved = Config.model_validate(yaml.safe_load(saved_config.read_text()))
    except Exception:  # no config.yaml, or an older schema: orbax checks the shapes on restore
        return
    if saved.model.scan_layers != config.model.scan_layers:
        was = str(saved.model.scan_layers).lower()
        raise ConfigError(
            f"cannot resume {saved_config.parent}: its checkpoints hold the layers "
            f"{'stacked' if saved.model.scan_layers else 'per layer'} (model.scan_layers={was}); "
            f"resume with model.scan_layers={was}, or use --out for a new run (final/ is per-layer either way)"
        )

    def shapes(c: Config) -> Any:
        tree = jax.eval_shape(lambda: init_state(trainable(c), make_optimizer(c.train)))
        return jax.tree.structure(tree), [(x.shape, x.dtype) for x in jax.tree.leaves(tree)]

    if shapes(saved) != shapes(config):
        diff = []
        for k, v in saved.train.model_dump().items():  # the fields that change the shapes alone
            now = getattr(config.train, k)
            if now != v and shapes(
                saved.model_copy(update={"train": saved.train.model_copy(update={k: now})})
            ) != shapes(saved):
                diff.append(f"train.{k}: run has {v!r}, now {now!r}")
        raise ConfigError(
            f"cannot resume {saved_config.parent}: the train state's shapes changed ({'; '.join(diff)}); "
            "resume with the run's values, or use --out for a new run"
        )


def _restore_newest(
    manager: ocp.CheckpointManager, steps: list[int], target: dict, run_dir: Path, is_main: bool, with_base: bool
) -> tuple[int, Any]:
    """(step, restored) of the newest checkpoint in `steps` (newest first) that restores on every
    process. Newer ones that do not are moved aside to `checkpoints/N.corrupt-TIME` (kept for a
    post-mortem, out of the way of the next save of step N), one warning line each; when none
    restores, nothing is moved and an `InputError` says so."""
    import time

    import numpy as np

    bad: list[tuple[int, str]] = []
    base = {"base": ocp.args.JsonRestore()} if with_base else {}
    args = ocp.args.Composite(state=ocp.args.StandardRestore(target), loader=ocp.args.JsonRestore(), **base)
    absl_logger = logging.getLogger("absl")
    for step in steps:
        # Orbax logs each failure at length, and the reads still pending when one fails end as tracebacks
        # (when they are collected, or when they finish after orbax closed its event loop, in tensorstore's
        # threads at any moment): all are silenced, from before the restore starts; one line is said below.
        level = absl_logger.level
        absl_logger.setLevel(logging.CRITICAL)
        _quiet_abandoned_reads(run_dir / "checkpoints" / str(step))
        try:
            restored, why = manager.restore(step, args=args), ""
        except Exception as err:  # a corrupted checkpoint fails in many ways (tensorstore, JSON, missing files)
            restored, why = None, f"{type(err).__name__}: {_first_line(err)}"
            gc.collect()
        finally:
            absl_logger.setLevel(level)
        ok = restored is not None
        if jax.process_count() > 1:  # a part only one process reads may be the broken one
            ok = bool(np.all(multihost_utils.process_allgather(np.array(ok))))
            why = why or "it does not restore on another process"
        if ok:
            break
        bad.append((step, why))
    else:
        newest, why = bad[0]
        raise InputError(
            f"no checkpoint in {run_dir / 'checkpoints'} restores (steps {', '.join(str(s) for s, _ in bad)}; "
            f"step {newest}: {why})"
        )
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for bad_step, why in bad:
        src = run_dir / "checkpoints" / str(bad_step)
        dst = src.with_name(f"{bad_step}.corrupt-{stamp}")
        if is_main:
            src.rename(dst)
            print(f"warning: checkpoint {src} does not restore ({why}): moved to {dst.name}; "
                  f"resuming from step {step}", flush=True)  # fmt: skip
    if bad:
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices("jaxllm: corrupted checkpoints moved aside")
        manager.reload()
    return step, restored


class AbandonedReadFilter(logging.Filter):
    """Drops asyncio's "… exception was never retrieved" records for orbax's reads of a checkpoint that
    failed to restore: logged, with a traceback, when the futures of the reads that failed after another
    one ended the restore are collected. They are tasks (an array read, `_read_array_index_and_device_put`,
    or a whole array's restore, `async_deserialize`), gathering futures, and tensorstore's own futures;
    each one's exception was raised through orbax's checkpoint code or names the checkpoint's directory
    (tensorstore's errors carry no traceback). Every other asyncio record passes."""

    def __init__(self) -> None:
        super().__init__()
        self.checkpoints: set[str] = set()  # the directories of checkpoints that failed to restore

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exception was never retrieved" not in message.split("\n")[0]:
            return True
        err = record.exc_info[1] if record.exc_info else None
        names_checkpoint = any(c in message or c in str(err) for c in self.checkpoints)
        return not (names_checkpoint or _raised_in_orbax(err))


def _raised_in_orbax(err: BaseException | None) -> bool:
    """Whether `err`'s traceback passes through orbax's checkpoint package."""
    tb = err.__traceback__ if err is not None else None
    while tb is not None:
        if _in_orbax(tb.tb_frame.f_code):
            return True
        tb = tb.tb_next
    return False


def _in_orbax(code: Any) -> bool:
    """Whether a code object (None: no) is orbax's checkpoint package's."""
    return "orbax/checkpoint/" in Path(getattr(code, "co_filename", "")).as_posix()


_ABANDONED_READS = AbandonedReadFilter()


def _quiet_abandoned_reads(checkpoint: Path | None = None) -> None:
    """Drop the reports of orbax's reads abandoned if `checkpoint` fails to restore: "Exception ignored
    in <coroutine …>" when the coroutines are collected, asyncio's "… exception was never retrieved" for
    the reads that failed too (`AbandonedReadFilter`), and "RuntimeError: Event loop is closed"
    tracebacks when a read finishes later and its callback finds orbax's event loop closed (printed
    through `sys.excepthook`). Any other exception is reported as before."""
    if checkpoint is not None:
        _ABANDONED_READS.checkpoints.update({str(checkpoint), str(checkpoint.resolve())})
    hook = sys.unraisablehook
    if getattr(hook, "jaxllm_quiet_reads", False):
        return
    logging.getLogger("asyncio").addFilter(_ABANDONED_READS)
    warnings.filterwarnings(
        "ignore", r"coroutine '(_read_array_index_and_device_put|async_deserialize)' was never awaited", RuntimeWarning
    )

    def unraisablehook(u: Any) -> None:
        code = getattr(u.object, "cr_code", None)
        name = getattr(u.object, "__qualname__", "") or getattr(code, "co_name", "")
        abandoned = inspect.iscoroutine(u.object) and ("read_array" in name or _in_orbax(code))
        if not abandoned and not _closed_loop_error(u.exc_value):
            hook(u)

    excepthook = sys.excepthook

    def quiet_excepthook(kind: type[BaseException], value: BaseException, tb: Any) -> None:
        if not _closed_loop_error(value, tb):
            excepthook(kind, value, tb)

    unraisablehook.jaxllm_quiet_reads = True
    sys.unraisablehook = unraisablehook
    sys.excepthook = quiet_excepthook


def _closed_loop_error(err: BaseException | None, tb: Any = None) -> bool:
    """asyncio's "Event loop is closed", raised inside asyncio itself (a late callback), nowhere else."""
    if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
        return False
    tb = tb or err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and Path(tb.tb_frame.f_code.co_filename).parent.name == "asyncio"


def _first_line(err: BaseException) -> str:
    line = (str(err).strip().splitlines() or [""])[0]
    return line.split(" See full TensorStore details")[0][:200]


# Disk full ---------------------------------------------------------------------------------------
def check_free_space(path: Path, tree: Any) -> None:
    """Refuse to start writing `tree` to `path` when the disk has less free space than its arrays' bytes
    (checkpoints are not compressed much: that is a slight overestimate)."""
    need = _nbytes(tree)
    free = _free_bytes(path)
    if free < need:
        raise InputError(_disk_full_message(path, need, free, partial=False))


def disk_full_error(err: BaseException, path: Path, tree: Any) -> InputError | None:
    """An `InputError` naming `path` and the space needed when `err` (or its cause) is a full disk."""
    import errno

    seen, e = set(), err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "No space left on device" in str(e):
            break
        e = e.__cause__ or e.__context__
    else:
        return None
    return InputError(_disk_full_message(path, _nbytes(tree), _free_bytes(path), partial=True))


def _nbytes(tree: Any) -> int:
    return sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(tree))


def _free_bytes(path: Path) -> int:
    import shutil

    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _disk_full_message(path: Path, need: int, free: int, *, partial: bool) -> str:
    what = "a partial checkpoint stays under its temporary name" if partial else "nothing was written"
    return (
        f"disk full: writing {path} needs about {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free "
        f"({what}; the run's earlier checkpoints are intact: free some space, then --resume)"
    )


class DiskFullLogFilter(logging.Filter):
    """Drops orbax's background-thread error logs (hundreds of lines) once the disk is full: the
    command line says it in one line."""

    full = False

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info else "")
        if "No space left on device" in text:
            self.full = True
        return not (self.full and record.levelno >= logging.ERROR)
