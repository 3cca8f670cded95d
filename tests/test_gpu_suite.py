"""benchmarks/gpu_suite.sh end to end on the CPU, with the GPU machine's missing packages hidden."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CUDA_TEST_FILES = ["tests/test_parity_torch.py", "tests/test_generate_cache.py"]  # gpu_suite.sh's CUDA_TESTS
NO_GPU = "no CUDA GPU visible"
# Goals the CPU run may miss: it times tiny shapes twice (--quick) on shared cores, so its speed
# ratios are a smoke test of the code path, not a verdict (the GPU run's goals are the ones that count).
NOT_MET_EXPECTED_ON_CPU = re.compile(
    r"^mini (training step, jaxllm >= [\d.]+x torch_ref eager on this CPU|decode batch \d+, )"
)


def pytest_counts(log: str) -> dict[str, int]:
    """The counts of pytest's final summary line ('7 skipped, 30 deselected in 1.28s')."""
    summary = [line for line in log.splitlines() if re.search(r"\d+ (passed|failed|skipped|error)", line)][-1]
    return {word.rstrip("s"): int(n) for n, word in re.findall(r"(\d+) (\w+)", summary.split(" in ")[0])}


def gpu_tests(env: dict) -> list[str]:
    collect = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider"]
    out = subprocess.run([*collect, *CUDA_TEST_FILES], capture_output=True, text=True, env=env, cwd=ROOT)
    return [line for line in out.stdout.splitlines() if "::" in line]


def test_gpu_suite_runs_on_cpu_without_grain_deepspeed_or_flask(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as on the machine
    env.update(OUT=str(tmp_path), PYTHON=sys.executable, PYTHONPATH=str(ROOT / "tests" / "gpu_machine"))
    hidden = subprocess.run([sys.executable, "-c", "import grain"], capture_output=True, text=True, env=env)
    assert "not installed on the GPU machine" in hidden.stderr  # the simulation is in force
    out = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], capture_output=True, text=True, env=env, timeout=900
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    # Every CUDA test was collected (grain-free imports) and skipped for want of a GPU; none ran or failed.
    expected = gpu_tests(env)
    tests_log = (tmp_path / "cuda_tests.log").read_text()
    counts = pytest_counts(tests_log)
    assert expected and counts.get("skipped") == len(expected), (len(expected), tests_log[-1500:])
    assert not {"passed", "failed", "error"} & set(counts), tests_log[-1500:]
    reasons = re.findall(r"SKIPPED \[(\d+)\] \S+: (.*)", tests_log)
    assert sum(int(n) for n, why in reasons if NO_GPU in why) == len(expected), reasons
    parity = json.loads((tmp_path / "parity.json").read_text())
    assert {(r["preset"], r["dtype"]) for r in parity["rows"]} == {("mini", "float32"), ("mini", "bfloat16")}
    assert all(r["max_rel_loss_diff"] < 1e-3 for r in parity["rows"])
    speed = json.loads((tmp_path / "speed.json").read_text())
    (mini,) = speed["presets"]
    impls = {"jaxllm", "torch_ref eager", "torch_ref + torch.compile"}
    assert set(mini["train"]) == impls and set(mini["forward"]) == impls and set(mini["decode"]["1"]) == impls
    assert all(0 < s["mfu"] < 1 and s["tokens_per_s"] > 0 for s in mini["train"].values())
    assert (tmp_path / "speed.png").stat().st_size > 10_000
    # The profiler trace comes back as one file under 16 MiB, in xprof's layout, and its folder is gone.
    trace = tmp_path / "trace_mini.tar.gz"
    assert 1000 < trace.stat().st_size < 16 << 20 and not (tmp_path / "profile").exists()
    with tarfile.open(trace) as tar:
        pbs = [m for m in tar.getmembers() if re.fullmatch(r"plugins/profile/[^/]+/[^/]+\.xplane\.pb", m.name)]
    assert len(pbs) == 1 and pbs[0].size > 1000
    # The summary table is printed last: a training-step row per implementation, then the goals.
    tail = out.stdout[out.stdout.index("== summary") :]
    rows = [[c.strip() for c in line.split("|")] for line in tail.splitlines() if line.count("|") >= 3]
    assert impls <= {row[1] for row in rows if row[0] == "mini"}, tail
    goals = re.findall(r"^- (.+): .*\((met|NOT met)\)$", tail, re.MULTILINE)
    assert any(g.startswith("mini training step") for g, _ in goals), tail
    missed = [g for g, verdict in goals if verdict == "NOT met" and not NOT_MET_EXPECTED_ON_CPU.match(g)]
    assert not missed, tail
