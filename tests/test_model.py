"""The Flax model: purity, causality, dtypes, logical axes and input checks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import InputError, ModelConfig, abstract_params, forward, init_params, logical_axes
from jaxllm.model import LOGICAL_AXES

from conftest import random_tokens

TINY = {
    "gpt": ModelConfig.preset("mini").replace(vocab_size=97, n_layers=2, context_length=16),
    "llama": ModelConfig.preset("advanced").replace(
        vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, context_length=16
    ),
}


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_logits_at_t_do_not_depend_on_later_tokens(family):
    """Causality: d logits[:, t] / d embedding[:, s] is exactly zero for every s > t."""
    cfg = TINY[family]
    params = init_params(cfg, 0)
    tokens = jnp.asarray(random_tokens(cfg.vocab_size, 2, cfg.context_length))
    t = 5

    def logit_sum_at_t(token_embed):
        p = {**params, "token_embed": token_embed}
        return forward(cfg, p, tokens)[:, t].sum()

    # Gradient w.r.t. the embedding table, split per position via one-hot tokens.
    grad_VD = jax.jit(jax.grad(logit_sum_at_t))(params["token_embed"])
    later = np.unique(np.asarray(tokens[:, t + 1 :]))
    earlier = np.unique(np.asarray(tokens[:, : t + 1]))
    only_later = np.setdiff1d(later, earlier)
    assert only_later.size > 0
    assert np.all(np.asarray(grad_VD)[only_later] == 0.0)
    assert np.any(np.asarray(grad_VD)[earlier] != 0.0)


@pytest.mark.parametrize("family", ["gpt", "llama"])
def test_changing_a_future_token_leaves_past_logits_unchanged(family):
    cfg = TINY[family]
    params = init_params(cfg, 1)
    tokens = random_tokens(cfg.vocab_size, 1, cfg.context_length)
    changed = tokens.copy()
    changed[0, 9:] = (changed[0, 9:] + 1) % cfg.vocab_size
    a, b = forward(cfg, params, tokens), forward(cfg, params, changed)
    np.testing.assert_array_equal(a[:, :9], b[:, :9])
    assert not np.allclose(a[:, 9:], b[:, 9:])


def test_forward_is_jittable_and_pure():
    cfg = TINY["llama"]
    params = init_params(cfg, 0)
    tokens = random_tokens(cfg.vocab_size, 2, 8)
    jitted = jax.jit(forward, static_argnums=0)
    np.testing.assert_allclose(jitted(cfg, params, tokens), forward(cfg, params, tokens), atol=1e-6)
    np.testing.assert_array_equal(jitted(cfg, params, tokens), jitted(cfg, params, tokens))


def test_same_seed_same_params_different_seed_different_params():
    cfg = TINY["gpt"]
    a, b, c = init_params(cfg, 3), init_params(cfg, 3), init_params(cfg, 4)
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    assert not np.array_equal(a["token_embed"], c["token_embed"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_params_are_float32_and_logits_float32_for_any_compute_dtype(dtype):
    cfg = TINY["gpt"].replace(dtype=dtype)
    params = init_params(cfg, 0)
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype("float32")}
    assert forward(cfg, params, random_tokens(cfg.vocab_size, 1, 4)).dtype == jnp.float32


def test_bfloat16_compute_changes_the_numbers_a_little():
    cfg = TINY["llama"]
    params = init_params(cfg, 0)
    tokens = random_tokens(cfg.vocab_size, 2, 16)
    f32 = np.asarray(forward(cfg, params, tokens))
    bf16 = np.asarray(forward(cfg.replace(dtype="bfloat16"), params, tokens))
    rel = np.linalg.norm(bf16 - f32) / np.linalg.norm(f32)
    assert 1e-4 < rel < 3e-2  # really computed in bf16 (8-bit mantissa), yet close


def test_every_parameter_has_logical_axes_from_the_known_set():
    for cfg in TINY.values():
        shapes = jax.tree.leaves(abstract_params(cfg))
        specs = jax.tree.leaves(logical_axes(cfg), is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
        assert len(shapes) == len(specs)
        for shape, spec in zip(shapes, specs, strict=True):
            assert len(spec) == len(shape.shape)
            assert set(spec) <= set(LOGICAL_AXES)


def test_grouped_query_attention_stores_only_kv_heads():
    cfg = TINY["llama"]
    p = abstract_params(cfg)["blocks_0"]["attn"]
    assert p["query"]["kernel"].shape == (64, 4, 16)
    assert p["key"]["kernel"].shape == p["value"]["kernel"].shape == (64, 2, 16)


def test_tied_head_has_no_separate_output_matrix():
    assert "lm_head" not in abstract_params(ModelConfig.preset("gpt2-124m"))
    assert "lm_head" in abstract_params(ModelConfig.preset("mini"))


@pytest.mark.parametrize(
    ("tokens", "message"),
    [
        (np.array([[1, 2, 97]]), r"token id 97 is outside the vocabulary \[0, 97\)"),
        (np.array([[-1, 2]]), r"token id -1 is outside the vocabulary"),
        (np.zeros((1, 17), np.int32), r"sequence length 17 exceeds the context length 16"),
        (np.zeros((4,), np.int32), r"shape \(batch, time\)"),
        (np.zeros((1, 4), np.float32), r"must be integers"),
    ],
)
def test_bad_tokens_get_a_clear_error(tokens, message):
    cfg = TINY["gpt"]
    with pytest.raises(InputError, match=message):
        forward(cfg, init_params(cfg, 0), tokens)


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_activation_checkpointing_keeps_param_names_and_gradients(remat):
    cfg = TINY["gpt"]
    params = init_params(cfg, 0)
    tokens = random_tokens(cfg.vocab_size, 2, 8)

    def loss(cfg, p):
        return forward(cfg, p, tokens).mean()

    plain = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(cfg, params)
    rematted = jax.jit(jax.grad(loss, argnums=1), static_argnums=0)(cfg.replace(remat=remat), params)
    assert jax.tree.structure(plain) == jax.tree.structure(rematted)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)

    def hlo(c):
        return jax.jit(jax.grad(loss, argnums=1), static_argnums=0).lower(c, params).as_text()

    # jax.checkpoint lowers to optimization barriers around the recomputed block.
    assert "optimization_barrier" in hlo(cfg.replace(remat=remat))
    assert "optimization_barrier" not in hlo(cfg)


@pytest.mark.parametrize("scan_layers", [False, True])
def test_rope_tables_are_computed_once_for_all_layers(scan_layers):
    # XLA's CPU fusion copied the sines and cosines into every layer's two rotations (about 10x the
    # rotations' own cost); the compiled forward computes each once, whatever the depth.
    base = ModelConfig(family="llama", d_model=32, n_heads=2, n_kv_heads=1, n_layers=4, d_ff=64, vocab_size=64,
                       context_length=32, scan_layers=scan_layers)  # fmt: skip
    params = init_params(base)
    tokens = jnp.asarray(random_tokens(64, 2, 16, seed=1), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(3, 19), tokens.shape)  # traced, so nothing is folded
    step = jax.jit(lambda p, t, pos: forward(base, p, t, pos))
    hlo = step.lower(params, tokens, positions).compile().as_text()
    assert hlo.count(" cosine(") <= 2 and hlo.count(" sine(") <= 2, "rope tables recomputed per layer"
