"""The training loop reads each step's output one step late: no host sync per step, same rows written."""

import math

import jax
import numpy as np
import pytest

from jaxllm.config import Config
from jaxllm.loop import StepOutput, TrainingError, run_loop
from jaxllm.metrics import MetricsLogger, read_metrics

TINY = ["model.vocab_size=257", "model.n_layers=2", "train.batch_size=8", "train.warmup_steps=2"]


def fake_loop(tmp_path, events: list, losses: dict[int, float], *overrides: str) -> list[dict]:
    """run_loop over asynchronous fake steps, recording dispatch / read / save into `events`; the rows."""
    cfg = Config.load("mini", [*TINY, "train.eval_every=0", *overrides])

    def step(n: int):
        events.append(("dispatch", n))

        def read() -> StepOutput:
            events.append(("read", n))
            loss = losses.get(n, 1.0 / n)
            return StepOutput(loss, 0.5, math.isfinite(loss), False, 1e-3)

        return read

    logger = MetricsLogger(tmp_path, enabled=True)
    try:
        run_loop(
            cfg, start=0, train_step=step, evaluate=lambda: 0.0, save=lambda n: events.append(("save", n)),
            logger=logger, peak=(1e12, "test"), progress=False, is_main=True,
        )  # fmt: skip
    finally:
        logger.close()
    return read_metrics(tmp_path / "metrics.jsonl")


def test_a_step_is_read_after_the_next_is_dispatched_and_before_each_checkpoint(tmp_path):
    events: list = []
    rows = fake_loop(tmp_path, events, {}, "train.steps=7", "train.log_every=1", "train.checkpoint_every=3")
    assert events == [
        ("dispatch", 1), ("dispatch", 2), ("read", 1), ("dispatch", 3), ("read", 2), ("read", 3), ("save", 3),
        ("dispatch", 4), ("dispatch", 5), ("read", 4), ("dispatch", 6), ("read", 5), ("read", 6), ("save", 6),
        ("dispatch", 7), ("read", 7), ("save", 7),
    ]  # fmt: skip
    assert [(r["step"], r["loss"]) for r in rows] == [(n, 1.0 / n) for n in range(1, 8)]


def test_a_non_finite_step_read_late_stops_before_any_later_save(tmp_path):
    events: list = []
    with pytest.raises(TrainingError, match=r"at step 5 .*not applied"):
        fake_loop(tmp_path, events, {5: math.nan}, "train.steps=9", "train.log_every=1", "train.checkpoint_every=3")
    # Step 6 was dispatched before step 5 was read, and is never saved: the run stops one step late.
    assert events[-2:] == [("dispatch", 6), ("read", 5)]
    assert [e for e in events if e[0] == "save"] == [("save", 3)]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_logged_losses_equal_the_step_functions_own(byte_dataset, tmp_path):
    """The loop's rows (read one step late, some steps read early for checkpoints and evaluation) hold
    exactly the losses of calling the jitted step function directly, one step at a time."""
    from jaxllm.data.loader import make_loader
    from jaxllm.model import init_params
    from jaxllm.optim import make_optimizer
    from jaxllm.sharding import make_mesh
    from jaxllm.train import sharded_train_step, train
    from jaxllm.train_step import init_state

    overrides = [*TINY, f"data.path={byte_dataset}", "train.steps=7", "train.log_every=1",
                 "train.checkpoint_every=3", "train.eval_every=4", "train.eval_batches=1", "mesh.data=1"]  # fmt: skip
    cfg = Config.load("mini", overrides)
    devices = jax.devices()[:1]
    train(cfg, tmp_path / "run", devices=devices, progress=False)
    logged = [(r["step"], r["loss"], r["grad_norm"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")
              if "loss" in r]  # fmt: skip

    mcfg, tcfg = cfg.model, cfg.train
    mesh = make_mesh(cfg.mesh, devices)
    optimizer = make_optimizer(tcfg)
    step_fn, state_sh, batch_sh = sharded_train_step(cfg, mesh, optimizer)
    state = jax.jit(lambda: init_state(init_params(mcfg, tcfg.seed), optimizer), out_shardings=state_sh)()
    loader = make_loader(byte_dataset, "train", mcfg.context_length, tcfg.batch_size, tcfg.seed, sharding=batch_sh)
    direct = []
    for n in range(1, 8):
        state, metrics = step_fn(state, loader.to_global(next(loader), batch_sh))
        direct.append((n, float(metrics["loss"]), float(metrics["grad_norm"])))  # synchronous: read at once
    assert [s for s, _, _ in logged] == list(range(1, 8))
    np.testing.assert_array_equal(np.array(logged), np.array(direct))
