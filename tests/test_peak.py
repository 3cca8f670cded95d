"""One peak-FLOPs definition for MFU (`jaxllm.peak`): cached per machine, overridable, warned about."""

import json

import pytest

from jaxllm import peak
from jaxllm.metrics import StepClock


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(peak.ENV_CACHE, str(tmp_path))
    monkeypatch.delenv(peak.ENV_PEAK, raising=False)
    return tmp_path / "peak_flops.json"


def test_cpu_peak_is_measured_once_then_read_from_the_cache(fresh_cache, monkeypatch):
    calls = []

    def measure():
        calls.append(1)
        return {"numpy": 2e11, "torch": 3e11}

    monkeypatch.setattr(peak, "measure_cpu_matmul_flops", measure)
    value, source = peak.cpu_peak_flops()
    assert value == 3e11 and len(calls) == 1  # the faster framework's figure
    assert json.loads(fresh_cache.read_text())[peak.machine_key()]["flops"] == 3e11
    assert str(fresh_cache) in source and "torch 300" in source

    def must_not_measure():
        raise AssertionError("measured again")

    monkeypatch.setattr(peak, "measure_cpu_matmul_flops", must_not_measure)
    assert peak.cpu_peak_flops() == (value, source)
    assert peak.run_peak_flops("cpu", "cpu", 8, "float32", "default", None) == (value, source)  # one figure for all


def test_environment_variable_and_config_override_the_cache(fresh_cache, monkeypatch):
    monkeypatch.setattr(peak, "measure_cpu_matmul_flops", lambda: pytest.fail("measured"))
    assert peak.run_peak_flops("cpu", "cpu", 2, "float32", "default", 1e12) == (2e12, "train.peak_flops")
    monkeypatch.setenv(peak.ENV_PEAK, "5e11")
    assert peak.cpu_peak_flops()[0] == 5e11
    assert not fresh_cache.exists()


def test_gpus_use_the_datasheet_peak_times_the_devices():
    assert peak.run_peak_flops("gpu", "NVIDIA H100 80GB HBM3", 2, "bfloat16", "default", None)[0] == 2 * 989e12
    value, source = peak.run_peak_flops("cuda", "Mystery GPU", 1, "bfloat16", "default", None)
    assert value != value and "train.peak_flops" in source  # nan, and how to fix it


def test_real_measurement_runs_every_installed_framework(fresh_cache):
    rates = peak.measure_cpu_matmul_flops(sizes=(128,), reps=2)
    # Each framework measured a finite, positive rate (the bound is loose: a test run shares the cores).
    assert {"numpy", "torch", "jax"} <= set(rates) and all(1e6 < r < 1e15 for r in rates.values())


def clock_after_one_timed_step(peak_flops: float) -> StepClock:
    clock = StepClock(tokens_per_step=1000, flops_per_token=1e6, peak_flops=peak_flops, peak_source="test peak")
    clock.step_done()
    clock.step_done()
    return clock


def test_an_mfu_above_0_9_is_warned_about_once(capsys):
    clock = clock_after_one_timed_step(peak_flops=1.0)  # any real step time gives an absurd MFU
    assert clock.rates()["mfu"] > 0.9
    out = capsys.readouterr().out
    assert "warning: MFU" in out and "test peak" in out and peak.ENV_PEAK in out
    clock.step_done()
    clock.rates()
    assert "warning" not in capsys.readouterr().out  # once per run


def test_a_plausible_mfu_is_not_warned_about(capsys):
    clock = clock_after_one_timed_step(peak_flops=1e30)
    assert clock.rates()["mfu"] < 0.9
    assert capsys.readouterr().out == ""
