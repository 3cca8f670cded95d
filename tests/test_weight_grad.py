"""The weight-gradient kernel (jaxllm/kernels/weight_grad.cc) and `few_row_matmul.dense`, which uses it
in training on the CPU: sums against float64, gradients against XLA's, and when it is used."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

import jaxllm
from jaxllm import cpu_kernels, few_row_matmul

from conftest import random_tokens, small_llama

pytestmark = pytest.mark.skipif(
    cpu_kernels.library() is None, reason="the kernel library could not be built here (no C++ compiler?)"
)


def _uses_weight_grad(fn, *args) -> bool:
    return 'custom_call_target="WeightGradF32"' in jax.jit(fn).lower(*args).compile().as_text()


@pytest.mark.parametrize(
    ("m", "k", "n"),
    [(1, 1, 1), (37, 20, 70), (130, 9, 33), (257, 64, 1000), (300, 17, 32), (129, 128, 16), (64, 3, 200), (0, 5, 7)],
)
def test_kernel_sums_match_float64(m: int, k: int, n: int) -> None:
    # Shapes cover whole and partial 32-column blocks, 8-row tiles of dW, 128-row panels of M, one
    # block split into row ranges (few columns), and no rows at all (a zero gradient).
    rng = np.random.default_rng(m * 1000 + n)
    x = rng.standard_normal((m, k), dtype=np.float32)
    dy = rng.standard_normal((m, n), dtype=np.float32)
    got = np.asarray(jax.jit(few_row_matmul.weight_grad)(jnp.asarray(x), jnp.asarray(dy)))
    want = x.astype(np.float64).T @ dy.astype(np.float64)
    assert got.shape == (k, n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(max(m, 1)) * max(np.abs(want).max(), 1.0))


@pytest.mark.parametrize("transposed", [False, True])
def test_dense_gradients_equal_xla_dots(transposed: bool) -> None:
    rng = np.random.default_rng(1)
    rows = few_row_matmul.MAX_ROWS + 40  # beyond the few-row kernel: XLA's dot forward
    x = jnp.asarray(rng.standard_normal((rows, 40), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((56, 40) if transposed else (40, 56), dtype=np.float32))
    target = jnp.asarray(rng.standard_normal((rows, 56), dtype=np.float32))

    def loss(x, w, ours: bool):
        y = few_row_matmul.matmul(x, w, jnp.float32, transposed=transposed) if ours else x @ (w.T if transposed else w)
        return jnp.sum(jnp.tanh(y) * target)

    grad = jax.grad(loss, argnums=(0, 1))
    assert _uses_weight_grad(lambda x, w: grad(x, w, True), x, w)
    got, want = grad(x, w, True), grad(x, w, False)
    for g, h in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-5, atol=1e-5)


def test_used_only_in_float32_on_one_device_and_not_switched_off() -> None:
    w = jnp.ones((64, 96), jnp.float32)
    x = jnp.ones((100, 64), jnp.float32)

    def grad_of(dtype, enabled: bool = True, w=w):
        return jax.grad(lambda w: jnp.sum(few_row_matmul.matmul(x, w, dtype, enabled=enabled).astype(jnp.float32)))

    assert _uses_weight_grad(grad_of(jnp.float32), w)
    assert not _uses_weight_grad(grad_of(jnp.bfloat16), w)  # bfloat16 computation: XLA's dots
    assert not _uses_weight_grad(grad_of(jnp.float32, w=w.astype(jnp.bfloat16)), w.astype(jnp.bfloat16))
    assert not _uses_weight_grad(grad_of(jnp.float32, enabled=False), w)  # model.few_row_matmul=xla

    def switched_off(w: jax.Array) -> jax.Array:
        with cpu_kernels.off():
            return grad_of(jnp.float32)(w)

    assert not _uses_weight_grad(switched_off, w)
    with jax.set_mesh(Mesh(np.array(jax.devices()[:2]), ("data",))):
        assert not _uses_weight_grad(grad_of(jnp.float32), w)  # a sharded program keeps XLA's dots


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_model_loss_and_gradients_equal_xla_dots(family: str) -> None:
    # gpt: untied lm_head and biases; llama: the tied head (its gradient through the transposed form).
    cfg = small_llama(family=family, n_kv_heads=2 if family == "llama" else None, tie_embeddings=family == "llama")
    params = jaxllm.init_params(cfg, 0)
    batch = jnp.asarray(random_tokens(cfg.vocab_size, 3, 33), jnp.int32)  # 3 x 32 = 96 rows a matmul

    def loss(params, cfg):
        logits = jaxllm.forward(cfg, params, batch[:, :-1])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch[:, 1:, None], -1))

    ours = jax.value_and_grad(loss)
    assert _uses_weight_grad(lambda p: ours(p, cfg), params)
    got = ours(params, cfg)
    want = jax.value_and_grad(loss)(params, cfg.replace(few_row_matmul="xla"))
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-6)
    for path, g in jax.tree_util.tree_leaves_with_path(got[1]):
        h = dict(jax.tree_util.tree_leaves_with_path(want[1]))[path]
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-6, err_msg=str(path))


def test_remat_save_dots_keeps_the_dense_outputs() -> None:
    # `dense` is a custom VJP, whose dot `dots_saveable` cannot see: its output is named, and
    # remat=save_dots saves it, so the backward pass recomputes no Dense matmul (as with remat=none).
    batch = jnp.asarray(random_tokens(300, 3, 33), jnp.int32)

    def matmuls(remat: str) -> tuple[int, int]:
        cfg = small_llama(family="gpt", n_kv_heads=None, tie_embeddings=False, remat=remat)
        params = jaxllm.init_params(cfg, 0)
        loss = lambda p: jnp.mean(jaxllm.forward(cfg, p, batch[:, :-1]) ** 2)  # noqa: E731
        text = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
        return sum(" dot(" in line for line in text.splitlines()), text.count('custom_call_target="WeightGradF32"')

    none, save_dots, full = matmuls("none"), matmuls("save_dots"), matmuls("full")
    assert none[1] == save_dots[1] == full[1] > 0
    assert save_dots[0] == none[0] < full[0]  # full remat recomputes the forward's dots; save_dots does not
