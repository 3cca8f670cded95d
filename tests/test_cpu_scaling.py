"""benchmarks.cpu_scaling: the table's arithmetic, and one real child on every core as XLA CPU devices."""

from __future__ import annotations

import os

import pytest

from benchmarks import cpu_scaling as cs
from benchmarks.machine import cpu_slug, cpu_topology


def test_cpu_slug_names_the_vendor_and_family():
    assert cpu_slug("Intel(R) Xeon(R) Processor") == "intel-xeon"
    assert cpu_slug("AMD EPYC 9B14") == "amd-epyc"
    assert cpu_slug("") == "cpu"


def test_cpu_topology_tells_cores_from_hyper_threads():
    block = "physical id\t: 0\nsiblings\t: {}\ncpu cores\t: {}\nflags\t\t: fpu avx512f amx_tile amx_bf16\n"
    assert cpu_topology((block.format(2, 1)) * 2) == "1 physical cores x 2 thread(s); avx512f amx_tile amx_bf16"
    assert cpu_topology(block.format(2, 2).replace("avx512f amx_tile amx_bf16", "avx2")).startswith(
        "2 physical cores x 1 thread(s); no AVX-512"
    )
    assert cpu_topology("") == "unknown"


def test_configurations_add_the_device_split_only_on_several_cores():
    assert (cs.JAX_DEVICES, 1) not in cs.configurations(1)
    assert (cs.JAX_DEVICES, 4) in cs.configurations(4)
    assert {(cs.JAX, 1), (cs.EAGER, 1), (cs.JAX, 4), (cs.EAGER, 4)} <= set(cs.configurations(4))


def test_summary_scaling_and_ratio_to_eager():
    def row(impl, cores, ms):
        return {"preset": "mini", "impl": impl, "cores": cores, "median_s": ms / 1e3}

    rows = [
        row(cs.JAX, 1, 60),
        row(cs.JAX, 2, 40),
        row(cs.EAGER, 1, 70),
        row(cs.EAGER, 2, 40),
        row(cs.JAX_DEVICES, 2, 30),
    ]
    got = {s["impl"]: s for s in cs.summary_rows(rows, 2)}
    assert got[cs.JAX]["scaling"] == pytest.approx(1.5)
    assert got[cs.JAX]["vs_eager"] == pytest.approx(1.0)
    assert got[cs.EAGER]["scaling"] == pytest.approx(1.75)
    # The device split is scaled against jaxllm's own 1-core step.
    assert got[cs.JAX_DEVICES]["scaling"] == pytest.approx(2.0)
    assert got[cs.JAX_DEVICES]["vs_eager"] == pytest.approx(40 / 30)

    def md(cpu: str) -> str:
        return cs.markdown({"machine": {"cpu": cpu, "cores": 2, "python": "3", "load_average_at_start": 0},
                            "run": {"command": "c", "rounds": 1, "reps": 1, "cores": 2, "load_average_at_end": 0},
                            "summary": cs.summary_rows(rows, 2)})  # fmt: skip

    intel = md("Intel(R) Xeon(R) Processor")
    assert "| mini | jaxllm | 60.0 | 40.0 | 1.50x | 1.00x |" in intel
    # Goals are the CPU's own, judged on the default jaxllm row: Intel needs scaling >= 1.7x too.
    assert "- mini: 1.00x eager (goal >= 1.0x), scaling 1.50x (NOT met)" in intel
    assert "one CPU device per core: 1.33x" not in intel
    assert "- mini: 1.00x eager (goal >= 1.2x), scaling 1.50x (NOT met)" in md("AMD EPYC 9B14")
    rows[1]["median_s"] = 30 / 1e3
    assert "- mini: 1.33x eager (goal >= 1.2x), scaling 2.00x (met)" in md("AMD EPYC 9B14")


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 cores")
def test_child_splits_the_cores_into_xla_devices():
    got = cs.run_child(cs.JAX_DEVICES, 2, "mini", reps=1, quick=True)
    assert got["xla_devices"] == 2 and got["cores"] == 2
    assert len(got["seconds_per_step"]) == 1 and got["seconds_per_step"][0] > 0
    one = cs.run_child(cs.EAGER, 1, "mini", reps=1, quick=True)
    assert one["cores"] == 1 and one["torch_threads"] == 1
