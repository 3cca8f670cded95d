"""Hugging Face GPT-2 interop: a directory with `config.json` + `model.safetensors`.

Reads and writes the files directly (no `transformers` needed at run time), in the layout that
`GPT2LMHeadModel.save_pretrained` writes and `from_pretrained` reads. GPT-family configs only.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.checkpoint import load_params, save_params
from jaxllm.config import ModelConfig
from jaxllm.convert import from_torch_state_dict, to_numpy_state_dict
from jaxllm.errors import InputError
from jaxllm.model import Params

CONFIG_JSON = "config.json"
WEIGHTS = "model.safetensors"
_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "exact"}
_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers some GPT-2 files carry

# HF GPT-2 module names <-> torch_ref module names, per block and at the top.
_BLOCK_NAMES = {
    "ln_1": "attn_norm",
    "ln_2": "mlp_norm",
    "attn.c_proj": "attn.out",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}
_TOP_NAMES = {"wte": "token_embed", "wpe": "pos_embed", "ln_f": "final_norm"}


def config_from_hf(hf: dict[str, Any], name: str = "hf-gpt2") -> ModelConfig:
    """A ModelConfig from a GPT-2 `config.json` mapping; unsupported variants are refused."""
    if hf.get("model_type") != "gpt2":
        raise InputError(f"{CONFIG_JSON}: model_type {hf.get('model_type')!r} is not supported (only 'gpt2')")
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU:
        raise InputError(f"{CONFIG_JSON}: activation_function {act!r} is not supported ({sorted(_GELU)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise InputError(f"{CONFIG_JSON}: {flag}=true is not supported")
    if hf.get("scale_attn_weights") is False:
        raise InputError(f"{CONFIG_JSON}: scale_attn_weights=false is not supported")
    d = hf["n_embd"]
    return ModelConfig(
        name=name,
        family="gpt",
        vocab_size=hf["vocab_size"],
        context_length=hf.get("n_positions", hf.get("n_ctx", 1024)),
        d_model=d,
        n_layers=hf["n_layer"],
        n_heads=hf["n_head"],
        d_ff=hf.get("n_inner") or 4 * d,
        gelu=_GELU[act],
        tie_embeddings=hf.get("tie_word_embeddings", True),
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        init_std=hf.get("initializer_range", 0.02),
    )


def config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    _require_gpt2_shape(cfg)
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": cfg.d_ff,
        "activation_function": "gelu_new" if cfg.gelu == "tanh" else "gelu",
        "layer_norm_epsilon": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": 0.0,
        "embd_pdrop": 0.0,
        "attn_pdrop": 0.0,
    }


def _require_gpt2_shape(cfg: ModelConfig) -> None:
    if cfg.family != "gpt" or cfg.kv_heads != cfg.n_heads or cfg.dim_per_head * cfg.n_heads != cfg.d_model:
        raise InputError(
            f"config {cfg.name!r} is not a GPT-2 architecture (needs family gpt, multi-head attention, "
            "n_heads * head_dim == d_model); Hugging Face export supports GPT-2 only"
        )


def params_from_hf(cfg: ModelConfig, tensors: dict[str, np.ndarray]) -> Params:
    """jaxllm params from GPT-2 tensors (Conv1D weights are stored (in, out))."""
    sd: dict[str, np.ndarray] = {}
    for key, w in tensors.items():
        key = key.removeprefix("transformer.")
        if key.endswith(_BUFFERS):
            continue
        if key == "lm_head.weight":
            if not cfg.tie_embeddings:
                sd[key] = w
            continue
        parts = key.split(".")
        if parts[0] == "h":  # h.{i}.{module...}.{weight|bias}
            i, module, leaf = parts[1], ".".join(parts[2:-1]), parts[-1]
            if module == "attn.c_attn":
                for name, chunk in zip(("query", "key", "value"), np.split(w, 3, axis=-1), strict=True):
                    sd[f"blocks.{i}.attn.{name}.{leaf}"] = chunk.T if leaf == "weight" else chunk
                continue
            if module not in _BLOCK_NAMES:
                raise InputError(f"{WEIGHTS}: unexpected tensor {key!r}")
            conv1d = module != "ln_1" and module != "ln_2" and leaf == "weight"
            sd[f"blocks.{i}.{_BLOCK_NAMES[module]}.{leaf}"] = w.T if conv1d else w
        elif parts[0] in _TOP_NAMES:
            sd[f"{_TOP_NAMES[parts[0]]}.{parts[1]}"] = w
        else:
            raise InputError(f"{WEIGHTS}: unexpected tensor {key!r}")
    return from_torch_state_dict(cfg, sd)


def params_to_hf(cfg: ModelConfig, params: Params) -> dict[str, np.ndarray]:
    """GPT-2 tensors named as `GPT2LMHeadModel.save_pretrained` names them."""
    _require_gpt2_shape(cfg)
    sd = to_numpy_state_dict(cfg, params)
    inverse_block = {v: k for k, v in _BLOCK_NAMES.items()}
    inverse_top = {v: k for k, v in _TOP_NAMES.items()}
    out: dict[str, np.ndarray] = {}
    for i in range(cfg.n_layers):
        p = f"blocks.{i}."
        for leaf in ("weight", "bias"):
            qkv = [sd.pop(f"{p}attn.{n}.{leaf}") for n in ("query", "key", "value")]
            out[f"transformer.h.{i}.attn.c_attn.{leaf}"] = np.concatenate(
                [w.T for w in qkv] if leaf == "weight" else qkv, axis=-1
            )
    for key, w in sd.items():
        module, leaf = key.rsplit(".", 1)
        if module.startswith("blocks."):
            _, i, rest = module.split(".", 2)
            conv1d = rest in ("attn.out", "mlp.fc", "mlp.proj") and leaf == "weight"
            out[f"transformer.h.{i}.{inverse_block[rest]}.{leaf}"] = w.T if conv1d else w
        elif module == "lm_head":
            if not cfg.tie_embeddings:
                out[key] = w
        else:
            out[f"transformer.{inverse_top[module]}.{leaf}"] = w
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def read_hf_dir(hf_dir: str | Path) -> tuple[ModelConfig, Params]:
    from safetensors.numpy import load_file

    hf_dir = Path(hf_dir)
    for name in (CONFIG_JSON, WEIGHTS):
        if not (hf_dir / name).is_file():
            raise InputError(f"{hf_dir}: missing {name} (expected a Hugging Face GPT-2 directory)")
    try:
        hf = json.loads((hf_dir / CONFIG_JSON).read_text())
    except json.JSONDecodeError as err:
        raise InputError(f"{hf_dir / CONFIG_JSON}: not valid JSON: {err}") from None
    cfg = config_from_hf(hf, name=hf_dir.name)
    return cfg, params_from_hf(cfg, load_file(str(hf_dir / WEIGHTS)))


def write_hf_dir(out_dir: str | Path, cfg: ModelConfig, params: Params) -> Path:
    """Write config.json + model.safetensors into a new directory, renamed into place last."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already exists and is not empty")
    tensors, hf = params_to_hf(cfg, params), config_to_hf(cfg)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    (tmp / CONFIG_JSON).write_text(json.dumps(hf, indent=2) + "\n")
    if out_dir.exists():
        out_dir.rmdir()
    tmp.rename(out_dir)
    return out_dir


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> ModelConfig:
    """`jaxllm import-hf`: a Hugging Face GPT-2 directory -> a jaxllm params directory."""
    cfg, params = read_hf_dir(hf_dir)
    save_params(out_dir, cfg, params)
    return cfg


def export_hf(ckpt_dir: str | Path, out_dir: str | Path) -> ModelConfig:
    """`jaxllm export-hf`: a jaxllm params directory -> a Hugging Face GPT-2 directory."""
    cfg, params = load_params(ckpt_dir)
    write_hf_dir(out_dir, cfg, params)
    return cfg
