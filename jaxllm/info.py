"""`jaxllm info`: what a config builds, computed with `jax.eval_shape` (nothing is allocated)."""

from __future__ import annotations

import math
from typing import Any

import jax

from jaxllm.config import ModelConfig, flops_per_token, human_count
from jaxllm.model import abstract_params, logical_axes

FLOPS_FORMULA = "forward = 2*N_matmul + 4*n_layers*T*n_heads*head_dim; train = 3*forward (PaLM, App. B)"


def describe(preset_or_path: str) -> dict[str, Any]:
    cfg = ModelConfig.load(preset_or_path)
    shapes = abstract_params(cfg)
    axes = logical_axes(cfg)
    params = [
        {
            "name": "/".join(k.key for k in path),
            "shape": list(leaf.shape),
            "logical_axes": list(spec),
        }
        for (path, leaf), spec in zip(
            jax.tree_util.tree_leaves_with_path(shapes),
            jax.tree.leaves(axes, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
            strict=True,
        )
    ]
    return {
        "config": cfg.to_dict(),
        "n_params": sum(math.prod(p["shape"]) for p in params),
        "flops_per_token": flops_per_token(cfg),
        "flops_formula": FLOPS_FORMULA,
        "params": params,
    }


def format_description(desc: dict[str, Any]) -> str:
    cfg, flops = desc["config"], desc["flops_per_token"]
    lines = [
        f"{cfg['name']}: {cfg['family']}-style, {cfg['n_layers']} layers, d_model {cfg['d_model']}, "
        f"{cfg['n_heads']} heads ({cfg['n_kv_heads'] or cfg['n_heads']} kv), d_ff {cfg['d_ff']}, "
        f"vocab {cfg['vocab_size']}, context {cfg['context_length']}, "
        f"{'tied' if cfg['tie_embeddings'] else 'untied'} head, compute {cfg['dtype']}",
        f"parameters: {desc['n_params']:,} ({human_count(desc['n_params'])})",
        f"FLOPs per token at context {cfg['context_length']}: forward {human_count(flops['forward'])}, "
        f"train {human_count(flops['train'])}  [{desc['flops_formula']}]",
        "",
    ]
    width = max(len(p["name"]) for p in desc["params"])
    for p in desc["params"]:
        shape = "x".join(map(str, p["shape"]))
        axes = ", ".join(str(a) for a in p["logical_axes"])
        lines.append(f"  {p['name']:<{width}}  {shape:>12}  ({axes})")
    return "\n".join(lines)
