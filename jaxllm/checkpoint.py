"""A params directory: `config.yaml` (the model section) beside an orbax checkpoint in `params/`.

Written under a temporary name and renamed last, so an interrupted save never leaves a directory
that looks complete. `load_params` restores onto given shardings, or onto the default device;
`load_params_on_mesh` onto a mesh given as `mesh.*=` overrides, as `jaxllm train` takes them.
The files are per-layer (`blocks_0`, …) whatever `model.scan_layers` says: params are unstacked
to save and stacked again on load (`jaxllm.model.to_per_layer` / `to_layout`).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
import yaml

from jaxllm.config import INFERENCE_DTYPES, Config, ModelConfig
from jaxllm.decode_layout import require_dense
from jaxllm.errors import ConfigError, InputError
from jaxllm.model import Params, abstract_params, to_layout, to_per_layer

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
    require_dense(cfg, "saved")
    path = Path(path).absolute()
    if path.exists() and not overwrite:
        raise InputError(f"{path} already exists (pass overwrite=True to replace it)")
    tmp = path.with_name(f".{path.name}.tmp")
    if jax.process_index() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    checkpointer = ocp.StandardCheckpointer()
    if cfg.scan_layers:  # one program (on every process) slices the stacked layers apart
        params = jax.jit(to_per_layer)(params)
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


def load_params(
    path: str | Path, shardings: Any = None, scan_layers: bool | None = None
) -> tuple[ModelConfig, Params]:
    """(cfg, params) from a directory written by `save_params`, in `cfg`'s layer layout.

    `shardings`: optional pytree of `jax.sharding.Sharding` matching the params (in that layout), to
    restore each array directly onto its devices; by default arrays land on the default device.
    `scan_layers`: the layout wanted (it is set in the returned cfg); default: the directory's config.
    """
    path = _params_dir(path)
    cfg = ModelConfig.from_yaml(path / CONFIG_FILE)
    if scan_layers is not None:
        cfg = cfg.replace(scan_layers=scan_layers)
    target = abstract_params(cfg.replace(scan_layers=False))  # the files' layout
    stacked_shardings = shardings if cfg.scan_layers else None
    if shardings is None:  # not the saving run's topology (which may have had other devices or hosts)
        shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), target)
    elif cfg.scan_layers:  # each layer restored as its stacked array's slice is placed
        shardings = _per_layer_shardings(cfg, shardings)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    params = ocp.StandardCheckpointer().restore(path / PARAMS_DIR, target)
    if cfg.scan_layers:
        params = jax.jit(lambda p: to_layout(cfg, p), out_shardings=stacked_shardings)(params)
    return cfg, params


def _per_layer_shardings(cfg: ModelConfig, shardings: Params) -> Params:
    """The files' (per-layer) shardings from stacked ones: each layer placed as its slice of the stack."""

    def drop_layer_axis(s: Any) -> Any:
        if isinstance(s, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[1:]))
        return s

    one_layer = jax.tree.map(drop_layer_axis, shardings["blocks"])
    rest = {k: v for k, v in shardings.items() if k != "blocks"}
    return {**rest, **{f"blocks_{i}": one_layer for i in range(cfg.n_layers)}}


def load_params_on_mesh(
    path: str | Path, mesh_overrides: Sequence[str] = (), dtype: str | None = None
) -> tuple[ModelConfig, Params]:
    """`load_params` for inference (`jaxllm generate` / `serve`): each parameter restored onto its devices
    of the mesh that `mesh.*=` overrides (`mesh.tensor=2`, as `jaxllm train` takes them) describe, by the
    rules table (none: one device), then cast to `dtype` (`with_dtype`; None: as saved).

    The layers come unrolled whatever `model.scan_layers` says (a scanned KV cache decodes several
    times slower: benchmarks/results/compile_time.md).
    """
    if not mesh_overrides:
        return with_dtype(*load_params(path, scan_layers=False), dtype)
    from jaxllm.sharding import inference_mesh, param_shardings  # the sharding module imports JAX's mesh code

    for item in mesh_overrides:
        if not item.startswith("mesh."):
            raise ConfigError(f"override {item}: only mesh.* overrides apply here (the model is the checkpoint's)")
    path = _params_dir(path)
    config = Config.load(path / CONFIG_FILE, mesh_overrides)
    model = config.model.replace(scan_layers=False)
    return with_dtype(*load_params(path, param_shardings(model, inference_mesh(config.mesh)), scan_layers=False), dtype)


def _params_dir(path: str | Path) -> Path:
    path = Path(path).absolute()
    if not (path / CONFIG_FILE).is_file() or not (path / PARAMS_DIR).is_dir():
        raise InputError(f"{path} is not a jaxllm params directory (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    return path


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
    params: Params
    shardings: Any

    @cached_property
    def sha256(self) -> str:
        """Of its files (`params_sha256`): read only when a LoRA run records or checks its base."""
        return params_sha256(self.path)

    def record(self) -> dict[str, str]:
        return {"path": str(self.path), "sha256": self.sha256}


def load_base(path: str | Path, cfg: ModelConfig, shardings: Any) -> Base:
    """The params directory `path` restored onto `shardings`, in `cfg`'s layer layout. Its shapes must
    be `cfg`'s: `train` checks that before any work (`base_checkpoint.check_same_param_shapes`)."""
    path = _params_dir(path)
    _, params = load_params(path, shardings, scan_layers=cfg.scan_layers)
    return Base(path, params, shardings)


def check_base(recorded: dict[str, str], base: Base, checkpoint: Path) -> None:
    """Refuse to resume adapters on other base weights than they were trained on (compared by hash)."""
    if recorded.get("sha256") != base.sha256:
        raise InputError(
            f"cannot resume {checkpoint}: it was trained on base {recorded.get('path')} "
            f"(sha256 {str(recorded.get('sha256'))[:12]}), but --init gives {base.path} (sha256 {base.sha256[:12]})"
        )


def with_dtype(cfg: ModelConfig, params: Params, dtype: str | None) -> tuple[ModelConfig, Params]:
    """`--dtype` of `jaxllm generate` / `serve`: (cfg, params) with weights and computation in `dtype`.

    Sets both `model.param_dtype` (the parameters are cast, e.g. float32 -> bfloat16: half the bytes
    a decode step reads) and `model.dtype` (activations and the KV cache); norms, softmax and the
    logits stay float32 as always. "bfloat16-weights": bfloat16 parameters, float32 computation (on
    the CPU the kernels read the bfloat16 weights with float32 activations, and no conversions run
    between them). None: unchanged.
    """
    if dtype is None:
        return cfg, params
    if dtype not in INFERENCE_DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    weights, compute = ("bfloat16", "float32") if dtype == "bfloat16-weights" else (dtype, dtype)
    params = jax.tree.map(lambda x: x.astype(weights), params)
    return cfg.replace(param_dtype=weights, dtype=compute), params
