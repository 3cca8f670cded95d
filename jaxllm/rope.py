"""RoPE inverse frequencies with optional scaling, as transformers' `modeling_rope_utils` computes them.

Numpy only, shared by jaxllm/model.py and torch_ref/model.py so both frameworks rotate by the same
angles. Plain RoPE (`rope_scaling` None) is computed inside each framework as before; this module
is used when a scaling is configured.
"""

from __future__ import annotations

import math

import numpy as np

from jaxllm.config import LinearRopeScaling, Llama3RopeScaling, ModelConfig


def scaled_inv_freq(cfg: ModelConfig) -> np.ndarray:
    """float32 (head_dim / 2,) inverse frequencies for `cfg.rope_scaling` (must not be None).

    linear: inv_freq / factor. llama3: wavelengths 2*pi/inv_freq longer than
    original_max_position_embeddings / low_freq_factor are divided by factor, those shorter than
    original_max_position_embeddings / high_freq_factor kept, and the band between interpolated
    smoothly (transformers `_compute_llama3_parameters`).
    """
    scaling = cfg.rope_scaling
    h = cfg.dim_per_head
    inv_freq = 1.0 / cfg.rope_theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    if isinstance(scaling, LinearRopeScaling):
        return (inv_freq / scaling.factor).astype(np.float32)
    if isinstance(scaling, Llama3RopeScaling):
        old_len = scaling.original_max_position_embeddings
        low_wavelen = old_len / scaling.low_freq_factor
        high_wavelen = old_len / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        smooth = (old_len / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
        smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)
    raise ValueError(f"no rope scaling configured in {cfg.name!r}")
