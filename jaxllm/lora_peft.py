"""LoRA adapters as a Hugging Face peft adapter directory (`train.lora_merge=false`).

`adapter_config.json` + `adapter_model.safetensors`, named for the transformers model `jaxllm export-hf`
writes of the base: `PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(HF_BASE), DIR)`.
peft's lora_A.weight is (R, in) and lora_B.weight (out, R): jaxllm's A and B transposed, with the
kernel's in and out dims flattened in the order `jaxllm/convert.py` flattens the kernels themselves.

GPT-2 fuses query, key and value into one `c_attn` module: their adapters become one adapter of rank
3R (A stacked, B block-diagonal, zeros for an untargeted projection), whose alpha is 3·lora_alpha so
that peft's scaling alpha / rank stays lora_alpha / R.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxllm.config import ModelConfig, TrainConfig
from jaxllm.hf_families import default_model_type, hf_name
from jaxllm.model import Params, to_per_layer

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."


def peft_tensors(mcfg: ModelConfig, adapters: Params) -> tuple[dict[str, np.ndarray], str]:
    """({peft tensor name: array}, model_type) for a host copy of the adapters (either layer layout)."""
    model_type = default_model_type(mcfg)
    out: dict[str, np.ndarray] = {}
    for block, layers in to_per_layer(adapters).items():
        i = int(block.removeprefix("blocks_"))
        fused: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for part, names in layers.items():
            for name, ad in names.items():
                a, b = np.asarray(ad["lora_a"]), np.asarray(ad["lora_b"])
                r = a.shape[-1]
                a_rin, b_outr = a.reshape(-1, r).T, b.reshape(r, -1).T
                if model_type == "gpt2" and name in ("query", "key", "value"):
                    fused[name] = (a_rin, b_outr)
                    continue
                module = hf_name(model_type, f"blocks.{i}.{part}.{name}.weight").removesuffix(".weight")
                out[f"{PREFIX}{module}.lora_A.weight"] = a_rin
                out[f"{PREFIX}{module}.lora_B.weight"] = b_outr
        if fused:
            out.update(_fused_qkv(mcfg, i, fused))
    return {k: np.ascontiguousarray(v, np.float32) for k, v in out.items()}, model_type


def _fused_qkv(mcfg: ModelConfig, i: int, parts: dict[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, np.ndarray]:
    r = next(iter(parts.values()))[0].shape[0]
    d = mcfg.d_model
    a_3rD = np.zeros((3 * r, d), np.float32)
    b_3D3r = np.zeros((3 * d, 3 * r), np.float32)
    for j, name in enumerate(("query", "key", "value")):
        if name in parts:
            a_3rD[j * r : (j + 1) * r] = parts[name][0]
            b_3D3r[j * d : (j + 1) * d, j * r : (j + 1) * r] = parts[name][1]
    module = f"{PREFIX}transformer.h.{i}.attn.c_attn"
    return {f"{module}.lora_A.weight": a_3rD, f"{module}.lora_B.weight": b_3D3r}


def adapter_config(tcfg: TrainConfig, tensors: dict[str, np.ndarray], model_type: str, base: str) -> dict[str, Any]:
    modules = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in tensors})
    fused = [m for m in modules if m.endswith(".c_attn")]
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "r": tcfg.lora_rank,
        "lora_alpha": tcfg.lora_alpha,
        "lora_dropout": tcfg.lora_dropout,
        "target_modules": modules,
        "rank_pattern": {m: 3 * tcfg.lora_rank for m in fused},
        "alpha_pattern": {m: 3 * tcfg.lora_alpha for m in fused},
        "fan_in_fan_out": model_type == "gpt2",  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "use_rslora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
    }


def write_peft_adapter(
    out_dir: str | Path, mcfg: ModelConfig, tcfg: TrainConfig, adapters: Params, base: str | Path, is_main: bool = True
) -> Path:
    """Write the adapters as a peft adapter directory (temporary name, renamed into place); its path."""
    from jax.experimental import multihost_utils
    from safetensors.numpy import save_file

    out_dir = Path(out_dir).absolute()
    if jax.process_count() > 1:
        host = multihost_utils.process_allgather(adapters, tiled=True)
    else:
        host = jax.device_get(adapters)
    if not is_main:
        return out_dir
    tensors, model_type = peft_tensors(mcfg, host)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    config = adapter_config(tcfg, tensors, model_type, str(base))
    (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return out_dir
