"""Sampling in PyTorch, in the order of `jaxllm/sampling.py` (its docstring is the definition):

1. temperature == 0: greedy argmax of the raw logits (first index on ties); 2-5 skipped.
2. Divide by the temperature.  3. top-k: keep logits >= the k-th largest.
4. top-p: over what 3 leaves (renormalised), keep tokens from the most likely down while the mass
   before each is < p; ties with the last kept logit are kept.  5. Sample from the softmax.

Settings are per row: tensors of shape (B,) (or Python numbers, for every row).
"""

from __future__ import annotations

import torch


def _per_row(x: float | int | torch.Tensor, b: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.as_tensor(x, dtype=dtype, device=device).expand(b)


def keep_mask(scaled_BV: torch.Tensor, top_k_B: torch.Tensor, top_p_B: torch.Tensor) -> torch.Tensor:
    """Steps 3-4: True for the tokens top-k then top-p keep, given temperature-scaled logits."""
    b, v = scaled_BV.shape
    top_k_B = _per_row(top_k_B, b, torch.long, scaled_BV.device)
    top_p_B = _per_row(top_p_B, b, torch.float32, scaled_BV.device)
    sorted_BV = torch.sort(scaled_BV, dim=-1, descending=True).values
    k_B = torch.where((top_k_B > 0) & (top_k_B < v), top_k_B, v)
    kth_B1 = sorted_BV.gather(-1, k_B[:, None] - 1)
    in_top_k_BV = sorted_BV >= kth_B1
    probs_BV = torch.softmax(sorted_BV.masked_fill(~in_top_k_BV, float("-inf")), dim=-1)
    mass_before_BV = probs_BV.cumsum(-1) - probs_BV
    p_B1 = top_p_B[:, None]
    kept_sorted_BV = in_top_k_BV & ((mass_before_BV < p_B1) | (p_B1 >= 1.0))
    n_kept_B1 = kept_sorted_BV.sum(-1, keepdim=True).clamp(min=1)
    threshold_B1 = sorted_BV.gather(-1, n_kept_B1 - 1)
    return scaled_BV >= threshold_B1


def filter_logits(logits_BV: torch.Tensor, temperature_B, top_k_B, top_p_B) -> torch.Tensor:
    """Steps 2-4: scaled logits with the filtered-out tokens at -inf (greedy rows scale by 1)."""
    b = logits_BV.shape[0]
    t_B = _per_row(temperature_B, b, torch.float32, logits_BV.device)
    scaled_BV = logits_BV.float() / torch.where(t_B > 0, t_B, 1.0)[:, None]
    return scaled_BV.masked_fill(~keep_mask(scaled_BV, top_k_B, top_p_B), float("-inf"))


def sample(
    logits_BV: torch.Tensor, temperature_B, top_k_B, top_p_B, generator: torch.Generator | None = None
) -> torch.Tensor:
    """One token per row (steps 1-5), drawn with `generator`."""
    b = logits_BV.shape[0]
    greedy_B = logits_BV.argmax(-1)
    t_B = _per_row(temperature_B, b, torch.float32, logits_BV.device)
    if not bool((t_B > 0).any()):
        return greedy_B
    probs_BV = torch.softmax(filter_logits(logits_BV, t_B, top_k_B, top_p_B), dim=-1)
    drawn_B = torch.multinomial(probs_BV, 1, generator=generator)[:, 0]
    return torch.where(t_B > 0, drawn_B, greedy_B)
