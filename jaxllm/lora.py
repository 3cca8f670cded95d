"""LoRA: low-rank adapters for the Dense kernels, in their own pytree beside the frozen base params.

A targeted kernel W (in dims…, out dims…) is trained as W + s·A@B with s = lora_alpha / lora_rank,
A of shape (in dims…, R) and B of shape (R, out dims…) (peft's lora_A.weight and lora_B.weight,
transposed). The adapters mirror the params' paths ({"blocks_0": {"attn": {"query": {"lora_a", "lora_b"}}}});
leading dims a kernel has before its own (a scanned layer stack) are kept on both. `merge` adds every
delta into a copy of the base: the train step differentiates the loss of the merged params with respect
to the adapters only, so the model code is untouched and the base stays out of the optimizer.

With `train.lora_dropout` p > 0 (peft's y = x·W + s·dropout(x)·A·B) a merged kernel cannot drop the
adapter's input, so the training loss applies the adapters at the targeted Dense calls instead (`applied`:
flax method interception, the model code still untouched), with a dropout key per step, micro-batch and
module (`dropout_key`). Eval and `final/` use the merged weights, without dropout. A scanned layer stack
(`model.scan_layers`) runs every layer through one module path, so it is refused with dropout.

Initialisation is peft's default: A kaiming-uniform (bound 1/sqrt(fan_in)), B zeros, so step 0's
model is the base model.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jaxllm.config import ModelConfig, TrainConfig
from jaxllm.errors import ConfigError
from jaxllm.model import Dense, Params, abstract_params, logical_axes

# Per Dense name: how many of the kernel's trailing dims are its output (the rest, after any leading
# stacked dims, are its input): q/k/v project to (heads, head_dim), out reads (heads, head_dim).
_OUT_DIMS = {"query": 2, "key": 2, "value": 2, "out": 1, "gate": 1, "up": 1, "down": 1, "fc": 1, "proj": 1}
_IN_DIMS = {"query": 1, "key": 1, "value": 1, "out": 2, "gate": 1, "up": 1, "down": 1, "fc": 1, "proj": 1}
FAMILY_TARGETS = {
    "llama": ("query", "key", "value", "out", "gate", "up", "down"),
    "gpt": ("query", "key", "value", "out", "fc", "proj"),
}
RANK_AXIS = "lora"  # the logical name of the rank dim (jaxllm/sharding.py: never sharded)


def enabled(tcfg: TrainConfig) -> bool:
    return tcfg.lora_rank > 0


def targets(mcfg: ModelConfig, tcfg: TrainConfig) -> tuple[str, ...]:
    """The Dense names adapted, checked against the model family (a one-line `ConfigError` otherwise)."""
    have = FAMILY_TARGETS[mcfg.family]
    if tcfg.lora_targets == "all":
        return have
    if not tcfg.lora_targets:
        raise ConfigError(f"train.lora_targets is empty: name the layers to adapt ({', '.join(have)}) or all")
    for name in tcfg.lora_targets:
        if name not in have:
            raise ConfigError(
                f"train.lora_targets: the {mcfg.family} family has no {name!r} layer (it has {', '.join(have)})"
            )
    return tuple(dict.fromkeys(tcfg.lora_targets))


def check_lora(mcfg: ModelConfig, tcfg: TrainConfig) -> None:
    """Refuse LoRA settings this implementation cannot train (before any work)."""
    if not enabled(tcfg):
        return
    targets(mcfg, tcfg)
    if tcfg.lora_dropout > 0 and mcfg.scan_layers:
        raise ConfigError(
            f"train.lora_dropout={tcfg.lora_dropout} needs model.scan_layers=false (a scanned layer stack has one "
            "module path for every layer); set train.lora_dropout=0 or model.scan_layers=false"
        )


def scale(tcfg: TrainConfig) -> float:
    return tcfg.lora_alpha / tcfg.lora_rank


def _adapted(path: tuple[Any, ...], names: tuple[str, ...]) -> str | None:
    """The Dense name when `path` is the kernel of a targeted layer, else None."""
    keys = [str(getattr(k, "key", k)) for k in path]
    return keys[-2] if len(keys) >= 2 and keys[-1] == "kernel" and keys[-2] in names else None


def _split(name: str, ndim: int) -> tuple[int, int, int]:
    """(leading, in, out) dim counts of a kernel of `ndim` dims."""
    n_in, n_out = _IN_DIMS[name], _OUT_DIMS[name]
    return ndim - n_in - n_out, n_in, n_out


def _map_adapted(fn: Any, tree: Params, names: tuple[str, ...], is_leaf: Any = None) -> Params:
    """{path: fn(name, leaf)} for the targeted kernels, nested as `tree` is (other branches dropped)."""
    out: dict[str, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]:
        name = _adapted(path, names)
        if name is None:
            continue
        node = out
        for k in path[:-2]:
            node = node.setdefault(str(k.key), {})
        node[name] = fn(name, leaf)
    return out


def abstract_adapters(mcfg: ModelConfig, tcfg: TrainConfig) -> Params:
    """The adapter pytree as `jax.ShapeDtypeStruct`s (float32)."""
    r = tcfg.lora_rank

    def shapes(name: str, kernel: jax.ShapeDtypeStruct) -> dict[str, jax.ShapeDtypeStruct]:
        lead, n_in, _ = _split(name, kernel.ndim)
        s = kernel.shape
        return {
            "lora_a": jax.ShapeDtypeStruct((*s[: lead + n_in], r), jnp.float32),
            "lora_b": jax.ShapeDtypeStruct((*s[:lead], r, *s[lead + n_in :]), jnp.float32),
        }

    return _map_adapted(shapes, abstract_params(mcfg), targets(mcfg, tcfg))


def adapter_axes(mcfg: ModelConfig, tcfg: TrainConfig) -> Params:
    """A `PartitionSpec` of logical axis names per adapter: its kernel's names, the rank dim `RANK_AXIS`."""

    def axes(name: str, spec: PartitionSpec) -> dict[str, PartitionSpec]:
        lead, n_in, _ = _split(name, len(spec))
        spec = tuple(spec)
        return {
            "lora_a": PartitionSpec(*spec[: lead + n_in], RANK_AXIS),
            "lora_b": PartitionSpec(*spec[:lead], RANK_AXIS, *spec[lead + n_in :]),
        }

    is_spec = lambda x: isinstance(x, PartitionSpec)  # noqa: E731
    return _map_adapted(axes, logical_axes(mcfg), targets(mcfg, tcfg), is_leaf=is_spec)


def init_adapters(mcfg: ModelConfig, tcfg: TrainConfig, seed: int | jax.Array | None = None) -> Params:
    """peft's default init: A uniform in ±1/sqrt(fan_in) (kaiming-uniform, a=sqrt(5)), B zeros. Pure; jit-able."""
    shapes = abstract_adapters(mcfg, tcfg)
    key = jax.random.fold_in(jax.random.key(tcfg.seed if seed is None else seed), 0x10A)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    keys = jax.random.split(key, len(leaves))
    out = []
    for (path, sds), k in zip(leaves, keys, strict=True):
        if str(path[-1].key) == "lora_b":
            out.append(jnp.zeros(sds.shape, sds.dtype))
            continue
        fan_in = math.prod(sds.shape[-1 - _IN_DIMS[str(path[-2].key)] : -1])  # lora_a: (lead…, in…, R)
        bound = 1.0 / math.sqrt(fan_in)
        out.append(jax.random.uniform(k, sds.shape, sds.dtype, minval=-bound, maxval=bound))
    return jax.tree.unflatten(treedef, out)


def delta(name: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """A @ B with the kernel's shape (leading dims batched)."""
    lead, r = a.ndim - 1 - _IN_DIMS[name], a.shape[-1]
    a_2d = a.reshape(*a.shape[:lead], -1, r)
    b_2d = b.reshape(*b.shape[:lead], r, -1)
    return (a_2d @ b_2d).reshape(*a.shape[:-1], *b.shape[lead + 1 :])


def merge(tcfg: TrainConfig, base: Params, adapters: Params) -> Params:
    """The base params with every adapted kernel replaced by W + s·A@B. Pure; jit-able."""
    s = scale(tcfg)

    def walk(base_node: Any, ad_node: Any, name: str | None) -> Any:
        if ad_node is None:
            return base_node
        if "lora_a" in ad_node:
            kernel = base_node["kernel"]
            new = kernel + (s * delta(name, ad_node["lora_a"], ad_node["lora_b"])).astype(kernel.dtype)
            return {**base_node, "kernel": new}
        return {k: walk(v, ad_node.get(k), k) for k, v in base_node.items()}

    return walk(base, adapters, None)


_DROPOUT_TAG = 0x10AD  # folded into train.seed's key for the dropout masks (init_adapters uses 0x10A)


def dropout_key(tcfg: TrainConfig, step: jax.Array | int, micro: jax.Array | int = 0) -> jax.Array:
    """The dropout key of one micro-batch of one step: a function of train.seed, so resume is exact."""
    key = jax.random.fold_in(jax.random.key(tcfg.seed), _DROPOUT_TAG)
    return jax.random.fold_in(jax.random.fold_in(key, step), micro)


def adapter_output(
    tcfg: TrainConfig, name: str, adapter: Params, x: jax.Array, key: jax.Array | None, dtype: Any
) -> jax.Array:
    """s·(dropout(x)·A·B) for a Dense's input x (batch…, in…): shape (batch…, out…). No dropout without `key`."""
    a, b = adapter["lora_a"], adapter["lora_b"]
    n_in, p = _IN_DIMS[name], tcfg.lora_dropout
    if key is not None and p > 0:
        keep = jax.random.bernoulli(key, 1.0 - p, x.shape)
        x = jnp.where(keep, x / (1.0 - p), 0).astype(x.dtype)
    batch_shape, r = x.shape[: x.ndim - n_in], a.shape[-1]
    x_2d = x.reshape(math.prod(batch_shape), -1).astype(dtype)
    y_2d = (x_2d @ a.reshape(-1, r).astype(dtype)) @ b.reshape(r, -1).astype(dtype)
    return (scale(tcfg) * y_2d).reshape(*batch_shape, *b.shape[1:])


@contextmanager
def applied(tcfg: TrainConfig, adapters: Params, key: jax.Array | None) -> Iterator[None]:
    """Within it, a model applied to the base params computes x·W + s·dropout(x)·A·B at each adapted Dense.

    Each Dense call's mask uses `key` folded with a hash of the module's path. Per-layer params only
    (`check_lora` refuses `scan_layers` with dropout). Pure inside a traced function; jit-able.
    """

    def intercept(next_fun: Any, args: tuple, kwargs: dict, context: Any) -> Any:
        module = context.module
        y = next_fun(*args, **kwargs)
        if context.method_name != "__call__" or not isinstance(module, Dense):
            return y
        adapter: Any = adapters
        for part in module.path:
            adapter = adapter.get(part) if isinstance(adapter, dict) else None
        if not isinstance(adapter, dict) or "lora_a" not in adapter:
            return y
        k = None if key is None else jax.random.fold_in(key, zlib.crc32("/".join(module.path).encode()) & 0x7FFFFFFF)
        return y + adapter_output(tcfg, module.path[-1], adapter, args[0], k, module.dtype).astype(y.dtype)

    with nn.intercept_methods(intercept):
        yield
