"""The few-row CPU matmul kernel (jaxllm/kernels/few_row_matmul.cc): exact sums, when it is used,
its gradient, and a model's logits and greedy tokens unchanged by it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxllm
from jaxllm import cpu_kernels, few_row_matmul
from jaxllm.config import ModelConfig

from conftest import random_tokens, small_llama

pytestmark = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="the kernel library could not be built here (no C++ compiler?)"
)


def _reference(x: np.ndarray, w: np.ndarray, transposed: bool) -> np.ndarray:
    w64 = np.asarray(jnp.asarray(w).astype(jnp.float32), np.float64)
    return x.astype(np.float64) @ (w64.T if transposed else w64)


def _uses_kernel(fn, *args) -> bool:
    return 'custom_call_target="FewRowMatmul' in jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("w_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("m", "k", "n"), [(1, 576, 1536), (1, 37, 131), (3, 70, 50), (5, 33, 129), (8, 160, 64), (32, 48, 200)]
)
def test_kernel_sums_match_float64(m: int, k: int, n: int, w_dtype: str, transposed: bool) -> None:
    # Shapes cover full register tiles, every row and column remainder, and K not a multiple of 16.
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    w = jnp.asarray(rng.standard_normal((n, k) if transposed else (k, n), dtype=np.float32)).astype(w_dtype)
    got = np.asarray(jax.jit(few_row_matmul.kernel, static_argnums=2)(jnp.asarray(x), w, transposed))
    want = _reference(x, np.asarray(w.astype(jnp.float32)), transposed)
    assert got.shape == (m, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(k) * np.abs(want).max())


def test_matmul_uses_the_kernel_only_for_few_rows_unsharded_and_not_switched_off() -> None:
    w = jnp.ones((64, 96), jnp.float32)
    mm = lambda x: few_row_matmul.matmul(x, w, jnp.float32)  # noqa: E731
    assert _uses_kernel(mm, jnp.ones((few_row_matmul.MAX_ROWS, 64)))
    assert not _uses_kernel(mm, jnp.ones((few_row_matmul.MAX_ROWS + 1, 64)))
    assert _uses_kernel(mm, jnp.ones((1, 64)))
    assert _uses_kernel(lambda x: few_row_matmul.matmul(x, w.astype(jnp.bfloat16), jnp.float32), jnp.ones((1, 64)))
    assert _uses_kernel(lambda x: few_row_matmul.matmul(x, w.T, jnp.float32, transposed=True), jnp.ones((1, 64)))

    def switched_off(x: jax.Array) -> jax.Array:
        with cpu_kernels.off():
            return mm(x)

    assert not _uses_kernel(switched_off, jnp.ones((4, 64)))
    mesh = Mesh(np.array(jax.devices()[:2]), ("data",))
    with jax.set_mesh(mesh):
        assert not _uses_kernel(mm, jnp.ones((4, 64)))  # a sharded program keeps XLA's partitioned dots


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_matmul_equals_xla_dot_in_both_compute_dtypes(dtype: str) -> None:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((6, 80), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((80, 112), dtype=np.float32))
    got = jax.jit(lambda x, w: few_row_matmul.matmul(x, w, dtype))(x, w)
    want = x.astype(dtype) @ w.astype(dtype)
    assert got.dtype == jnp.dtype(dtype)
    tol = 1e-5 if dtype == "float32" else 2e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=tol, atol=tol * 10)


@pytest.mark.parametrize("transposed", [False, True])
def test_gradient_through_the_kernel_equals_xla_dots(transposed: bool) -> None:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((4, 40), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((56, 40) if transposed else (40, 56), dtype=np.float32))
    target = jnp.asarray(rng.standard_normal((4, 56), dtype=np.float32))

    def loss(x, w, use_kernel: bool):
        if use_kernel:
            y = few_row_matmul.matmul(x, w, jnp.float32, transposed=transposed)
        else:
            y = x @ (w.T if transposed else w)
        return jnp.sum(jnp.tanh(y) * target)

    assert _uses_kernel(lambda x, w: loss(x, w, True), x, w)
    got = jax.grad(loss, argnums=(0, 1))(x, w, True)
    want = jax.grad(loss, argnums=(0, 1))(x, w, False)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("param_dtype", ["float32", "bfloat16"])
def test_logits_and_greedy_tokens_unchanged_by_the_kernel(param_dtype: str) -> None:
    cfg = small_llama(param_dtype=param_dtype)
    xla_cfg = cfg.replace(few_row_matmul="xla")
    params = jaxllm.init_params(cfg, seed=3)
    tokens_BT = jnp.asarray(random_tokens(cfg.vocab_size, 3, 5, seed=2), jnp.int32)

    def logits(c: ModelConfig) -> np.ndarray:
        fwd = lambda params, tokens_BT: jaxllm.forward(c, params, tokens_BT)  # noqa: E731
        assert _uses_kernel(fwd, params, tokens_BT) == (c.few_row_matmul == "auto")  # 15 rows: the kernel's case
        return np.asarray(jax.jit(fwd)(params, tokens_BT))

    np.testing.assert_allclose(logits(cfg), logits(xla_cfg), rtol=1e-4, atol=1e-4)

    # generate: prefill (15 rows) and each decode step (3 rows) run the kernel, or XLA's dots
    prompts = [list(map(int, row)) for row in np.asarray(tokens_BT)]
    with_kernel = jaxllm.generate(cfg, params, prompts, max_new_tokens=12, ignore_eos=True)
    assert with_kernel == jaxllm.generate(xla_cfg, params, prompts, max_new_tokens=12, ignore_eos=True)
