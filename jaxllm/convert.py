"""Lossless weight conversion between jaxllm params and torch_ref state dicts.

The two models use the same names (`blocks_0/attn/query/kernel` <-> `blocks.0.attn.query.weight`);
a Flax kernel (in..., out...) is a torch Linear weight (out, in) transposed and reshaped. Shapes on
each side come from the model definitions themselves, so nothing here restates an architecture.
torch_ref is always per-layer: stacked (`model.scan_layers`) params are unstacked on the way out and
stacked again on the way in (`jaxllm.model.to_per_layer` / `to_layout`).
"""

from __future__ import annotations

import math
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.decode_layout import require_dense
from jaxllm.errors import InputError
from jaxllm.model import Params, abstract_params, to_layout, to_per_layer

_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def torch_key(path: tuple[str, ...]) -> str:
    """('blocks_0', 'attn', 'query', 'kernel') -> 'blocks.0.attn.query.weight'."""
    *modules, leaf = path
    if not modules:  # a raw embedding table at the top level
        return f"{leaf}.weight"
    modules = [re.sub(r"^blocks_(\d+)$", r"blocks.\1", m) for m in modules]
    return ".".join([*modules, _LEAF_NAMES[leaf]])


def _flat(tree: Params) -> dict[tuple[str, ...], Any]:
    return {tuple(k.key for k in path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _unflat(flat: dict[tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return tree


def _per_layer_abstract(cfg: ModelConfig) -> dict[tuple[str, ...], Any]:
    return _flat(abstract_params(cfg.replace(scan_layers=False)))


def to_numpy_state_dict(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """torch_ref state-dict layout as float32 numpy arrays (tied head listed under both names)."""
    require_dense(cfg, "converted")
    abstract = _per_layer_abstract(cfg)
    flat = _flat(to_per_layer(params))
    _check_same_keys(set(flat), set(abstract), "params")
    out: dict[str, np.ndarray] = {}
    for path, leaf in flat.items():
        x = np.asarray(leaf, dtype=np.float32)
        if x.shape != abstract[path].shape:
            raise InputError(f"params/{'/'.join(path)}: shape {x.shape}, expected {abstract[path].shape}")
        if path[-1] == "kernel":
            n_in = x.ndim - (2 if path[-2] in ("query", "key", "value") else 1)
            x = x.reshape(int(np.prod(x.shape[:n_in])), -1).T
        elif path[-1] == "bias":  # (heads, head_dim) biases are flat in torch
            x = x.reshape(-1)
        out[torch_key(path)] = np.ascontiguousarray(x)
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["token_embed.weight"]
    return out


def torch_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """torch_ref parameter name -> shape for `cfg`, without allocating (the tied head listed too)."""
    out = {}
    for path, leaf in _per_layer_abstract(cfg).items():
        shape = tuple(leaf.shape)
        if path[-1] == "kernel":
            n_in = len(shape) - (2 if path[-2] in ("query", "key", "value") else 1)
            shape = (math.prod(shape[n_in:]), math.prod(shape[:n_in]))
        elif path[-1] == "bias":
            shape = (math.prod(shape),)
        out[torch_key(path)] = shape
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["token_embed.weight"]
    return out


def to_torch_state_dict(cfg: ModelConfig, params: Params) -> dict[str, Any]:
    """A state dict that `torch_ref.build_model(cfg).load_state_dict` accepts (strict)."""
    import torch

    return {k: torch.from_numpy(v.copy()) for k, v in to_numpy_state_dict(cfg, params).items()}


def from_torch_state_dict(cfg: ModelConfig, state_dict: dict[str, Any]) -> Params:
    """jaxllm params (in `cfg`'s layer layout) from a torch_ref state dict (torch tensors or numpy arrays)."""
    abstract = _per_layer_abstract(cfg)
    wanted = {torch_key(path): path for path in abstract}
    given = set(state_dict) - ({"lm_head.weight"} if cfg.tie_embeddings else set())
    _check_same_keys(given, set(wanted), "state dict")
    flat = {}
    for key, path in wanted.items():
        w = _to_numpy(state_dict[key])
        if path[-1] == "kernel":
            w = w.T
        if w.size != np.prod(abstract[path].shape):
            raise InputError(f"state dict {key!r}: shape {tuple(w.shape)} does not fit {abstract[path].shape}")
        flat[path] = jnp.asarray(w.reshape(abstract[path].shape), dtype=jnp.float32)
    return to_layout(cfg, _unflat(flat))


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().to("cpu").float().numpy()
    return np.asarray(x, dtype=np.float32)


def _check_same_keys(given: set, wanted: set, what: str) -> None:
    missing, unexpected = sorted(map(str, wanted - given)), sorted(map(str, given - wanted))
    if missing or unexpected:
        raise InputError(f"{what} does not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
