"""A params directory: `config.yaml` (the model section) beside an orbax checkpoint in `params/`.

Written under a temporary name and renamed last, so an interrupted save never leaves a directory
that looks complete. `load_params` restores onto given shardings, or onto the default device.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.model import Params, abstract_params

CONFIG_FILE = "config.yaml"
PARAMS_DIR = "params"


def save_params(
    path: str | Path,
    cfg: ModelConfig,
    params: Params,
    *,
    overwrite: bool = False,
    extra_files: Sequence[str | Path] = (),
) -> Path:
    """Write `cfg` and `params` to the directory `path` atomically; returns the absolute path.

    `extra_files` (e.g. the tokenizer.json) are copied in before the directory is renamed into place.
    Every JAX process must call it (orbax writes sharded arrays collectively).
    """
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists (pass overwrite=True to replace it)")
    tmp = path.with_name(f".{path.name}.tmp")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(tmp / PARAMS_DIR, params)
    checkpointer.wait_until_finished()
    if jax.process_index() == 0:
        (tmp / CONFIG_FILE).write_text(yaml.safe_dump({"model": cfg.to_dict()}, sort_keys=False))
        for file in extra_files:
            shutil.copy2(file, tmp / Path(file).name)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    return path


def load_params(path: str | Path, shardings: Any = None) -> tuple[ModelConfig, Params]:
    """(cfg, params) from a directory written by `save_params`.

    `shardings`: optional pytree of `jax.sharding.Sharding` matching the params, to restore each
    array directly onto its devices; by default arrays land on the default device.
    """
    path = Path(path).absolute()
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise InputError(f"{path} is not a jaxllm params directory (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    cfg = ModelConfig.from_yaml(path / CONFIG_FILE)
    target = abstract_params(cfg)
    if shardings is None:  # not the saving run's topology (which may have had other devices or hosts)
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    return cfg, params


def with_dtype(cfg: ModelConfig, params: Params, dtype: str | None) -> tuple[ModelConfig, Params]:
    """`--dtype` of `jaxllm generate` / `serve`: (cfg, params) with weights and computation in `dtype`.

    Sets both `model.param_dtype` (the parameters are cast, e.g. float32 -> bfloat16: half the bytes
    a decode step reads) and `model.dtype` (activations and the KV cache); norms, softmax and the
    logits stay float32 as always. None: unchanged.
    """
    if dtype is None:
        return cfg, params
    if dtype not in ("float32", "bfloat16"):
        raise InputError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    params = jax.tree.map(lambda x: x.astype(dtype), params)
    return cfg.replace(param_dtype=dtype, dtype=dtype), params
