"""Building jaxllm's CPU kernel library (jaxllm/cpu_kernels.py): its fallbacks when there is no
compiler, a failing build or a damaged cached file, and the environment switch."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cpu_kernels, few_row_matmul


def _uses_kernel(fn, *args) -> bool:
    return 'custom_call_target="FewRowMatmul' in jax.jit(fn).lower(*args).compile().as_text()


def test_without_a_compiler_it_warns_once_and_keeps_xla_dots(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="jaxllm.cpu_kernels"):
            assert cpu_kernels.library() is None
            assert not _uses_kernel(lambda x: few_row_matmul.matmul(x, jnp.ones((8, 8)), jnp.float32), jnp.ones((2, 8)))
        assert "no C++ compiler" in caplog.text and "no-such-compiler" in caplog.text
    finally:
        cpu_kernels.library.cache_clear()


def test_a_failed_build_leaves_no_library_file(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    # A compiler that fails: nothing (not even a partial file) may be left where the library is looked up.
    fake = tmp_path / "bad-cxx"
    fake.write_text("#!/bin/sh\necho 'broken compiler' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CXX", str(fake))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None
        assert list((tmp_path / "cache" / "jaxllm" / "kernels").iterdir()) == []
    finally:
        cpu_kernels.library.cache_clear()


def test_a_damaged_cached_library_is_reported_not_loaded(
    monkeypatch: pytest.MonkeyPatch, tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))

    def damaged_build(compiler: str, out) -> None:
        out.parent.mkdir(parents=True)
        out.write_bytes(b"not a shared library")

    monkeypatch.setattr(cpu_kernels, "_build", damaged_build)
    cpu_kernels.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="jaxllm.cpu_kernels"):
            assert cpu_kernels.library() is None
        assert "not loaded" in caplog.text and str(tmp_path / "cache") in caplog.text
    finally:
        cpu_kernels.library.cache_clear()


def test_switched_off_by_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_kernels.SWITCH, "0")
    cpu_kernels.library.cache_clear()
    try:
        assert cpu_kernels.library() is None
    finally:
        cpu_kernels.library.cache_clear()


@pytest.mark.parametrize("n", [0, 1, 63, 65, 1 << 16, (1 << 16) + 7, 3 * (1 << 16) + 100])
def test_stream_sum_adds_every_element_once(n: int) -> None:
    # The bandwidth probe's kernel: blocks split over the threads, tails within and after the blocks.
    if cpu_kernels.library() is None:
        pytest.skip("jaxllm's CPU kernels are not built here")
    x = np.random.default_rng(n).standard_normal(n).astype(np.float32) + 0.5
    call = jax.ffi.ffi_call(cpu_kernels.target("StreamSumF32"), jax.ShapeDtypeStruct((), jnp.float32))
    got = float(jax.jit(call)(jnp.asarray(x)))
    assert got == pytest.approx(float(x.astype(np.float64).sum()), rel=1e-5, abs=1e-4)


def test_bandwidth_probes_report_both_reads_and_the_faster_counts() -> None:
    from benchmarks.real_model import describe_bandwidth, memory_bandwidth, read_bandwidth

    rates = memory_bandwidth(mb=8, reps=2)
    want = {"jax_sum", "kernel_read"} if cpu_kernels.library() is not None else {"jax_sum"}
    assert set(rates) == want and all(v > 1e8 for v in rates.values())
    assert read_bandwidth(rates) == max(rates.values())
    assert describe_bandwidth({"jax_sum": 41.6, "kernel_read": 78.0}) == (
        "41.6 GB/s (a jitted JAX sum) and 78.0 GB/s (jaxllm's stream_sum kernel)"
    )


def test_kernel_calls_from_several_threads_at_once_stay_exact() -> None:
    # Each call splits its work over XLA's intra-op pool (cpu_kernels.h: parallel_for); calls running
    # at the same time, from several Python threads, must each get their own rows and columns right.
    from concurrent.futures import ThreadPoolExecutor

    from jaxllm.decode_layout import to_strips

    if cpu_kernels.library() is None:
        pytest.skip("jaxllm's CPU kernels are not built here")
    rng = np.random.default_rng(0)
    w_KN = rng.standard_normal((96, 160)).astype(np.float32)
    (w_SKC,) = to_strips([(jnp.asarray(w_KN), 96)])
    xs = [rng.standard_normal((rows, 96)).astype(np.float32) for rows in (1, 3, 8, 9, 17, 40, 64, 100)]
    matmul = jax.jit(lambda x: few_row_matmul.matmul_strips(x, w_SKC, jnp.float32))
    want = [x.astype(np.float64) @ w_KN for x in xs]

    def run(i: int) -> float:
        x = xs[i % len(xs)]
        return max(float(np.max(np.abs(np.asarray(matmul(x)) - want[i % len(xs)]))) for _ in range(20))

    for x in xs:  # compile every shape first, so the threads run the kernels and not the compiler
        matmul(x).block_until_ready()
    with ThreadPoolExecutor(8) as pool:
        errors = list(pool.map(run, range(32)))
    assert max(errors) < 1e-4
