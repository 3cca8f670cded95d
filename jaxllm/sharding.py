"""The device mesh and the one table of logical-axis rules.

Parameters carry logical axis names (`jaxllm.model.LOGICAL_AXES`); `RULES` maps each name to mesh
axes. Switching data parallel -> FSDP -> tensor parallel is a change of mesh shape, never of the
model or of this table: a mesh axis of size 1 shards nothing.

| strategy | mesh (data, fsdp, tensor) | what is split |
|---|---|---|
| `dp`      | (-1, 1, 1)  | the batch; parameters replicated |
| `fsdp`    | (1, -1, 1)  | the batch, and every parameter's `embed` dim (ZeRO-3 style) |
| `tp`      | (1, 1, -1)  | heads, MLP width and vocab (Megatron style); the batch replicated |
| `fsdp_tp` | (1, -1, 2)  | both |
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxllm.config import MeshConfig, ModelConfig
from jaxllm.errors import ConfigError
from jaxllm.model import Params, abstract_params, logical_axes

MESH_AXES = ("data", "fsdp", "tensor")
log = logging.getLogger(__name__)

# The one rules table: logical axis name -> mesh axis (or axes), for parameters and batches.
RULES: dict[str, str | tuple[str, ...] | None] = {
    "batch": ("data", "fsdp"),
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "head_dim": None,
    "positions": None,
    "layers": None,  # the leading axis of stacked (scanned) layer params and KV caches
    "cache_length": None,  # KV-cache positions (`jaxllm.model.KV_CACHE_AXES`); its "batch" is serving slots
    "lora": None,  # the rank dim of LoRA adapters (jaxllm/lora.py): small, replicated
}

# `mesh.strategy`: mesh sizes (data, fsdp, tensor); sizes given explicitly in the config win.
STRATEGIES = {"dp": (-1, 1, 1), "fsdp": (1, -1, 1), "tp": (1, 1, -1), "fsdp_tp": (1, -1, 2)}


def mesh_shape(mesh_cfg: MeshConfig, n_devices: int) -> tuple[int, int, int]:
    """Resolve the strategy and -1 ("the rest of the devices"); check the product is `n_devices`."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    if mesh_cfg.strategy:
        explicit = mesh_cfg.model_fields_set
        defaults = STRATEGIES[mesh_cfg.strategy]
        sizes = [s if a in explicit else d for a, s, d in zip(MESH_AXES, sizes, defaults, strict=True)]
        if sizes.count(-1) > 1:
            raise ConfigError(
                f"mesh.strategy={mesh_cfg.strategy} gives mesh {_describe(sizes)}: at most one axis may be -1; "
                "set the other mesh sizes to numbers"
            )
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n_devices % known:
            raise ConfigError(f"mesh {_describe(sizes)} does not divide the {n_devices} devices")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(f"mesh {_describe(sizes)} needs {math.prod(sizes)} devices, but there are {n_devices}")
    return tuple(sizes)  # type: ignore[return-value]


def _describe(sizes: list[int]) -> str:
    return "(" + ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True)) + ")"


def make_mesh(mesh_cfg: MeshConfig, devices: list[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh with Auto axis types (GSPMD propagation of shardings)."""
    devices = devices or jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def inference_mesh(mesh_cfg: MeshConfig) -> Mesh:
    """`make_mesh` for generation and serving: sizes that need fewer devices than there are take the
    first ones (`mesh.data=2 mesh.tensor=2` on 8 devices uses 4); training needs them all."""
    devices = jax.devices()
    sizes = (mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor)
    if mesh_cfg.strategy is None and -1 not in sizes and math.prod(sizes) < len(devices):
        devices = devices[: math.prod(sizes)]
    return make_mesh(mesh_cfg, devices)


def mesh_spec(
    logical: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh, what: str | None = None
) -> PartitionSpec:
    """Map logical names to mesh axes by `RULES`; a dim that its mesh axes do not divide, or whose
    mesh axis is already used by an earlier dim, stays unsharded (e.g. GPT-2's vocab of 50257).

    `what` names the array (a parameter path): a dim left replicated because it does not divide its
    mesh axes is then logged, once per parameter, shape and mesh."""
    used: set[str] = set()
    out: list[Any] = []
    for name, size in zip(logical, shape, strict=True):
        rule = RULES.get(name) if name else None
        axes = tuple(a for a in ((rule,) if isinstance(rule, str) else rule or ()) if mesh.shape[a] > 1)
        if axes and not used & set(axes) and size % math.prod(mesh.shape[a] for a in axes) and what:
            _log_replicated(what, name, size, axes, mesh)
        if not axes or used & set(axes) or size % math.prod(mesh.shape[a] for a in axes):
            out.append(None)
            continue
        used |= set(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


_logged: set[tuple[str, tuple[int, ...], tuple[tuple[str, int], ...]]] = set()


def _log_replicated(what: str, name: str | None, size: int, axes: tuple[str, ...], mesh: Mesh) -> None:
    key = (f"{what}:{name}", (size,), tuple(mesh.shape.items()))
    if key not in _logged:
        _logged.add(key)
        n = math.prod(mesh.shape[a] for a in axes)
        log.warning("%s: dim %r of size %d does not divide mesh %s (%d devices): left replicated",
                    what, name, size, "x".join(axes), n)  # fmt: skip


def param_shardings(cfg: ModelConfig, mesh: Mesh) -> Params:
    """A `NamedSharding` for every parameter, from its logical axes and the rules."""
    return tree_shardings(logical_axes(cfg), abstract_params(cfg), mesh)


def tree_shardings(axes: Any, shapes: Any, mesh: Mesh) -> Any:
    """A `NamedSharding` per leaf of `shapes`, from the `PartitionSpec` of logical names in `axes`."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return jax.tree_util.tree_map_with_path(
        lambda path, spec, shape: NamedSharding(mesh, mesh_spec(tuple(spec), shape.shape, mesh, _path_name(path))),
        axes,
        shapes,
        is_leaf=is_spec,
    )


def _path_name(path: tuple[Any, ...]) -> str:
    """'blocks_0/attn/query/kernel' for a pytree key path."""
    return "/".join(str(getattr(k, "key", k)) for k in path)


def batch_sharding(mesh: Mesh, global_batch: int, what: str = "batch size") -> NamedSharding:
    """Token batches (B, T): rows split over the batch axes (data, fsdp), replicated over tensor."""
    spec = mesh_spec(("batch", None), (global_batch, 1), mesh)
    n = math.prod(mesh.shape[a] for a in ("data", "fsdp"))
    if spec[0] is None and n > 1:
        raise ConfigError(f"{what} {global_batch} is not divisible by the data x fsdp devices ({n})")
    return NamedSharding(mesh, spec)


def logical_rules() -> tuple[tuple[str, str | tuple[str, ...] | None], ...]:
    """`RULES` as the (name, mesh axes) pairs `flax.linen.logical_axis_rules` takes (activations)."""
    return tuple(RULES.items())


@contextmanager
def tracing_on(mesh: Mesh) -> Iterator[None]:
    """Where sharded functions are traced and run: the mesh set with `jax.set_mesh` (a plain `with
    mesh:` no longer defines the mesh Flax's logical constraints look for, and they would silently do
    nothing) and the rules table for the model's activation constraints."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules()):
        yield


def constrain(tree: Any, axes: Any, mesh: Mesh) -> Any:
    """Inside jit: each array of `tree` constrained to the sharding its logical axes (`axes`, a
    matching tree of `PartitionSpec`s of names) get on `mesh` by `RULES` (`mesh_spec`'s fallbacks)."""
    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return jax.tree.map(
        lambda spec, x: jax.lax.with_sharding_constraint(x, NamedSharding(mesh, mesh_spec(tuple(spec), x.shape, mesh))),
        axes,
        tree,
        is_leaf=is_spec,
    )


def mesh_of(params: Params) -> Mesh | None:
    """The mesh that `params` are sharded over (`load_params` with `param_shardings`), or None."""
    sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
    return sharding.mesh if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1 else None


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


