"""A params directory: `config.yaml` (the model section) beside an orbax checkpoint in `params/`.

Written under a temporary name and renamed last, so an interrupted save never leaves a directory
that looks complete. `load_params` restores onto given shardings, or onto the default device.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from jaxllm.config import ModelConfig
from jaxllm.errors import ConfigError, InputError
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


def params_sha256(path: str | Path) -> str:
    """sha256 over a params directory's `params/` files (relative names and bytes, in name order)."""
    root = Path(path) / PARAMS_DIR
    h = hashlib.sha256()
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(file.relative_to(root)).encode() + b"\0")
        with file.open("rb") as f:
            while chunk := f.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


@dataclass
class Base:
    """Weights a run starts from (`jaxllm train --init CK`); with LoRA, the frozen base."""

    path: Path
    sha256: str
    params: Params
    shardings: Any

    def record(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}


def load_base(path: str | Path, cfg: ModelConfig, shardings: Any) -> Base:
    """The params directory `path` restored onto `shardings`, refused unless its shapes are `cfg`'s."""
    path = Path(path).absolute()
    if not (path / CONFIG_FILE).is_file():
        raise InputError(f"{path} is not a jaxllm params directory (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    theirs = ModelConfig.from_yaml(path / CONFIG_FILE)
    shape = lambda c: jax.tree.map(lambda x: (x.shape, x.dtype), abstract_params(c))  # noqa: E731
    if shape(theirs) != shape(cfg):
        raise ConfigError(f"{path}: its parameter shapes are not those of the config's model section")
    _, params = load_params(path, shardings)
    return Base(path, params_sha256(path), params, shardings)


def check_base(recorded: dict[str, str], base: Base, checkpoint: Path) -> None:
    """Refuse to resume adapters on other base weights than they were trained on (compared by hash)."""
    if recorded.get("sha256") != base.sha256:
        raise InputError(
            f"cannot resume {checkpoint}: it was trained on base {recorded.get('path')} "
            f"(sha256 {str(recorded.get('sha256'))[:12]}), but --init gives {base.path} (sha256 {base.sha256[:12]})"
        )
