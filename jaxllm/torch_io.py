"""torch_ref state dicts as safetensors files: what torch_ref trains from (`--init`) and saves (`final/`).

The file holds the torch_ref parameter names and layouts (`jaxllm.convert`), float32, with the model
config as JSON in the safetensors metadata (key `jaxllm.model`), so a file alone says what it holds.
A tied output head is stored under both of its names, as `Transformer.state_dict()` lists it.

    jaxllm export-torch CKPT_DIR OUT.safetensors             # jaxllm params dir -> torch state dict
    jaxllm import-torch IN.safetensors OUT_DIR [--config C]  # torch state dict -> jaxllm params dir
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import InputError

CONFIG_METADATA_KEY = "jaxllm.model"
# Fields that describe numerics or implementation, not the weights: they may differ between the
# model a file was saved from and the model that loads it.
_NOT_ARCHITECTURE = {
    "name",
    "dtype",
    "attention",
    "few_row_matmul",
    "decode_attention",
    "remat",
    "init_std",
    "scan_layers",
}


def write_state_dict(path: str | Path, cfg: ModelConfig, state_dict: dict[str, np.ndarray]) -> Path:
    """Write a torch_ref-layout state dict (numpy arrays) to `path`, atomically (temp name + rename)."""
    from safetensors.numpy import save_file

    path = Path(path)
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in state_dict.items()}
    metadata = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg.to_dict())}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_state_dict(path: str | Path) -> tuple[ModelConfig | None, dict[str, np.ndarray]]:
    """(config from the metadata or None, float32 arrays by torch_ref name) from a safetensors file."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file (expected a .safetensors torch state dict)")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k).astype(np.float32) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise InputError(f"{path}: not a readable safetensors file: {err}") from None
    cfg = None
    if CONFIG_METADATA_KEY in metadata:
        cfg = ModelConfig.from_dict(json.loads(metadata[CONFIG_METADATA_KEY]), source=f"{path}: metadata")
    return cfg, tensors


def check_same_architecture(saved: ModelConfig, wanted: ModelConfig, what: str) -> None:
    """InputError naming the first field where the file's model and the wanted model differ."""
    for field, value in wanted.to_dict().items():
        if field not in _NOT_ARCHITECTURE and getattr(saved, field) != value:
            saved_value = getattr(saved, field)
            raise InputError(f"{what} holds a model with {field}={saved_value!r}, but the config has {value!r}")


def save_torch(path: str | Path, cfg: ModelConfig, params: Any) -> Path:
    """jaxllm params -> a torch_ref safetensors file."""
    from jaxllm.convert import to_numpy_state_dict

    return write_state_dict(path, cfg, to_numpy_state_dict(cfg, params))


def load_torch(path: str | Path, cfg: ModelConfig | None = None) -> tuple[ModelConfig, Any]:
    """(cfg, jaxllm params) from a torch_ref safetensors file; `cfg` is needed if the file has no metadata."""
    from jaxllm.convert import from_torch_state_dict

    saved, tensors = read_state_dict(path)
    if cfg is None and saved is None:
        raise InputError(f"{path} carries no model config in its metadata: pass --config")
    if cfg is not None and saved is not None:
        check_same_architecture(saved, cfg, str(path))
    cfg = cfg or saved
    return cfg, from_torch_state_dict(cfg, tensors)


def export_torch(ckpt_dir: str | Path, out_path: str | Path) -> ModelConfig:
    """`jaxllm export-torch`: a jaxllm params directory -> a torch_ref safetensors state dict."""
    from jaxllm.checkpoint import load_params

    out_path = Path(out_path)
    if out_path.exists():
        raise InputError(f"{out_path} already exists")
    cfg, params = load_params(ckpt_dir)
    save_torch(out_path, cfg, params)
    return cfg


def import_torch(in_path: str | Path, out_dir: str | Path, config: str | Path | None = None) -> ModelConfig:
    """`jaxllm import-torch`: a torch_ref safetensors state dict -> a jaxllm params directory.

    `config`: a preset or YAML file whose `model` section describes the weights (needed only when
    the file carries no config in its metadata; otherwise checked against it).
    """
    from jaxllm.checkpoint import save_params

    cfg = ModelConfig.load(config) if config is not None else None
    cfg, params = load_torch(in_path, cfg)
    save_params(out_dir, cfg, params)
    return cfg
