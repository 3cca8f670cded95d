"""The decoder-only transformer in Flax linen: one definition for both block families.

Shapes are written into names: B batch, T time, D d_model, N query heads, K kv heads,
H head_dim, F d_ff, V vocab. Every parameter carries logical axis names (see `LOGICAL_AXES`) so
that a sharding rules table can place it on a mesh without touching this file.

Public functions are pure and jit-able: `init_params`, `forward`, `count_params`,
`logical_axes`, `abstract_params`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import InputError

Params = dict[str, Any]

# The logical axis names used on parameters. The sharding module maps each to a mesh axis.
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "positions")


def _param(module: nn.Module, name: str, init: Any, shape: Sequence[int], axes: Sequence[str | None]):
    """A float32 parameter annotated with logical axis names."""
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), jnp.float32)


class Dense(nn.Module):
    """y = x @ kernel (+ bias), contracting the last `n_in` axes of x.

    The kernel keeps its logical shape (e.g. D x N x H) while the matmul runs on activations
    flattened to 2-D, which XLA's CPU backend differentiates markedly faster than a 3-D dot.
    """

    features: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical names of the kernel: input axes then output axes
    use_bias: bool
    dtype: Any
    std: float
    n_in: int = 1

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        in_shape = x.shape[-self.n_in :]
        batch_shape = x.shape[: -self.n_in]
        kernel = _param(self, "kernel", nn.initializers.normal(self.std), (*in_shape, *self.features), self.axes)
        x_2d = x.reshape(-1, math.prod(in_shape)).astype(self.dtype)
        y_2d = x_2d @ kernel.reshape(math.prod(in_shape), -1).astype(self.dtype)
        if self.use_bias:
            bias = _param(self, "bias", nn.initializers.zeros, self.features, self.axes[self.n_in :])
            y_2d = y_2d + bias.reshape(-1).astype(self.dtype)
        return y_2d.reshape(*batch_shape, *self.features)


class Norm(nn.Module):
    """LayerNorm with bias (GPT) or RMSNorm (Llama), computed in float32."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        scale = _param(self, "scale", nn.initializers.ones, (d,), ("embed",))
        if self.cfg.family == "gpt":
            bias = _param(self, "bias", nn.initializers.zeros, (d,), ("embed",))
            mean = x32.mean(-1, keepdims=True)
            var = jnp.square(x32 - mean).mean(-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.cfg.norm_eps) * scale + bias
        else:
            ms = jnp.square(x32).mean(-1, keepdims=True)
            y = x32 * jax.lax.rsqrt(ms + self.cfg.norm_eps) * scale
        return y.astype(self.cfg.dtype)


def rope(x_BTNH: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotary position embedding, half-split convention (as Hugging Face Llama)."""
    half = x_BTNH.shape[-1] // 2
    inv_freq_h = 1.0 / theta ** (jnp.arange(half, dtype=jnp.float32) * 2 / x_BTNH.shape[-1])
    angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h
    cos_BT1h, sin_BT1h = jnp.cos(angle_BTh)[:, :, None, :], jnp.sin(angle_BTh)[:, :, None, :]
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * cos_BT1h - x2 * sin_BT1h, x2 * cos_BT1h + x1 * sin_BT1h], axis=-1)
    return out.astype(x_BTNH.dtype)


class Attention(nn.Module):
    """Causal self-attention; grouped-query when n_kv_heads < n_heads."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        cfg = self.cfg
        n, k, h = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

        def proj(name: str, heads: int, head_axis: str) -> jax.Array:
            return Dense(
                (heads, h), ("embed", head_axis, "head_dim"), cfg.use_bias, cfg.dtype, cfg.init_std, name=name
            )(x_BTD)

        q_BTNH = proj("query", n, "heads")
        k_BTKH = proj("key", k, "kv_heads")
        v_BTKH = proj("value", k, "kv_heads")
        if cfg.family == "llama":
            q_BTNH = rope(q_BTNH, positions_BT, cfg.rope_theta)
            k_BTKH = rope(k_BTKH, positions_BT, cfg.rope_theta)
        o_BTNH = jax.nn.dot_product_attention(q_BTNH, k_BTKH, v_BTKH, is_causal=True, implementation=cfg.attention)
        return Dense(
            (cfg.d_model,), ("heads", "head_dim", "embed"), cfg.use_bias, cfg.dtype, out_std, n_in=2, name="out"
        )(o_BTNH)


class MLP(nn.Module):
    """GELU MLP (GPT) or SwiGLU (Llama)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array) -> jax.Array:
        cfg = self.cfg
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

        def dense(name: str, features: int, axes: tuple[str, str], std: float) -> Dense:
            return Dense((features,), axes, cfg.use_bias, cfg.dtype, std, name=name)

        if cfg.family == "gpt":
            h_BTF = dense("fc", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BTD)
            h_BTF = jax.nn.gelu(h_BTF, approximate=cfg.gelu == "tanh")
            return dense("proj", cfg.d_model, ("mlp", "embed"), out_std)(h_BTF)
        gate_BTF = dense("gate", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BTD)
        up_BTF = dense("up", cfg.d_ff, ("embed", "mlp"), cfg.init_std)(x_BTD)
        return dense("down", cfg.d_model, ("mlp", "embed"), out_std)(jax.nn.silu(gate_BTF) * up_BTF)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, x_BTD: jax.Array, positions_BT: jax.Array) -> jax.Array:
        x_BTD = x_BTD + Attention(self.cfg, name="attn")(Norm(self.cfg, name="attn_norm")(x_BTD), positions_BT)
        return x_BTD + MLP(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x_BTD))


_REMAT_POLICIES = {"full": None, "save_dots": jax.checkpoint_policies.dots_saveable}


class Transformer(nn.Module):
    """Token ids (B, T) -> float32 logits (B, T, V)."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        embed_init = nn.initializers.normal(cfg.init_std)
        token_embed_VD = _param(self, "token_embed", embed_init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
        x_BTD = jnp.take(token_embed_VD, tokens_BT, axis=0)
        if cfg.family == "gpt":
            pos_embed_TD = _param(
                self, "pos_embed", embed_init, (cfg.context_length, cfg.d_model), ("positions", "embed")
            )
            x_BTD = x_BTD + jnp.take(pos_embed_TD, positions_BT, axis=0)
        x_BTD = x_BTD.astype(cfg.dtype)
        block = Block if cfg.remat == "none" else nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat])
        for i in range(cfg.n_layers):
            x_BTD = block(cfg, name=f"blocks_{i}")(x_BTD, positions_BT)
        x_BTD = Norm(cfg, name="final_norm")(x_BTD)
        if cfg.tie_embeddings:
            x_2d = x_BTD.reshape(-1, cfg.d_model)
            logits_BTV = (x_2d @ token_embed_VD.T.astype(cfg.dtype)).reshape(*x_BTD.shape[:-1], -1)
        else:
            logits_BTV = Dense((cfg.vocab_size,), ("embed", "vocab"), False, cfg.dtype, cfg.init_std, name="lm_head")(
                x_BTD
            )
        return logits_BTV.astype(jnp.float32)


# Pure functional API ---------------------------------------------------------------------------


def _boxed_init(cfg: ModelConfig, rng: jax.Array) -> Params:
    tokens = jnp.zeros((1, min(8, cfg.context_length)), jnp.int32)
    return Transformer(cfg).init(rng, tokens)["params"]


def init_params(cfg: ModelConfig, seed: int | jax.Array = 0) -> Params:
    """Fresh float32 parameters as a plain pytree of arrays (no logical-axis boxes)."""
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    return nn.unbox(_boxed_init(cfg, rng))


def abstract_params(cfg: ModelConfig) -> Params:
    """The parameter pytree as `jax.ShapeDtypeStruct`s, computed without allocating."""
    return nn.unbox(jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0))))


def logical_axes(cfg: ModelConfig) -> Params:
    """The parameter pytree with a `PartitionSpec` of logical axis names at each leaf."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0))))


def count_params(cfg: ModelConfig) -> int:
    """Exact number of parameters (tied embeddings counted once), without allocating."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def forward(cfg: ModelConfig, params: Params, tokens_BT: jax.Array, positions_BT: jax.Array | None = None) -> jax.Array:
    """Float32 logits (B, T, V) for token ids (B, T). Pure; jit it with `cfg` static.

    Shapes are checked always; token values when they are concrete (outside `jit`).
    """
    check_tokens(cfg, tokens_BT)
    return Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT)


def check_tokens(cfg: ModelConfig, tokens_BT: Any) -> None:
    """Raise `InputError` for a non-2-D batch, a sequence past the context, or ids outside the vocab."""
    shape = np.shape(tokens_BT)
    if len(shape) != 2:
        raise InputError(f"tokens must have shape (batch, time), got shape {shape}")
    if shape[1] > cfg.context_length:
        raise InputError(f"sequence length {shape[1]} exceeds the context length {cfg.context_length}")
    if not jnp.issubdtype(jnp.result_type(tokens_BT), jnp.integer):
        raise InputError(f"token ids must be integers, got dtype {jnp.result_type(tokens_BT)}")
    if isinstance(tokens_BT, jax.core.Tracer) or shape[1] == 0 or shape[0] == 0:
        return
    tokens = np.asarray(tokens_BT)
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= cfg.vocab_size:
        bad = hi if hi >= cfg.vocab_size else lo
        raise InputError(f"token id {bad} is outside the vocabulary [0, {cfg.vocab_size})")
