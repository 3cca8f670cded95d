"""Training as real processes: SIGKILL then --resume is bit-identical; 2 hosts (gloo) equal 1 host."""

import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from jaxllm import load_params
from jaxllm.metrics import read_metrics

TINY = [
    "model.vocab_size=257",
    "model.n_layers=1",
    "train.batch_size=8",
    "train.warmup_steps=2",
    "train.log_every=1",
    "train.eval_every=0",
]


def jaxllm_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "jaxllm.cli", *args]


def env(devices: int) -> dict[str, str]:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def run(cmd: list[str], devices: int = 8, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, env=env(devices), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def assert_same_params(a_dir, b_dir, exact: bool):
    _, a = load_params(a_dir)
    _, b = load_params(b_dir)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            # Adam moves a parameter by up to lr per step whatever the size of its gradient, so a
            # coordinate whose gradient is rounding noise (a bias still near 0) may move differently
            # in the two runs: the bound is 1% of the summed learning rate of the 8 steps (~2e-3).
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=2e-5)


def test_killed_run_resumes_to_identical_losses_and_params(byte_dataset, tmp_path):
    args = [
        "train",
        "--config",
        "mini",
        "--data",
        str(byte_dataset),
        "--no-progress",
        *TINY,
        "train.steps=150",
        "train.checkpoint_every=20",
    ]
    run(jaxllm_cmd(*args, "--out", str(tmp_path / "full")), devices=2)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        jaxllm_cmd(*args, "--out", str(killed)), env=env(2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline:
            if (killed / "metrics.jsonl").exists() and max(losses(killed), default=0) >= 50:
                break
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        else:
            pytest.fail("the run did not reach step 50 in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "final").exists()
    logged_before_kill = max(losses(killed))
    assert logged_before_kill < 150

    run(jaxllm_cmd(*args, "--out", str(killed), "--resume"), devices=2)
    full, resumed = losses(tmp_path / "full"), losses(killed)
    assert sorted(resumed) == list(range(1, 151))
    assert [resumed[s] for s in range(1, 151)] == [full[s] for s in range(1, 151)]  # bit-identical
    assert_same_params(tmp_path / "full" / "final", killed / "final", exact=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_give_the_same_losses_as_one(byte_dataset, tmp_path):
    args = [
        "train",
        "--config",
        "mini",
        "--data",
        str(byte_dataset),
        "--no-progress",
        *TINY,
        "train.steps=8",
        "train.checkpoint_every=4",
        "mesh.data=2",
        "mesh.fsdp=2",
        "mesh.tensor=2",
    ]
    port = free_port()
    multi = tmp_path / "multi"
    procs = [
        subprocess.Popen(
            jaxllm_cmd(
                *args,
                "--out",
                str(multi),
                "--coordinator",
                f"127.0.0.1:{port}",
                "--num-processes",
                "2",
                "--process-id",
                str(i),
            ),
            env=env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    run(jaxllm_cmd(*args, "--out", str(tmp_path / "single")))

    one, two = losses(tmp_path / "single"), losses(multi)
    assert sorted(two) == list(range(1, 9))
    np.testing.assert_allclose([two[s] for s in one], [one[s] for s in one], rtol=1e-5, atol=0)
    assert_same_params(tmp_path / "single" / "final", multi / "final", exact=False)
    assert sorted(p.name for p in (multi / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]
