"""The launch recipes of docs/launch.md, each run as its own command line on CPU with simulated devices.

- one GPU: `jaxllm train --config configs/advanced.yaml` on 1 device;
- several GPUs on one host: the same with `mesh.fsdp=-1 mesh.tensor=2`, on 8 devices;
- several hosts: 2 processes x 4 devices, joined by flags, by `JAX_*` variables, or by the variables
  `srun` sets (JAX's own SLURM detection);
- DeepSpeed on several hosts: the `deepspeed` launcher with a hostfile. The launcher reaches the hosts
  with pdsh over ssh, which these machines lack: the launcher runs for real with only pdsh's start-up
  faked, and the command it hands pdsh is then run once per host, as pdsh would run it, here.

Every recipe trains the advanced (Llama-style) config shrunk by TINY, on the same data; the sharded,
multi-process and DeepSpeed runs must give the losses of the one-device run.
"""

import base64
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import orbax.checkpoint as ocp
import pytest

from jaxllm.config import Config
from jaxllm.metrics import read_metrics

from parity_helpers import LOSS_RTOL, export_init, made_once

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the console scripts `jaxllm` and `deepspeed` of this environment
RECIPE = ["train", "--config", "configs/advanced.yaml"]
STEPS = 4
TINY = ["model.vocab_size=257", "model.context_length=64", "model.d_model=64", "model.n_layers=2", "model.n_heads=4",
        "model.n_kv_heads=2", "model.d_ff=128", f"train.steps={STEPS}", "train.batch_size=8", "train.warmup_steps=2",
        "train.log_every=1", "train.eval_every=0", f"train.checkpoint_every={STEPS}"]  # fmt: skip
MESH = ["mesh.fsdp=-1", "mesh.tensor=2"]
# Sharded runs add the same numbers in another order: measured <= 3e-7 relative over these steps.
JAX_RTOL = 1e-5
LAUNCH_VARS = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "JAX_COORDINATOR_PORT")


def env(devices: int, **extra: str) -> dict[str, str]:
    """This environment without any launcher's variables (the tests may themselves run under SLURM),
    with `devices` simulated CPU devices, plus `extra`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in LAUNCH_VARS}
    return {**clean, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu",
            "PYTHONWARNINGS": "ignore", **extra}  # fmt: skip


def jaxllm(*args: str) -> list[str]:
    return [str(BIN / "jaxllm"), *args]


def run_all(cmds: list[list[str]], envs: list[dict[str, str]], logs: Path, timeout: float = 300) -> list[str]:
    """Start every command at once (as the hosts of one job would) and wait for all; their stdouts
    (command i writes LOGS/i.out and LOGS/i.err). One that fails stops the others, which would
    otherwise wait for it until the timeout."""
    logs.mkdir(parents=True, exist_ok=True)
    with ExitStack() as files:
        procs = [
            subprocess.Popen(cmd, cwd=REPO, env=e, stdout=files.enter_context(open(logs / f"{i}.out", "w")),
                             stderr=files.enter_context(open(logs / f"{i}.err", "w")))
            for i, (cmd, e) in enumerate(zip(cmds, envs, strict=True))
        ]  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while any(p.poll() is None for p in procs) and not any(p.returncode for p in procs):
                assert time.monotonic() < deadline, f"still running after {timeout} s"
                time.sleep(0.2)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
    for i, p in enumerate(procs):
        out, err = (logs / f"{i}.out").read_text(), (logs / f"{i}.err").read_text()
        assert p.returncode == 0, f"{' '.join(p.args)}\nexit {p.returncode}\n{out[-2000:]}\n{err[-4000:]}"
    return [(logs / f"{i}.out").read_text() for i in range(len(cmds))]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r}


def checkpoint_layout(run_dir: Path) -> tuple[dict[str, int], tuple]:
    """(mesh axis sizes, partition spec of the first MLP's gate kernel), as the run's last orbax
    checkpoint recorded them."""
    meta = ocp.StandardCheckpointer().metadata(run_dir / "checkpoints" / str(STEPS) / "state").item_metadata
    sharding = meta["params"]["blocks_0"]["mlp"]["gate"]["kernel"].sharding
    mesh = dict(zip(sharding.axis_names, (int(n) for n in sharding.shape), strict=True))
    return mesh, tuple(sharding.partition_spec)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_device(byte_dataset, tmp_path_factory) -> Path:
    """The one-GPU recipe's run (1 simulated device), made once per session: every other recipe's
    losses are compared with it."""

    def make(out: Path) -> None:
        run_all([jaxllm(*RECIPE, "--data", str(byte_dataset), "--out", str(out / "run"), "--no-progress", *TINY)],
                [env(devices=1)], out / "logs")  # fmt: skip

    return made_once(tmp_path_factory, "launch_one_device", make) / "run"


def assert_same_losses_as_one_device(run_dir: Path, one_device: Path, rtol: float = JAX_RTOL) -> None:
    got, want = losses(run_dir), losses(one_device)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in want], [want[s] for s in want], rtol=rtol, atol=0)


def test_one_gpu_recipe_trains_the_advanced_config_on_one_device(one_device):
    first, last = losses(one_device)[1], losses(one_device)[STEPS]
    assert first > 5.0 and last < first  # ln(257) = 5.55 at init, then it learns
    assert checkpoint_layout(one_device) == ({"data": 1, "fsdp": 1, "tensor": 1}, (None, None))
    config = Config.load(one_device / "config.yaml")
    assert config.model.family == "llama" and config.mesh.strategy == "fsdp"  # advanced.yaml, only shrunk
    assert {p.name for p in (one_device / "final").iterdir()} >= {"config.yaml", "params", "tokenizer.json"}


def test_several_gpus_recipe_shards_over_fsdp_and_tensor_with_the_same_losses(byte_dataset, one_device, tmp_path):
    out = tmp_path / "run"
    run_all([jaxllm(*RECIPE, "--data", str(byte_dataset), "--out", str(out), "--no-progress", *TINY, *MESH)],
            [env(devices=8)], tmp_path / "logs")  # fmt: skip
    assert checkpoint_layout(out) == ({"data": 1, "fsdp": 4, "tensor": 2}, ("fsdp", "tensor"))
    assert_same_losses_as_one_device(out, one_device)


def slurm_job_id_with_a_free_port() -> int:
    """A job id whose coordinator port (JAX: 61440 + id % 4096) is free here."""
    for job_id in range(1000, 1000 + 4096, 97):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 61440 + job_id % 4096))
            except OSError:
                continue
            return job_id
    raise AssertionError("no free port in 61440-65535")


def host_launch(form: str, host: int, port: int, job_id: int) -> tuple[list[str], dict[str, str]]:
    """(extra arguments, extra environment) of `host` (0 or 1) in a 2-host job started by `form`."""
    if form == "flags":
        return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(host)], {}
    if form == "env":
        return [], {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
                    "JAX_PROCESS_ID": str(host)}  # fmt: skip
    # What `srun` sets for task `host` of a 2-task step whose first node is this machine.
    return [], {"SLURM_JOB_ID": str(job_id), "SLURM_STEP_NODELIST": "localhost", "SLURM_STEP_NUM_NODES": "1",
                "SLURM_NTASKS": "2", "SLURM_PROCID": str(host), "SLURM_LOCALID": str(host)}  # fmt: skip


@pytest.mark.parametrize("form", ["flags", "env", "slurm"])
def test_several_hosts_recipe_joins_two_processes_into_one_run(form, byte_dataset, one_device, tmp_path):
    out = tmp_path / "run"
    port, job_id = free_port(), slurm_job_id_with_a_free_port()
    launches = [host_launch(form, host, port, job_id) for host in (0, 1)]
    cmd = [*RECIPE, "--data", str(byte_dataset), "--out", str(out), "--no-progress", *TINY, *MESH]
    stdouts = run_all([jaxllm(*cmd, *args) for args, _ in launches],
                      [env(devices=4, **extra) for _, extra in launches], tmp_path / "logs")  # fmt: skip
    assert all(f"trained steps 1-{STEPS}" in s for s in stdouts)
    # Each process has 4 devices: a mesh of 8 exists only if the two processes joined.
    assert checkpoint_layout(out) == ({"data": 1, "fsdp": 4, "tensor": 2}, ("fsdp", "tensor"))
    assert_same_losses_as_one_device(out, one_device)


# DeepSpeed ------------------------------------------------------------------------------------------

HOSTS = ["node-a", "node-b"]
requires_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install '.[deepspeed]')"
)


def deepspeed_recipe(hostfile: Path, *launcher_args: str, script_args: list[str]) -> list[str]:
    """`deepspeed` launcher arguments: the hostfile recipe of docs/launch.md."""
    return ["--hostfile", str(hostfile), *launcher_args, "torch_ref/train_deepspeed.py", *script_args]


class Launched:
    """What the launcher started: records the commands instead of running them."""

    def __init__(self):
        self.commands: list[list[str]] = []

    def popen(self, cmd, **_):
        self.commands.append(list(cmd))
        return self

    def check_call(self, cmd, **_):
        self.commands.append(list(cmd))
        return 0

    returncode = 0

    def wait(self):
        return 0


def run_launcher(argv: list[str], monkeypatch) -> list[list[str]]:
    """`deepspeed ARGV` in this process with pdsh and ssh faked: the commands it would have started."""
    from deepspeed.launcher import runner

    launched = Launched()
    monkeypatch.chdir(REPO)
    # Only the launcher's own references are replaced: `subprocess` stays real for everyone else.
    fake_subprocess = {**vars(subprocess), "Popen": launched.popen, "check_call": launched.check_call}
    monkeypatch.setattr(runner, "subprocess", SimpleNamespace(**fake_subprocess))
    # pdsh's kill handlers, which are not for pytest's process
    monkeypatch.setattr(runner, "signal", SimpleNamespace(**{**vars(signal), "signal": lambda *_: None}))
    monkeypatch.setattr(runner.PDSHRunner, "backend_exists", lambda self: True)
    runner.main(argv)
    return launched.commands


def world_info(cmd: list[str]) -> dict[str, list[int]]:
    (arg,) = [a for a in cmd if a.startswith("--world_info=")]
    return json.loads(base64.urlsafe_b64decode(arg.split("=", 1)[1]))


@requires_deepspeed
@pytest.mark.slow
def test_deepspeed_hostfile_recipe_trains_one_run_on_both_hosts(byte_dataset, one_device, tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=1\n" for h in HOSTS))
    out = tmp_path / "run"
    cfg = Config.load(REPO / "configs" / "advanced.yaml", [*TINY, f"data.path={byte_dataset}"])
    init = export_init(cfg, tmp_path)  # jaxllm's initial weights, so that the losses compare
    script_args = ["--config", "configs/advanced.yaml", "--data", str(byte_dataset), "--out", str(out),
                   "--deepspeed", "zero3", "--init", str(init), "--no-progress", *TINY]  # fmt: skip
    port = str(free_port())
    argv = deepspeed_recipe(hostfile, "--master_addr", "127.0.0.1", "--master_port", port, script_args=script_args)

    ssh_check, pdsh = run_launcher(argv, monkeypatch)
    assert ssh_check[0] == "ssh" and ssh_check[-2:] == ["node-a", "hostname"]  # it checks passwordless ssh first
    assert pdsh[:2] == ["pdsh", "-S"] and pdsh[pdsh.index("-w") + 1] == ",".join(HOSTS)
    on_each_host = pdsh[pdsh.index("-w") + 2 :]
    assert world_info(on_each_host) == {h: [0] for h in HOSTS}
    assert "--node_rank=%n" in on_each_host and "--master_addr=127.0.0.1" in on_each_host
    assert on_each_host[-len(script_args) - 1 :] == ["torch_ref/train_deepspeed.py", *script_args]

    # pdsh joins the words into one shell command and runs it on every host, %n being the host's rank.
    shell = " ".join(on_each_host)
    run_all([["bash", "-c", shell.replace("%n", str(rank))] for rank in (0, 1)], [env(devices=1)] * 2,
            tmp_path / "logs", timeout=600)  # fmt: skip
    # ZeRO-3 partitions of both ranks, one per host, in the shared checkpoint.
    assert sorted(p.name for p in (out / "checkpoints" / str(STEPS)).glob("zero_pp_rank_*_optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    ]
    # torch against jax, from the same weights: parity_helpers' bound (measured 1.7e-7 here)
    assert_same_losses_as_one_device(out, one_device, rtol=LOSS_RTOL)


@requires_deepspeed
def test_deepspeed_hostfile_recipe_without_ssh_starts_only_this_hosts_ranks(tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("".join(f"{h} slots=2\n" for h in HOSTS))
    script_args = ["--config", "configs/advanced.yaml", "--deepspeed", "zero3"]
    argv = deepspeed_recipe(hostfile, "--no_ssh", "--node_rank", "1", "--master_addr", "node-a",
                            script_args=script_args)  # fmt: skip

    (launch,) = run_launcher(argv, monkeypatch)  # no ssh check, no pdsh: one local launch
    assert launch[launch.index("-m") + 1] == "deepspeed.launcher.launch"
    assert world_info(launch) == {h: [0, 1] for h in HOSTS}
    assert {"--node_rank=1", "--master_addr=node-a"} <= set(launch)
    assert launch[-len(script_args) - 1 :] == ["torch_ref/train_deepspeed.py", *script_args]


@requires_deepspeed
def test_deepspeed_single_host_hostfile_still_checks_ssh_then_launches_locally(tmp_path, monkeypatch):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    argv = deepspeed_recipe(hostfile, "--master_addr", "127.0.0.1", script_args=["--deepspeed", "zero3"])

    ssh_check, launch = run_launcher(argv, monkeypatch)
    assert ssh_check[0] == "ssh" and ssh_check[-2:] == ["localhost", "hostname"]  # --no_ssh_check skips it
    assert launch[launch.index("-m") + 1] == "deepspeed.launcher.launch" and "pdsh" not in launch
    assert world_info(launch) == {"localhost": [0, 1]}
