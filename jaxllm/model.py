"""The decoder-only transformer in Flax linen: one definition for both block families.

Shapes are written into names: B batch, T time, D d_model, N query heads, K kv heads,
H head_dim, F d_ff, V vocab. Every parameter carries logical axis names (see `LOGICAL_AXES`) so
that a sharding rules table can place it on a mesh without touching this file.

Public functions are pure and jit-able: `init_params`, `forward`, `forward_cached`, `init_cache`,
`count_params`, `logical_axes`, `abstract_params`.

Layer layout: with `scan_layers` false the blocks are a Python loop with params `blocks_0`,
`blocks_1`, …; with it true they are one `nn.scan`, params `blocks` with a leading "layers" axis
(L, …) on every leaf. Files, exports and conversions are always per-layer: `to_per_layer` and
`to_layout` are the one pair of functions every load, save and conversion calls at the edge.

Inference with a KV cache (`forward_cached`): every layer keeps a preallocated `KVCache` of S
positions per row, holding only the K kv heads (grouped-query attention caches K, not N, heads).
Entry s of row b is the key/value of that row's token at position s, so rows advance
independently: each token is written at its own position and attends to the entries at positions
<= its own. Entries past a row's current position (right padding, or an earlier request's leftovers
in a reused slot) are therefore never read, and must not be: a row's positions 0..p-1 must have
been written before position p is computed. With a `sliding_window` W, a token at position p reads
only the entries at p - W + 1 .. p (the cache still holds every position). With `scan_layers` the
cache is one `KVCache` whose arrays carry a leading layer axis, (L, B, K, S, H), scanned over with
the stacked params: no per-step stacking or unstacking.
"""

from __future__ import annotations

from jaxllm.host_memory import keep_freed_host_memory

# Every JAX-backed part of jaxllm imports this module: the first such import (before JAX has run
# anything) is where Python-API users get the malloc settings too (jaxllm/host_memory.py).
keep_freed_host_memory()

# ruff: noqa: E402  (the imports below start JAX's modules, after the malloc settings)

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import causal_attention, decode_attention, few_row_matmul
from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.rope import scaled_inv_freq

Params = dict[str, Any]

# The logical axis names used on parameters. The sharding module maps each to a mesh axis.
LOGICAL_AXES = ("vocab", "embed", "heads", "kv_heads", "head_dim", "mlp", "positions", "layers")
# Activation constraints (the residual stream and the logits), by the same rules table. They only
# act under `flax.linen.logical_axis_rules` and `jax.set_mesh` (the training loop sets both); elsewhere
# they are no-ops. "embed" yields to "batch" when both would use the fsdp axis.
ACT_BTD = ("batch", None, "embed")
ACT_BTV = ("batch", None, "vocab")


def _constrain(x: jax.Array, logical: tuple[str | None, ...]) -> jax.Array:
    return nn.with_logical_constraint(x, logical)


def _cfg(module: nn.Module) -> ModelConfig:
    """The module's config (a `Dense` takes its parent's)."""
    return module.cfg if hasattr(module, "cfg") else module.parent.cfg


def _param(module: nn.Module, name: str, init: Any, shape: Sequence[int], axes: Sequence[str | None]):
    """A parameter in `model.param_dtype`, with logical axis names."""
    dtype = jnp.dtype(_cfg(module).param_dtype)
    return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


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
        cfg = _cfg(self)
        n_in, n_out = math.prod(in_shape), math.prod(self.features)
        init = nn.initializers.normal(self.std)
        x_2d = x.reshape(-1, n_in)
        enabled = cfg.few_row_matmul == "auto"
        strip = few_row_matmul.strip_width(cfg.param_dtype)
        if cfg.kernel_layout == "strips" and n_out % strip == 0:  # jaxllm.decode_layout
            shape = (n_out // strip, n_in, strip)
            kernel_SKC = _param(self, "kernel", init, shape, (None, None, None))
            y_2d = few_row_matmul.matmul_strips(x_2d, kernel_SKC, self.dtype, enabled=enabled)
        else:
            kernel = _param(self, "kernel", init, (*in_shape, *self.features), self.axes)
            y_2d = few_row_matmul.matmul(x_2d, kernel.reshape(n_in, n_out), self.dtype, enabled=enabled)
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


class Rotary(NamedTuple):
    """A forward pass's rotary tables, computed once for all its layers: recomputed in every layer's
    rotations they cost ten times the rotations themselves on the CPU."""

    cos_BT1h: jax.Array
    sin_BT1h: jax.Array


def rotary(cfg: ModelConfig, positions_BT: jax.Array) -> Rotary | None:
    """cos and sin of each token's RoPE angles (float32, (B, T, 1, head_dim / 2)); None without RoPE (gpt).

    The inverse frequencies are plain RoPE's from `rope_theta`, or `jaxllm.rope`'s for a `rope_scaling`."""
    if cfg.family != "llama":
        return None
    h = cfg.dim_per_head
    if cfg.rope_scaling is None:
        inv_freq_h = 1.0 / cfg.rope_theta ** (jnp.arange(h // 2, dtype=jnp.float32) * 2 / h)
    else:
        inv_freq_h = jnp.asarray(scaled_inv_freq(cfg))
    angle_BTh = positions_BT.astype(jnp.float32)[..., None] * inv_freq_h
    tables = lambda a: (jnp.cos(a), jnp.sin(a))  # noqa: E731
    if jax.default_backend() == "cpu":
        # XLA's CPU fusion copies the sines and cosines into each of the 2 x n_layers rotations that read
        # them; a conditional is a fusion boundary, so they are computed once (both branches are the same).
        cos_BTh, sin_BTh = jax.lax.cond(positions_BT[0, 0] >= 0, tables, tables, angle_BTh)
    else:
        cos_BTh, sin_BTh = tables(angle_BTh)
    return Rotary(cos_BTh[:, :, None, :], sin_BTh[:, :, None, :])


def rope(x_BTNH: jax.Array, rot: Rotary) -> jax.Array:
    """Rotary position embedding, half-split convention (as Hugging Face Llama), by `rotary`'s tables."""
    half = x_BTNH.shape[-1] // 2
    x = x_BTNH.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    out = jnp.concatenate([x1 * rot.cos_BT1h - x2 * rot.sin_BT1h, x2 * rot.cos_BT1h + x1 * rot.sin_BT1h], axis=-1)
    return out.astype(x_BTNH.dtype)


class KVCache(NamedTuple):
    """One layer's key/value cache: kv heads only, entry s holding the token at position s.

    Laid out (B, K, S, H), heads before positions, so the attention matmuls batch over (B, K) and
    read each head's positions contiguously (a (B, S, K, H) cache made decode steps about twice as
    slow at S = 1024 on XLA's CPU backend).
    """

    k_BKSH: jax.Array
    v_BKSH: jax.Array


# One KVCache per layer; with `scan_layers`, one KVCache of (L, B, K, S, H) arrays.
Cache = tuple[KVCache, ...] | KVCache

# The logical axes of a cache array, by the same rules table as the parameters: rows (serving slots)
# as "batch", kv heads as the attention's. Axes before these four (e.g. stacked layers) are unnamed.
KV_CACHE_AXES = ("batch", "kv_heads", "cache_length", "head_dim")


def cache_axes(cache: Any) -> Any:
    """The cache's pytree with a `PartitionSpec` of logical axis names at each array."""
    return jax.tree.map(lambda x: jax.sharding.PartitionSpec(*(None,) * (x.ndim - 4), *KV_CACHE_AXES), cache)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> Cache:
    """A zeroed cache of `length` positions for `batch` rows, in the compute dtype (layout: `Cache`)."""
    shape = (batch, cfg.kv_heads, length, cfg.dim_per_head)
    if cfg.scan_layers:
        return KVCache(jnp.zeros((cfg.n_layers, *shape), cfg.dtype), jnp.zeros((cfg.n_layers, *shape), cfg.dtype))
    return tuple(KVCache(jnp.zeros(shape, cfg.dtype), jnp.zeros(shape, cfg.dtype)) for _ in range(cfg.n_layers))


def cached_attention(
    q_BTNH: jax.Array, cache: KVCache, positions_BT: jax.Array, sliding_window: int | None = None
) -> jax.Array:
    """Each query attends to the cache entries at positions <= its own (and, with a
    `sliding_window` W, > its own - W).

    The G = N / K query heads of a group share their kv head without repeating the cache, and the
    matmuls take the cache as their left operand, contracting head_dim in place: on XLA's CPU
    backend this ran 2-3x faster than the (queries x keys) form once the cache outgrows the caches.
    M = G * T indexes (query head in group, time).
    """
    b, t, n, h = q_BTNH.shape
    k, s = cache.k_BKSH.shape[1], cache.k_BKSH.shape[2]
    g = n // k
    q_BKMH = q_BTNH.reshape(b, t, k, g, h).transpose(0, 2, 3, 1, 4).reshape(b, k, g * t, h)
    batch_dims = ((0, 1), (0, 1))
    scores_BKSM = jax.lax.dot_general(
        cache.k_BKSH.astype(q_BTNH.dtype), q_BKMH, (((3,), (3,)), batch_dims), preferred_element_type=jnp.float32
    )
    entries_1S1 = jnp.arange(s)[None, :, None]
    visible_BS1T = entries_1S1 <= positions_BT[:, None, :]
    if sliding_window is not None:
        visible_BS1T = visible_BS1T & (entries_1S1 > positions_BT[:, None, :] - sliding_window)
    visible_B1S1T = visible_BS1T[:, None, :, None, :]
    scores_BKSGT = jnp.where(visible_B1S1T, scores_BKSM.reshape(b, k, s, g, t) / math.sqrt(h), -jnp.inf)
    probs_BKSM = jax.nn.softmax(scores_BKSGT, axis=2).astype(q_BTNH.dtype).reshape(b, k, s, g * t)
    o_BKMH = jax.lax.dot_general(probs_BKSM, cache.v_BKSH.astype(q_BTNH.dtype), (((2,), (2,)), batch_dims))
    return o_BKMH.reshape(b, k, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


class Attention(nn.Module):
    """Causal self-attention; grouped-query when n_kv_heads < n_heads.

    Without a cache: attention within `x_BTD`; with `segment_ids_BT` (document masking), only
    within each query's own segment. With a cache: the new keys/values are written at
    `positions_BT`, and each query attends to the cache entries at positions <= its own. `rot`:
    the RoPE tables of `positions_BT` (`rotary`; None: no rotation). Returns (output, updated cache or None).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        cache: KVCache | None = None,
        segment_ids_BT: jax.Array | None = None,
        rot: Rotary | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg = self.cfg
        n, k, h = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head
        out_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)

        qkv_bias = cfg.use_bias or cfg.qkv_bias

        def proj(name: str, heads: int, head_axis: str) -> jax.Array:
            return Dense((heads, h), ("embed", head_axis, "head_dim"), qkv_bias, cfg.dtype, cfg.init_std, name=name)(
                x_BTD
            )

        q_BTNH = proj("query", n, "heads")
        k_BTKH = proj("key", k, "kv_heads")
        v_BTKH = proj("value", k, "kv_heads")
        if rot is not None:
            q_BTNH, k_BTKH = rope(q_BTNH, rot), rope(k_BTKH, rot)
        if cache is None:
            # A window of W: each query sees itself and the W - 1 keys before it.
            window = None if cfg.sliding_window is None else (cfg.sliding_window - 1, 0)
            # Document masking: a dense (B, 1, T, T) mask, as both implementations take one (cuDNN
            # adds it as a bias); causality and the window are still applied by the kernel.
            same_segment_B1TT = None
            if segment_ids_BT is not None:
                same_segment_B1TT = (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]
            if cfg.attention == "auto" and causal_attention.usable(h, q_BTNH.dtype, segment_ids_BT is not None):
                o_BTNH = causal_attention.attention(q_BTNH, k_BTKH, v_BTKH, cfg.sliding_window or 0)
            else:
                o_BTNH = jax.nn.dot_product_attention(
                    q_BTNH, k_BTKH, v_BTKH, mask=same_segment_B1TT, is_causal=True, local_window_size=window,
                    implementation="xla" if cfg.attention == "auto" else cfg.attention,
                )  # fmt: skip
        elif segment_ids_BT is not None:
            raise InputError("segment ids apply to training windows, not to the cached path")
        elif cfg.decode_attention == "auto" and decode_attention.usable(h, cache.k_BKSH.dtype):
            o_BTNH, k_BKSH, v_BKSH = decode_attention.kernel(
                q_BTNH, k_BTKH, v_BTKH, cache.k_BKSH, cache.v_BKSH, positions_BT, cfg.sliding_window
            )
            cache, o_BTNH = KVCache(k_BKSH, v_BKSH), o_BTNH.astype(q_BTNH.dtype)
        else:
            rows_B1 = jnp.arange(x_BTD.shape[0])[:, None]
            cache = KVCache(  # index arrays around a slice: the update is laid out (B, T, K, H)
                cache.k_BKSH.at[rows_B1, :, positions_BT].set(k_BTKH.astype(cache.k_BKSH.dtype), mode="drop"),
                cache.v_BKSH.at[rows_B1, :, positions_BT].set(v_BTKH.astype(cache.v_BKSH.dtype), mode="drop"),
            )
            o_BTNH = cached_attention(q_BTNH, cache, positions_BT, cfg.sliding_window)
        out_BTD = Dense(
            (cfg.d_model,), ("heads", "head_dim", "embed"), cfg.use_bias, cfg.dtype, out_std, n_in=2, name="out"
        )(o_BTNH)
        return out_BTD, cache


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
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x)).

    Its signature is `nn.scan`'s: (carry x_BTD, positions broadcast, cache scanned over, segment ids and
    RoPE tables broadcast) -> (x_BTD, cache).
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        cache: KVCache | None = None,
        segment_ids_BT: jax.Array | None = None,
        rot: Rotary | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        attn = Attention(self.cfg, name="attn")
        attn_BTD, cache = attn(Norm(self.cfg, name="attn_norm")(x_BTD), positions_BT, cache, segment_ids_BT, rot)
        x_BTD = x_BTD + attn_BTD
        x_BTD = x_BTD + MLP(self.cfg, name="mlp")(Norm(self.cfg, name="mlp_norm")(x_BTD))
        return _constrain(x_BTD, ACT_BTD), cache


_REMAT_POLICIES = {  # save_dots: XLA's dots, and the CPU training matmuls' (few_row_matmul.dense, a custom VJP)
    "full": None,
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable,
        jax.checkpoint_policies.save_only_these_names(few_row_matmul.DENSE_OUTPUT),
    ),
}


class Transformer(nn.Module):
    """Token ids (B, T) -> float32 logits (B, T, V).

    With a `cache` (layout: `Cache`) it returns (logits, updated cache). `logits_at_B`
    (an index along T per row) keeps only those tokens' logits, (B, 1, V): a prefill needs just
    each prompt's last token, and skips the (B, T, V) output head; with `all_logits` too, the logits
    are the pair ((B, 1, V) at `logits_at_B`, (B, T, V) everywhere), the first computed exactly as
    without it (a scoring prefill samples from it, so it samples what a plain prefill samples).
    `segment_ids_BT` (document masking, no cache): tokens attend only within their segment; pass
    positions that restart at each segment with them.
    """

    cfg: ModelConfig

    @nn.compact
    def __call__(
        self,
        tokens_BT: jax.Array,
        positions_BT: jax.Array | None = None,
        cache: Cache | None = None,
        logits_at_B: jax.Array | None = None,
        segment_ids_BT: jax.Array | None = None,
        all_logits: bool = False,
    ) -> Any:
        cfg = self.cfg
        contiguous = positions_BT is None  # positions 0..T-1 in every row (training, scoring)
        if positions_BT is None:
            positions_BT = jnp.broadcast_to(jnp.arange(tokens_BT.shape[1]), tokens_BT.shape)
        embed_init = nn.initializers.normal(cfg.init_std)
        strip = few_row_matmul.strip_width(cfg.param_dtype)
        if embed_in_strips(cfg):  # jaxllm.decode_layout: the tied head's E^T as strips; the lookup gathers from them
            shape = (cfg.vocab_size // strip, cfg.d_model, strip)
            token_embed = _param(self, "token_embed", embed_init, shape, (None, None, None))
            x_BTD = token_embed[tokens_BT // strip, :, tokens_BT % strip]
        else:
            token_embed = _param(self, "token_embed", embed_init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"))
            # The table gathered over its embed dim before the lookup, as FSDP gathers every weight before
            # use: the lookup's gradient is then a scatter into a vocab-sharded table, which XLA partitions
            # without replicating the batch-sharded (b, t, d) updates.
            x_BTD = jnp.take(_constrain(token_embed, ("vocab", None)), tokens_BT, axis=0)
        if cfg.family == "gpt":
            pos_embed_TD = _param(
                self, "pos_embed", embed_init, (cfg.context_length, cfg.d_model), ("positions", "embed")
            )
            # A slice where positions are 0..T-1: its gradient is a sum over the batch, where a
            # lookup's is a scatter that XLA cannot partition without replicating (b, t, d) updates.
            # Other positions (decoding, document masking): a lookup in the table gathered over its embed
            # dim first, as the token embedding's.
            x_BTD = x_BTD + (
                pos_embed_TD[None, : tokens_BT.shape[1]]
                if contiguous
                else jnp.take(_constrain(pos_embed_TD, ("positions", None)), positions_BT, axis=0)
            )
        x_BTD = _constrain(x_BTD.astype(cfg.dtype), ACT_BTD)
        rot = rotary(cfg, positions_BT)
        block = Block
        if cfg.remat != "none":  # a scan's loop already keeps XLA from merging recomputation away
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=not cfg.scan_layers)
        if cfg.scan_layers:
            layers = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, 0, nn.broadcast, nn.broadcast),  # positions, cache, segment ids, RoPE
                length=cfg.n_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x_BTD, new_cache = layers(cfg, name="blocks")(x_BTD, positions_BT, cache, segment_ids_BT, rot)
        else:
            new_cache = []
            for i in range(cfg.n_layers):
                layer_cache = None if cache is None else cache[i]
                x_BTD, layer_cache = block(cfg, name=f"blocks_{i}")(
                    x_BTD, positions_BT, layer_cache, segment_ids_BT, rot
                )
                new_cache.append(layer_cache)
            new_cache = tuple(new_cache)
        final_norm = Norm(cfg, name="final_norm")
        lm_head = None if cfg.tie_embeddings else Dense(
            (cfg.vocab_size,), ("embed", "vocab"), False, cfg.dtype, cfg.init_std, name="lm_head"
        )  # fmt: skip

        def head(x_BTD: jax.Array) -> jax.Array:
            x_BTD = final_norm(x_BTD)
            if lm_head is not None:
                logits_BTV = lm_head(x_BTD)
            else:
                x_2d = x_BTD.reshape(-1, cfg.d_model)
                enabled = cfg.few_row_matmul == "auto"
                if embed_in_strips(cfg):
                    logits_2d = few_row_matmul.matmul_strips(x_2d, token_embed, cfg.dtype, enabled=enabled)
                else:
                    logits_2d = few_row_matmul.matmul(x_2d, token_embed, cfg.dtype, transposed=True, enabled=enabled)
                logits_BTV = logits_2d.reshape(*x_BTD.shape[:-1], -1)
            return _constrain(logits_BTV.astype(jnp.float32), ACT_BTV)

        if logits_at_B is None:
            logits = head(x_BTD)
        else:
            logits = head(jnp.take_along_axis(x_BTD, logits_at_B[:, None, None], axis=1))
            if all_logits:
                logits = (logits, head(x_BTD))
        return logits if cache is None else (logits, new_cache)


def embed_in_strips(cfg: ModelConfig) -> bool:
    """Whether `token_embed` is held as strips, (V/S, D, S) (`jaxllm.decode_layout`): in the strips layout,
    for a tied embedding whose vocabulary is a multiple of S. The output head then reads it as any Dense
    kernel in strips (E^T: the few-row kernel's fastest form, 2-2.5x the (V, D) form's at 8 to 32 rows
    and for bfloat16), and the lookup gathers each token's D values from it, without a second copy."""
    strip = few_row_matmul.strip_width(cfg.param_dtype)
    return cfg.kernel_layout == "strips" and cfg.tie_embeddings and cfg.vocab_size % strip == 0


# Pure functional API ---------------------------------------------------------------------------


def _boxed_init(cfg: ModelConfig, rng: jax.Array) -> Params:
    tokens = jnp.zeros((1, min(8, cfg.context_length)), jnp.int32)
    return Transformer(cfg).init(rng, tokens)["params"]


def init_params(cfg: ModelConfig, seed: int | jax.Array = 0) -> Params:
    """Fresh parameters (in `model.param_dtype`) as a plain pytree of arrays (no logical-axis boxes), in
    `cfg`'s layer layout. The same seed gives the same values with or without `scan_layers`."""
    rng = jax.random.key(seed) if isinstance(seed, int) else seed
    return to_layout(cfg, nn.unbox(_boxed_init(cfg.replace(scan_layers=False), rng)))


def abstract_params(cfg: ModelConfig) -> Params:
    """The parameter pytree as `jax.ShapeDtypeStruct`s, computed without allocating."""
    return nn.unbox(jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0))))


def logical_axes(cfg: ModelConfig) -> Params:
    """The parameter pytree with a `PartitionSpec` of logical axis names at each leaf."""
    return nn.get_partition_spec(jax.eval_shape(lambda: _boxed_init(cfg, jax.random.key(0))))


def count_params(cfg: ModelConfig) -> int:
    """Exact number of parameters (tied embeddings counted once), without allocating."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(abstract_params(cfg)))


def forward(
    cfg: ModelConfig,
    params: Params,
    tokens_BT: jax.Array,
    positions_BT: jax.Array | None = None,
    segment_ids_BT: jax.Array | None = None,
) -> jax.Array:
    """Float32 logits (B, T, V) for token ids (B, T). Pure; jit it with `cfg` static.

    Document masking: with `segment_ids_BT` (B, T) a token attends only to the earlier tokens of its
    own segment; `positions_BT` must then restart at each segment (both from
    `jaxllm.data.segments.segments_from_starts`), so each segment's logits are those of it run alone.
    Shapes are checked always; token values when they are concrete (outside `jit`).
    """
    check_tokens(cfg, tokens_BT)
    if segment_ids_BT is not None:
        if positions_BT is None:
            raise InputError("segment_ids_BT needs positions_BT restarting at each segment (segments_from_starts)")
        for name, x in (("segment_ids_BT", segment_ids_BT), ("positions_BT", positions_BT)):
            if np.shape(x) != np.shape(tokens_BT):
                raise InputError(f"{name} has shape {np.shape(x)}, the tokens {np.shape(tokens_BT)}")
    check_layout(cfg, params)
    return Transformer(cfg).apply({"params": params}, tokens_BT, positions_BT, None, None, segment_ids_BT)


def forward_cached(
    cfg: ModelConfig,
    params: Params,
    tokens_BT: jax.Array,
    positions_BT: jax.Array,
    cache: Cache,
    logits_at_B: jax.Array | None = None,
    all_logits: bool = False,
) -> tuple[Any, Cache]:
    """(float32 logits, updated cache) for tokens at explicit per-row positions. Pure; jit it.

    Writes each token's keys/values into `cache` at its position, then attends to the entries at
    positions <= its own (see the module docstring). Logits are (B, T, V), or (B, 1, V) at
    `logits_at_B`, or with `all_logits` the pair of both (`Transformer`). No value checks: the caller
    (the generation engine) validates its inputs.
    """
    check_layout(cfg, params)
    return Transformer(cfg).apply(
        {"params": params}, tokens_BT, positions_BT, cache, logits_at_B, all_logits=all_logits
    )


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


# Layer layouts: stacked (scan_layers) in memory, per-layer at every edge ----------------------------


def _is_stacked(params: Params) -> bool:
    return "blocks" in params


def to_per_layer(params: Params) -> Params:
    """Params with per-layer blocks (`blocks_0` … `blocks_{L-1}`), as files, exports and conversions
    hold them; per-layer params are returned as they are. Works under `jit` and on host arrays."""
    if not _is_stacked(params):
        return params
    stacked = params["blocks"]
    n_layers = jax.tree.leaves(stacked)[0].shape[0]
    rest = {k: v for k, v in params.items() if k != "blocks"}
    return {**rest, **{f"blocks_{i}": jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(n_layers)}}


def to_layout(cfg: ModelConfig, params: Params) -> Params:
    """Params (either layout) in the layout `cfg.scan_layers` asks for: stacked `blocks` (each leaf
    with a leading layer axis) when true, per-layer otherwise."""
    if not cfg.scan_layers:
        return to_per_layer(params)
    if _is_stacked(params):
        return params
    layers = [params[f"blocks_{i}"] for i in range(cfg.n_layers)]
    rest = {k: v for k, v in params.items() if not k.startswith("blocks_")}
    stack = np.stack if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(layers)) else jnp.stack
    return {**rest, "blocks": jax.tree.map(lambda *xs: stack(xs), *layers)}


def check_layout(cfg: ModelConfig, params: Params) -> None:
    """Raise `InputError` when `params`' layer layout is not the one `cfg.scan_layers` asks for."""
    if _is_stacked(params) != cfg.scan_layers:
        has = "stacked (blocks)" if _is_stacked(params) else "per-layer (blocks_0, …)"
        raise InputError(
            f"params are {has} but model.scan_layers={str(cfg.scan_layers).lower()}: "
            "convert them with jaxllm.model.to_layout(cfg, params)"
        )
