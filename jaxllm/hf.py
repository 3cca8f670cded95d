"""Hugging Face interop for GPT-2 and the Llama family (llama, qwen2, mistral).

`read_hf_dir` reads a model directory (`config.json`, `model.safetensors` or a sharded
`model.safetensors.index.json`, tokenizer/generation files) into a `jaxllm.pretrained.HFCheckpoint`;
`import_checkpoint` turns any `HFCheckpoint` (from this reader or the GGUF one) into a jaxllm params
directory; `export_hf` writes a params directory back as a directory `from_pretrained` loads.
Reads and writes the files directly: no `transformers` at run time. Per-family config and tensor
names: `jaxllm/hf_families.py`. Every refusal is an `InputError` raised before anything is written.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.checkpoint import load_params, save_params
from jaxllm.config import ModelConfig
from jaxllm.convert import from_torch_state_dict, to_numpy_state_dict, torch_shapes
from jaxllm.errors import InputError
from jaxllm.hf_families import (
    CONFIG_JSON,
    check_exportable,
    config_from_hf,
    config_to_hf,
    default_model_type,
    from_hf_tensors,
    to_hf_tensors,
)
from jaxllm.model import Params
from jaxllm.pretrained import KEPT_FILES, SOURCE_FILE, HFCheckpoint

WEIGHTS = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"


# Reading ----------------------------------------------------------------------------------------


def read_hf_dir(hf_dir: str | Path) -> HFCheckpoint:
    """A Hugging Face model directory in memory: config.json, every weight as float32, the KEPT_FILES present."""
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        raise InputError(f"{hf_dir}: not a directory (expected a Hugging Face model directory)")
    if not (hf_dir / CONFIG_JSON).is_file():
        raise InputError(f"{hf_dir}: missing {CONFIG_JSON} (expected a Hugging Face model directory)")
    config = _read_json(hf_dir / CONFIG_JSON)
    if (hf_dir / WEIGHTS).is_file():
        tensors = _read_safetensors(hf_dir / WEIGHTS)
    elif (hf_dir / WEIGHTS_INDEX).is_file():
        tensors = _read_sharded(hf_dir, _read_json(hf_dir / WEIGHTS_INDEX))
    else:
        raise InputError(f"{hf_dir}: missing {WEIGHTS} (or a sharded {WEIGHTS_INDEX})")
    files = {name: (hf_dir / name).read_bytes() for name in KEPT_FILES if (hf_dir / name).is_file()}
    return HFCheckpoint(config=config, tensors=tensors, files=files, source=str(hf_dir.absolute()), source_format="hf")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: not valid JSON: {err}") from None


def _read_sharded(hf_dir: Path, index: Any) -> dict[str, np.ndarray]:
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{hf_dir / WEIGHTS_INDEX}: no 'weight_map' of tensor names to shard files")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if not (hf_dir / shard).is_file():
            raise InputError(f"{hf_dir / WEIGHTS_INDEX}: names shard {shard!r}, which is missing from {hf_dir}")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        for name, w in _read_safetensors(hf_dir / shard).items():
            if weight_map.get(name) == shard:
                tensors[name] = w
    missing = sorted(set(weight_map) - set(tensors))
    if missing:
        shard = weight_map[missing[0]]
        raise InputError(f"{hf_dir / WEIGHTS_INDEX}: tensor {missing[0]!r} is not in its shard {shard!r}")
    return tensors


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors file as float32 numpy (bf16 and fp16 widened exactly), via torch."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            out = {}
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                t = f.get_tensor(name)
                if not t.is_floating_point():
                    raise InputError(f"{path}: tensor {name!r} has dtype {t.dtype}, expected a float type")
                out[name] = t.float().numpy()
            return out
    except InputError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        raise InputError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None


# Import -----------------------------------------------------------------------------------------


def checkpoint_to_params(ckpt: HFCheckpoint) -> tuple[ModelConfig, Params, str]:
    """(cfg, params, model_type) from an `HFCheckpoint`, checking every tensor against the config."""
    name = Path(ckpt.source).stem if ckpt.source else "hf"
    cfg, model_type = config_from_hf(ckpt.config, name=name or "hf")
    source = f"{ckpt.source or 'checkpoint'} weights"
    sd = from_hf_tensors(model_type, ckpt.tensors, torch_shapes(cfg), cfg.tie_embeddings, source)
    return cfg, from_torch_state_dict(cfg, sd), model_type


def import_checkpoint(ckpt: HFCheckpoint, out_dir: str | Path) -> ModelConfig:
    """Write `ckpt` as a jaxllm params directory at `out_dir` (atomically), with its files and source.json."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise InputError(f"{out_dir} already exists")
    cfg, params, model_type = checkpoint_to_params(ckpt)
    source = {"format": ckpt.source_format, "path": ckpt.source, "model_type": model_type}
    with tempfile.TemporaryDirectory() as tmp:
        extra = []
        for file_name, content in {**ckpt.files, SOURCE_FILE: (json.dumps(source, indent=2) + "\n").encode()}.items():
            if Path(file_name).name != file_name:
                raise InputError(f"checkpoint file name {file_name!r} is not a plain file name")
            (Path(tmp) / file_name).write_bytes(content)
            extra.append(Path(tmp) / file_name)
        save_params(out_dir, cfg, params, extra_files=extra)
    return cfg


def import_hf(hf_dir: str | Path, out_dir: str | Path) -> ModelConfig:
    """`jaxllm import-hf`: a Hugging Face model directory -> a jaxllm params directory."""
    if Path(out_dir).exists():
        raise InputError(f"{out_dir} already exists")
    return import_checkpoint(read_hf_dir(hf_dir), out_dir)


def model_type_of(ckpt_dir: str | Path, cfg: ModelConfig) -> str:
    """The model_type recorded in a params directory's source.json, else the one `cfg` implies."""
    path = Path(ckpt_dir) / SOURCE_FILE
    if path.is_file():
        model_type = _read_json(path).get("model_type")
        if model_type:
            return model_type
    return default_model_type(cfg)


# Export -----------------------------------------------------------------------------------------


def export_hf(ckpt_dir: str | Path, out_dir: str | Path) -> ModelConfig:
    """`jaxllm export-hf`: a params directory -> config.json, model.safetensors and the kept files."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already exists and is not empty")
    cfg, params = load_params(ckpt_dir)
    model_type = model_type_of(ckpt_dir, cfg)
    check_exportable(cfg, model_type)
    files = [Path(ckpt_dir) / name for name in KEPT_FILES if (Path(ckpt_dir) / name).is_file()]
    write_hf_dir(out_dir, cfg, params, model_type, files)
    return cfg


def write_hf_dir(
    out_dir: str | Path, cfg: ModelConfig, params: Params, model_type: str | None = None, files: Any = ()
) -> Path:
    """Write config.json + model.safetensors (+ `files`) into a new directory, renamed into place last."""
    from safetensors.numpy import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir} already exists and is not empty")
    model_type = model_type or default_model_type(cfg)
    hf = config_to_hf(cfg, model_type)
    tensors = to_hf_tensors(model_type, to_numpy_state_dict(cfg, params), cfg.tie_embeddings)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        (tmp / CONFIG_JSON).write_text(json.dumps(hf, indent=2) + "\n")
        for file in files:
            shutil.copy2(file, tmp / Path(file).name)
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
