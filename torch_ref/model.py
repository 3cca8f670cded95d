"""The same transformer in PyTorch: the reference jaxllm must match.

Module and parameter names mirror `jaxllm/model.py` (`blocks.0.attn.query.weight` here is
`blocks_0/attn/query/kernel` there), so the two files read side by side and the weight conversion
is a renaming plus transposes. Shapes: B batch, T time, D d_model, N heads, K kv heads, H head_dim,
S cache length.

KV cache (as jaxllm's `forward_cached`): one `KVCache` per layer, kv heads only, entry s of row b
holding that row's token at position s; tokens are written at their own positions (updated in
place) and attend to the entries at positions <= their own, so rows advance independently. With a
`sliding_window` W, a query at position p attends to the keys at p - W + 1 .. p only (in both paths).
Document masking (no cache): with `segment_ids_BT`, a query attends only to keys of its own segment.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from jaxllm.config import ModelConfig
from jaxllm.rope import scaled_inv_freq

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class Norm(nn.Module):
    """LayerNorm with bias (GPT) or RMSNorm (Llama), computed in float32."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.family, self.eps = cfg.family, cfg.norm_eps
        self.weight = nn.Parameter(torch.ones(cfg.d_model))
        self.bias = nn.Parameter(torch.zeros(cfg.d_model)) if cfg.family == "gpt" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        if self.family == "gpt":
            y = F.layer_norm(x32, x32.shape[-1:], self.weight, self.bias, self.eps)
        else:
            y = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight
        return y.to(x.dtype)


def rope(
    x_BNTH: torch.Tensor, positions_BT: torch.Tensor, theta: float, inv_freq: torch.Tensor | None = None
) -> torch.Tensor:
    """Rotary position embedding, half-split convention (as Hugging Face Llama).

    `inv_freq`: the inverse frequencies (head_dim / 2,), e.g. scaled (`jaxllm.rope`); default plain RoPE.
    """
    h = x_BNTH.shape[-1]
    half = h // 2
    if inv_freq is None:
        inv_freq = 1.0 / theta ** (torch.arange(half, dtype=torch.float32, device=x_BNTH.device) * 2 / h)
    angle_BTh = positions_BT.float()[..., None] * inv_freq
    cos, sin = angle_BTh.cos()[:, None], angle_BTh.sin()[:, None]  # (B, 1, T, h)
    x = x_BNTH.float()
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x_BNTH.dtype)


class KVCache(NamedTuple):
    """One layer's key/value cache (updated in place): kv heads only, entry s = position s."""

    k_BKSH: torch.Tensor
    v_BKSH: torch.Tensor


def init_cache(cfg: ModelConfig, batch: int, length: int, device: str | torch.device = "cpu") -> list[KVCache]:
    """A zeroed cache of `length` positions for `batch` rows, in the compute dtype."""
    shape = (batch, cfg.kv_heads, length, cfg.dim_per_head)
    dtype = _DTYPES[cfg.dtype]
    return [
        KVCache(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(cfg.n_layers)
    ]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        n, k, h, d = cfg.n_heads, cfg.kv_heads, cfg.dim_per_head, cfg.d_model
        qkv_bias = cfg.use_bias or cfg.qkv_bias
        self.query = nn.Linear(d, n * h, bias=qkv_bias)
        self.key = nn.Linear(d, k * h, bias=qkv_bias)
        self.value = nn.Linear(d, k * h, bias=qkv_bias)
        self.out = nn.Linear(n * h, d, bias=cfg.use_bias)
        self.inv_freq = None if cfg.rope_scaling is None else torch.from_numpy(scaled_inv_freq(cfg))

    def forward(
        self,
        x_BTD: torch.Tensor,
        positions_BT: torch.Tensor,
        cache: KVCache | None = None,
        segment_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x_BTD.shape
        q_BNTH = self.query(x_BTD).view(b, t, cfg.n_heads, -1).transpose(1, 2)
        k_BKTH = self.key(x_BTD).view(b, t, cfg.kv_heads, -1).transpose(1, 2)
        v_BKTH = self.value(x_BTD).view(b, t, cfg.kv_heads, -1).transpose(1, 2)
        if cfg.family == "llama":
            inv_freq = None if self.inv_freq is None else self.inv_freq.to(x_BTD.device)
            q_BNTH = rope(q_BNTH, positions_BT, cfg.rope_theta, inv_freq)
            k_BKTH = rope(k_BKTH, positions_BT, cfg.rope_theta, inv_freq)
        if cache is None and cfg.sliding_window is None and segment_ids_BT is None:
            o_BNTH = F.scaled_dot_product_attention(
                q_BNTH, k_BKTH, v_BKTH, is_causal=True, enable_gqa=cfg.kv_heads != cfg.n_heads
            )
        elif cache is None:  # causal, within the sliding window and the query's own segment
            i_T = torch.arange(t, device=x_BTD.device)
            distance_TT = i_T[:, None] - i_T[None, :]
            mask_TT = distance_TT >= 0
            if cfg.sliding_window is not None:
                mask_TT = mask_TT & (distance_TT < cfg.sliding_window)
            if segment_ids_BT is not None:
                mask_TT = mask_TT & (segment_ids_BT[:, :, None] == segment_ids_BT[:, None, :])[:, None]  # (B, 1, T, T)
            o_BNTH = F.scaled_dot_product_attention(
                q_BNTH, k_BKTH, v_BKTH, attn_mask=mask_TT, enable_gqa=cfg.kv_heads != cfg.n_heads
            )
        elif segment_ids_BT is not None:
            raise ValueError("segment ids apply to training windows, not to the cached path")
        else:
            rows_B1 = torch.arange(b, device=x_BTD.device)[:, None]
            cache.k_BKSH[rows_B1, :, positions_BT] = k_BKTH.transpose(1, 2).to(cache.k_BKSH.dtype)
            cache.v_BKSH[rows_B1, :, positions_BT] = v_BKTH.transpose(1, 2).to(cache.v_BKSH.dtype)
            s = cache.k_BKSH.shape[2]
            entries_S = torch.arange(s, device=x_BTD.device)
            mask_BTS = entries_S <= positions_BT[:, :, None]
            if cfg.sliding_window is not None:
                mask_BTS = mask_BTS & (entries_S > positions_BT[:, :, None] - cfg.sliding_window)
            mask_B1TS = mask_BTS[:, None]
            o_BNTH = F.scaled_dot_product_attention(
                q_BNTH,
                cache.k_BKSH.to(q_BNTH.dtype),
                cache.v_BKSH.to(q_BNTH.dtype),
                attn_mask=mask_B1TS,
                enable_gqa=cfg.kv_heads != cfg.n_heads,
            )
        return self.out(o_BNTH.transpose(1, 2).reshape(b, t, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.family, self.tanh = cfg.family, cfg.gelu == "tanh"
        d, f, bias = cfg.d_model, cfg.d_ff, cfg.use_bias
        if cfg.family == "gpt":
            self.fc, self.proj = nn.Linear(d, f, bias=bias), nn.Linear(f, d, bias=bias)
        else:
            self.gate, self.up = nn.Linear(d, f, bias=bias), nn.Linear(d, f, bias=bias)
            self.down = nn.Linear(f, d, bias=bias)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if self.family == "gpt":
            return self.proj(F.gelu(self.fc(x_BTD), approximate="tanh" if self.tanh else "none"))
        return self.down(F.silu(self.gate(x_BTD)) * self.up(x_BTD))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm, self.attn = Norm(cfg), Attention(cfg)
        self.mlp_norm, self.mlp = Norm(cfg), MLP(cfg)

    def forward(
        self,
        x_BTD: torch.Tensor,
        positions_BT: torch.Tensor,
        cache: KVCache | None = None,
        segment_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), positions_BT, cache, segment_ids_BT)
        return x_BTD + self.mlp(self.mlp_norm(x_BTD))


class Transformer(nn.Module):
    """Token ids (B, T) -> float32 logits (B, T, V).

    With a `cache` (one `KVCache` per layer, updated in place) tokens sit at `positions_BT`;
    `logits_at_B` (an index along T per row) keeps only those tokens' logits, (B, 1, V).
    `segment_ids_BT` (document masking, no cache): attention within each segment; pass positions
    that restart at each segment with them (as jaxllm's `forward`).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.token_embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        if cfg.family == "gpt":
            self.pos_embed = nn.Embedding(cfg.context_length, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.final_norm = Norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embed.weight
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2 init, as jaxllm: N(0, std) weights, residual outputs scaled by 1/sqrt(2 L), zero biases."""
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim == 1:
                p.fill_(1.0)
            else:
                residual_out = name.endswith(("attn.out.weight", "mlp.proj.weight", "mlp.down.weight"))
                p.normal_(0.0, out_std if residual_out else std)

    def forward(
        self,
        tokens_BT: torch.Tensor,
        positions_BT: torch.Tensor | None = None,
        cache: list[KVCache] | None = None,
        logits_at_B: torch.Tensor | None = None,
        segment_ids_BT: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cfg = self.cfg
        b, t = tokens_BT.shape
        if t > cfg.context_length:
            raise ValueError(f"sequence length {t} exceeds the context length {cfg.context_length}")
        if segment_ids_BT is not None and positions_BT is None:
            raise ValueError("segment_ids_BT needs positions_BT restarting at each segment (segments_from_starts)")
        if positions_BT is None:
            positions_BT = torch.arange(t, device=tokens_BT.device).expand(b, t)
        x_BTD = self.token_embed(tokens_BT)
        if cfg.family == "gpt":
            x_BTD = x_BTD + self.pos_embed(positions_BT)
        x_BTD = x_BTD.to(_DTYPES[cfg.dtype])
        with torch.autocast(x_BTD.device.type, _DTYPES[cfg.dtype], enabled=cfg.dtype != "float32"):
            for i, block in enumerate(self.blocks):
                x_BTD = block(x_BTD, positions_BT, None if cache is None else cache[i], segment_ids_BT)
            if logits_at_B is not None:
                x_BTD = x_BTD[torch.arange(b, device=x_BTD.device), logits_at_B][:, None]
            x_BTD = self.final_norm(x_BTD)
            logits_BTV = self.lm_head(x_BTD)
        return logits_BTV.float()


def build_model(cfg: ModelConfig, device: str | torch.device = "cpu") -> Transformer:
    """The reference model for `cfg` (float32 parameters, compute in `cfg.dtype`)."""
    return Transformer(cfg).to(device)
