"""`jaxllm train` at its edges, as real processes: corrupted checkpoints, changed shapes on resume,
signals at any moment, a full disk, resumes that make no sense."""

import os
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from test_train_processes import assert_same_params, env, free_port, jaxllm_cmd, losses

TINY = [
    "model.vocab_size=257",
    "model.n_layers=1",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=0",
]


def train_cmd(data, out, *overrides: str, resume: bool = False) -> list[str]:
    flags = ["--config", "mini", "--data", str(data), "--out", str(out), "--no-progress"]
    return jaxllm_cmd("train", *flags, *(["--resume"] if resume else []), *TINY, *overrides)


def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env(2), capture_output=True, text=True, timeout=timeout)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def steps_in(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def base_run(byte_dataset, tmp_path_factory):
    """30 steps, checkpoints 10, 20, 30: copy it before changing it."""
    run_dir = tmp_path_factory.mktemp("base") / "run"
    out = run(train_cmd(byte_dataset, run_dir, "train.steps=30", "train.checkpoint_every=10"))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def copy_run(base: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(base, dst)
    return dst


# 1. Corrupted checkpoints -------------------------------------------------------------------------
def _array_file(ckpt: Path) -> Path:
    files = sorted((ckpt / "state" / "ocdbt.process_0" / "d").iterdir(), key=lambda p: p.stat().st_size)
    return files[-1]


CORRUPTIONS = {
    "truncated array file": lambda c: os.truncate(_array_file(c), 100),
    "emptied _METADATA": lambda c: (c / "state" / "_METADATA").write_text(""),
    "truncated loader/metadata": lambda c: os.truncate(c / "loader" / "metadata", 10),
    "deleted ocdbt.process_0": lambda c: shutil.rmtree(c / "state" / "ocdbt.process_0"),
}


def test_abandoned_orbax_reads_are_not_logged_but_other_task_errors_are(caplog):
    # When one read of a corrupted checkpoint fails, orbax's other failed reads end as futures whose
    # exception nobody retrieved: asyncio logs each with a traceback when it is collected (seen in the
    # fallback test above). They are tasks (one array read, one array's restore), gathering futures and
    # tensorstore's futures, whose errors carry no traceback but name the checkpoint. All are dropped; any
    # other future's error still reaches the log.
    import asyncio
    import gc
    import logging

    from jaxllm.train import AbandonedReadFilter

    # One array read and one array's restore: coroutines defined in orbax's serialization module.
    orbax = {}
    source = (
        "async def _read_array_index_and_device_put():\n    raise ValueError('abandoned read')\n"
        "async def async_deserialize():\n    raise ValueError('abandoned restore')\n"
    )
    exec(compile(source, "/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"), orbax)

    async def other_work():
        raise ValueError("another task's error")

    logger, quiet = logging.getLogger("asyncio"), AbandonedReadFilter()
    quiet.checkpoints.add("/runs/a/checkpoints/30")
    logger.addFilter(quiet)
    try:
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            loop = asyncio.new_event_loop()
            coros = [orbax["_read_array_index_and_device_put"](), orbax["async_deserialize"](), other_work()]
            futures = [loop.create_task(coro) for coro in coros]
            futures.append(asyncio.gather(loop.create_task(orbax["async_deserialize"]())))  # a gathering future
            for text in ["OUT_OF_RANGE: Error reading in '/runs/a/checkpoints/30/state/'", "another future's error"]:
                futures.append(loop.create_future())  # as tensorstore's futures end: an error with no traceback
                futures[-1].set_exception(ValueError(text))
            loop.run_until_complete(asyncio.sleep(0.01))
            loop.close()
            del futures, coros
            gc.collect()
    finally:
        logger.removeFilter(quiet)
    assert "another task's error" in caplog.text and "another future's error" in caplog.text
    assert "abandoned read" not in caplog.text and "_read_array_index_and_device_put" not in caplog.text
    assert "abandoned restore" not in caplog.text and "async_deserialize" not in caplog.text
    assert "/runs/a/checkpoints/30" not in caplog.text


@pytest.mark.parametrize("kind", list(CORRUPTIONS))
def test_resume_falls_back_past_a_corrupted_newest_checkpoint(byte_dataset, base_run, tmp_path, kind):
    run_dir = copy_run(base_run, tmp_path)
    shutil.rmtree(run_dir / "final")  # resume the same 30 steps: 21-30 again, from checkpoint 20
    CORRUPTIONS[kind](run_dir / "checkpoints" / "30")
    out = run(train_cmd(byte_dataset, run_dir, "train.steps=30", "train.checkpoint_every=10", resume=True))
    assert out.returncode == 0, out.stderr[-3000:]
    # An implausible-MFU warning says only that the CPU peak was measured while other tests loaded the cores.
    warnings = [line for line in lines(out.stdout + out.stderr) if "warning" in line and "warning: MFU" not in line]
    assert len(warnings) == 1 and f"checkpoint {run_dir}/checkpoints/30 does not restore" in warnings[0], warnings
    assert "resuming from step 20" in warnings[0]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    moved = [name for name in steps_in(run_dir) if name.startswith("30.corrupt-")]
    assert len(moved) == 1 and moved[0] in warnings[0]  # moved aside, not deleted…
    assert "30" in steps_in(run_dir)  # …so that step 30 could be saved again
    a, b = losses(base_run), losses(run_dir)
    assert [b[s] for s in range(1, 31)] == [a[s] for s in range(1, 31)]  # bit-identical from checkpoint 20
    assert_same_params(base_run / "final", run_dir / "final", exact=True)


def test_resume_with_no_checkpoint_that_restores_is_one_error(byte_dataset, base_run, tmp_path):
    run_dir = copy_run(base_run, tmp_path)
    for step in ("10", "20", "30"):
        (run_dir / "checkpoints" / step / "state" / "_METADATA").write_text("")
    out = run(train_cmd(byte_dataset, run_dir, "train.steps=40", "train.checkpoint_every=10", resume=True))
    assert out.returncode == 2
    assert lines(out.stderr) == [
        f"error: no checkpoint in {run_dir}/checkpoints restores (steps 30, 20, 10; "
        "step 30: JSONDecodeError: Expecting value: line 1 column 1 (char 0))"
    ]
    assert steps_in(run_dir) == ["10", "20", "30"]  # nothing moved


# 2 and 6. Resumes that are refused, and the one that starts fresh ---------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["model.d_model=64"], "the model's shapes changed (model.d_model: run has 128, now 64)"),
        (["model.n_heads=2", "model.d_ff=128"], "(model.n_heads: run has 4, now 2; model.d_ff: run has 256, now 128)"),
        (["train.grad_clip=0"], "the train state's shapes changed (train.grad_clip: run has 1.0, now 0.0)"),
        (["train.steps=20"], "is at step 30, past train.steps=20: nothing to train"),
        (["train.steps=30"], "is at step 30, already finished at train.steps=30: nothing to train"),
    ],
)
def test_resume_is_refused_in_one_line_without_rewriting_the_run(byte_dataset, base_run, tmp_path, overrides, message):
    run_dir = copy_run(base_run, tmp_path)
    before = (run_dir / "config.yaml").read_bytes(), (run_dir / "metrics.jsonl").read_bytes(), steps_in(run_dir)
    out = run(train_cmd(byte_dataset, run_dir, "train.checkpoint_every=10", *overrides, resume=True))
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = lines(out.stderr)
    assert line.startswith(f"error: cannot resume {run_dir}: " if "run has" in message else f"error: {run_dir} ")
    assert message in line
    after = (run_dir / "config.yaml").read_bytes(), (run_dir / "metrics.jsonl").read_bytes(), steps_in(run_dir)
    assert after == before


def test_resume_without_a_checkpoint_starts_fresh_but_not_over_final_params(byte_dataset, tmp_path):
    run_dir = tmp_path / "run"
    out = run(train_cmd(byte_dataset, run_dir, "train.steps=2", "train.checkpoint_every=0", resume=True))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"no checkpoint in {run_dir}: starting fresh" in lines(out.stdout)
    assert (run_dir / "final").is_dir()
    again = run(train_cmd(byte_dataset, run_dir, "train.steps=4", "train.checkpoint_every=0", resume=True))
    assert again.returncode == 2
    assert lines(again.stderr) == [
        f"error: {run_dir} holds finished params in final/ but no checkpoint to resume from: use --out for a new "
        "run (or train.checkpoint_every > 0 to make runs resumable)"
    ]


# 3 and 4. Signals -----------------------------------------------------------------------------------
@pytest.mark.parametrize("delay", [0.5, 2.0, 4.0])
def test_sigint_during_start_up_exits_130_cleanly(byte_dataset, tmp_path, delay):
    """Imports, set-up and the first compilation take several seconds; a SIGINT there used to segfault."""
    proc = subprocess.Popen(
        train_cmd(byte_dataset, tmp_path / "run", "train.steps=1000"), env=env(2),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (proc.returncode, err[-3000:])
    assert "Segmentation fault" not in err and "Traceback" not in err, err[-3000:]
    assert len(lines(err)) == 1 and lines(err)[0].startswith("interrupted by SIGINT"), err


ARGS_150 = ["train.steps=150", "train.checkpoint_every=100"]


@pytest.fixture(scope="module")
def uninterrupted(byte_dataset, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("full") / "run"
    out = run(train_cmd(byte_dataset, run_dir, *ARGS_150))
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_during_training_checkpoints_the_last_step_and_resumes_identically(
    byte_dataset, uninterrupted, tmp_path, sig, status
):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(byte_dataset, run_dir, *ARGS_150), env=env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 240
    while max(losses(run_dir), default=0) < 30 if (run_dir / "metrics.jsonl").exists() else True:
        assert proc.poll() is None and time.monotonic() < deadline, "the run ended or stalled before step 30"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == status, err[-3000:]
    saved = [name for name in steps_in(run_dir) if name.isdigit()]
    assert len(saved) == 1 and 30 <= int(saved[0]) < 100  # between two regular checkpoints
    step = int(saved[0])
    assert lines(err) == [
        f"interrupted by {sig.name}: checkpoint of step {step} saved in {run_dir}/checkpoints/{step}; "
        "continue with --resume"
    ]
    assert max(losses(run_dir)) == step  # the last completed step is the one saved

    resumed = run(train_cmd(byte_dataset, run_dir, *ARGS_150, resume=True))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    full, mine = losses(uninterrupted), losses(run_dir)
    assert sorted(mine) == list(range(1, 151))
    assert [mine[s] for s in range(1, 151)] == [full[s] for s in range(1, 151)]  # bit-identical
    assert_same_params(uninterrupted / "final", run_dir / "final", exact=True)


# 5. Disk full ------------------------------------------------------------------------------------
@pytest.fixture
def small_tmpfs(tmp_path):
    """A 3 MiB tmpfs: room for one checkpoint of the tiny model (2.1 MB), not two."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_disk_while_checkpointing_is_one_error_line(byte_dataset, small_tmpfs):
    run_dir = small_tmpfs / "run"
    out = run(train_cmd(byte_dataset, run_dir, "train.steps=20", "train.checkpoint_every=10"))
    assert out.returncode == 2, out.stderr[-3000:]
    [line] = lines(out.stderr)
    assert line.startswith(f"error: disk full: writing {run_dir}/checkpoints/20 needs about 2.4 MiB, ")
    assert "MiB are free" in line
    assert steps_in(run_dir) == ["10"]  # the earlier checkpoint is intact


def test_a_full_disk_found_by_the_writer_names_the_path_and_the_space(tmp_path):
    """The writer's own error (when the estimate before writing was too low), as orbax raises it."""
    import numpy as np

    from jaxllm.errors import InputError
    from jaxllm.train import disk_full_error

    try:
        try:
            raise ValueError("RESOURCE_EXHAUSTED: Failed to write 684052 bytes: No space left on device [28]")
        except ValueError as inner:
            raise RuntimeError("Save Finalize thread (save_finalize) failed") from inner
    except RuntimeError as err:
        full = disk_full_error(err, tmp_path / "checkpoints", {"w": np.zeros((1024, 256), np.float32)})
    assert isinstance(full, InputError)
    assert str(full).startswith(f"disk full: writing {tmp_path}/checkpoints needs about 1.0 MiB, ")
    assert "a partial checkpoint stays under its temporary name" in str(full)
    assert disk_full_error(ValueError("other"), tmp_path, {}) is None


def test_two_processes_stop_at_the_same_step_on_a_signal_to_one(byte_dataset, tmp_path):
    """A SIGINT to process 0 becomes JAX's preemption notice: both processes checkpoint the same step
    (130 where the signal arrived, 143 on the other), and the resumed run equals an uninterrupted one."""
    args = ["train.steps=60", "train.checkpoint_every=100"]

    def start(out: Path, resume: bool = False) -> list[subprocess.Popen]:
        port = free_port()
        return [
            subprocess.Popen(
                [
                    *train_cmd(byte_dataset, out, *args, resume=resume),
                    "--coordinator",
                    f"127.0.0.1:{port}",
                    "--num-processes",
                    "2",
                    "--process-id",
                    str(i),
                ],
                env=env(2),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for i in range(2)
        ]

    def succeed(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            _, err = p.communicate(timeout=240)
            assert p.returncode == 0, err[-3000:]

    full, run_dir = tmp_path / "full", tmp_path / "run"
    succeed(start(full))
    procs = start(run_dir)
    deadline = time.monotonic() + 240
    while max(losses(run_dir), default=0) < 10 if (run_dir / "metrics.jsonl").exists() else True:
        assert all(p.poll() is None for p in procs) and time.monotonic() < deadline, "ended or stalled early"
        time.sleep(0.05)
    procs[0].send_signal(signal.SIGINT)
    errs = [p.communicate(timeout=240)[1] for p in procs]
    assert [p.returncode for p in procs] == [130, 143], [e[-2000:] for e in errs]
    [step] = [int(name) for name in steps_in(run_dir) if name.isdigit()]
    assert 10 <= step < 60
    for err, name in zip(errs, ("SIGINT", "SIGTERM"), strict=True):
        assert lines(err)[-1] == (
            f"interrupted by {name}: checkpoint of step {step} saved in {run_dir}/checkpoints/{step}; "
            "continue with --resume"
        )

    succeed(start(run_dir, resume=True))
    a, b = losses(full), losses(run_dir)
    assert sorted(b) == list(range(1, 61))
    assert [b[s] for s in range(1, 61)] == [a[s] for s in range(1, 61)]  # bit-identical
    assert_same_params(full / "final", run_dir / "final", exact=True)


def test_late_reads_of_an_abandoned_restore_are_quiet_and_other_errors_are_not(monkeypatch):
    """A read that ends after orbax closed its event loop raises asyncio's "Event loop is closed" in a
    callback, printed through sys.excepthook: dropped. The same message raised elsewhere, or any other
    error, still reaches the hooks that were in place."""
    import asyncio
    import sys

    from jaxllm import train

    seen, unraisable = [], []
    monkeypatch.setattr(sys, "excepthook", lambda kind, value, tb: seen.append(value))
    monkeypatch.setattr(sys, "unraisablehook", lambda u: unraisable.append(u.exc_value))
    train._quiet_abandoned_reads()

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as err:
        late = err
    try:
        raise RuntimeError("Event loop is closed")  # not raised inside asyncio
    except RuntimeError as err:
        ours = err
    other = ValueError("boom")
    for err in (late, ours, other):
        sys.excepthook(type(err), err, err.__traceback__)
        sys.unraisablehook(type("U", (), {"object": None, "exc_value": err})())
    assert seen == [ours, other]
    assert unraisable == [ours, other]
