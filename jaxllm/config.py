"""The one config schema: model shapes shared by jaxllm and torch_ref, presets, YAML loading.

A config file is YAML with top-level sections `model`, `data`, `train` and `mesh` (`Config`). Presets are
the YAML files shipped in `jaxllm/configs/` (also reachable as `configs/` at the repository root).
Every field is validated; an unknown or ill-typed key is a `ConfigError` naming it.
"""

from __future__ import annotations

import copy
import difflib
import math
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    field_validator,
    model_validator,
)

from jaxllm.errors import ConfigError

INFERENCE_DTYPES = ("float32", "bfloat16", "bfloat16-weights")  # `--dtype` of generate and serve

class LinearRopeScaling(BaseModel):
    """RoPE position interpolation: every inverse frequency divided by `factor` (transformers "linear")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["linear"]
    factor: PositiveFloat


class Llama3RopeScaling(BaseModel):
    """Llama 3.1 RoPE scaling (transformers "llama3"): low frequencies divided by `factor`, high ones
    kept, a smooth ramp between wavelengths original_max_position_embeddings / {low,high}_freq_factor."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    type: Literal["llama3"]
    factor: PositiveFloat
    low_freq_factor: PositiveFloat
    high_freq_factor: PositiveFloat
    original_max_position_embeddings: PositiveInt

    @model_validator(mode="after")
    def _check(self) -> Llama3RopeScaling:
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"high_freq_factor ({self.high_freq_factor}) must exceed low_freq_factor ({self.low_freq_factor})"
            )
        return self


RopeScaling = Annotated[LinearRopeScaling | Llama3RopeScaling, Field(discriminator="type")]


class ModelConfig(BaseModel):
    """Shapes and numerics of a decoder-only transformer (both block families).

    family "gpt": learned positions, LayerNorm with bias, GELU MLP, biases everywhere.
    family "llama": RoPE, RMSNorm, SwiGLU MLP, grouped-query attention, no biases (except q/k/v
    with `qkv_bias`, as Qwen2).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    family: Literal["gpt", "llama"]
    vocab_size: PositiveInt
    context_length: PositiveInt
    d_model: PositiveInt
    n_layers: PositiveInt
    n_heads: PositiveInt
    n_kv_heads: PositiveInt | None = None  # None: as many as n_heads (multi-head attention)
    head_dim: PositiveInt | None = None  # None: d_model // n_heads
    d_ff: PositiveInt  # MLP hidden width (per branch for SwiGLU)
    gelu: Literal["exact", "tanh"] = "tanh"  # GPT family only; GPT-2 uses tanh
    tie_embeddings: bool = False
    norm_eps: PositiveFloat = 1e-5
    rope_theta: PositiveFloat = 10000.0  # llama family only
    rope_scaling: RopeScaling | None = None  # llama family only; None: plain RoPE
    qkv_bias: bool = False  # llama family only: biases on the query/key/value projections (Qwen2)
    # A token attends to itself and the sliding_window - 1 positions before it (key position k is
    # visible from query position q when q - sliding_window < k <= q, as Mistral); None: all before it.
    sliding_window: PositiveInt | None = None
    init_std: PositiveFloat = 0.02
    dtype: Literal["float32", "bfloat16"] = "float32"  # compute dtype (activations, KV cache)
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # parameter storage (bfloat16: inference weights)
    # Training attention (no cache). "auto": on the CPU, float32 windows without document masks run
    # jaxllm's causal-attention kernel (jaxllm/causal_attention.py), anything else XLA's form;
    # "xla" / "cudnn": always jax.nn.dot_product_attention with that implementation.
    attention: Literal["auto", "xla", "cudnn"] = "auto"
    # "auto": on the CPU, matmuls of at most 32 rows (decode steps) run jaxllm's few-row kernel
    # (jaxllm/few_row_matmul.py); "xla": always XLA's dot. Numerics are float32 sums either way.
    few_row_matmul: Literal["auto", "xla"] = "auto"
    # "auto": on the CPU, a decode step's attention (one token per row) runs jaxllm's kernel, which
    # reads only the visible cache entries and updates the cache in place (jaxllm/decode_attention.py);
    # "xla": always the XLA form. Numerics are float32 scores and softmax either way.
    decode_attention: Literal["auto", "xla"] = "auto"
    # "strips": for inference only, set by `jaxllm.decode_layout.prepare` and never saved: each Dense
    # kernel with a multiple of S outputs is held as (outputs/S, inputs, S) column strips (S: 64
    # bytes a row, 16 float32 or 32 bfloat16 columns), which the CPU decode kernel reads
    # contiguously. "dense": the kernels as trained and saved.
    kernel_layout: Literal["dense", "strips"] = "dense"
    # Activation checkpointing per block: "none", "full" (recompute everything in the backward
    # pass) or "save_dots" (keep matmul outputs, recompute the rest). Numerics are unchanged.
    remat: Literal["none", "full", "save_dots"] = "none"
    # One `nn.scan` over the blocks (parameters stacked on a leading "layers" axis) instead of a
    # Python loop: the compiled program stops growing with depth. Numerics are unchanged, and params
    # directories, exports and conversions stay per-layer either way (jaxllm/model.py).
    scan_layers: bool = False

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads}) unless head_dim is given"
            )
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.kv_heads})")
        if self.family == "llama" and self.dim_per_head % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if self.family == "gpt" and self.qkv_bias:
            raise ValueError("qkv_bias applies to the llama family (the gpt family has biases everywhere)")
        if self.family == "gpt" and self.rope_scaling is not None:
            raise ValueError("rope_scaling applies to the llama family (the gpt family has no RoPE)")
        return self

    # Derived shapes -----------------------------------------------------------------------------
    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def use_bias(self) -> bool:
        return self.family == "gpt"

    # Loading ------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str) -> ModelConfig:
        """A shipped preset by name (`mini`, `advanced`, `gpt2-124m`)."""
        if name not in preset_names():
            raise ConfigError(f"unknown preset {name!r}; available presets: {', '.join(preset_names())}")
        return cls.from_yaml(_presets_dir() / f"{name}.yaml")

    @classmethod
    def from_yaml(cls, path: str | Path) -> ModelConfig:
        """The `model:` section of a YAML config file."""
        return cls.from_dict(read_yaml(path).get("model"), source=f"{path}: model")

    @classmethod
    def from_dict(cls, data: Any, source: str = "model") -> ModelConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a mapping of fields, got {type(data).__name__}")
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ConfigError(format_validation_error(err, cls, source)) from None

    @classmethod
    def load(cls, preset_or_path: str | Path) -> ModelConfig:
        """A preset name, or the path of a YAML config file."""
        return cls.from_yaml(config_path(preset_or_path))

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed (e.g. a reduced-depth test model)."""
        return self.from_dict({**self.model_dump(), **changes}, source="replace()")


def preset_names() -> list[str]:
    return sorted(p.stem for p in _presets_dir().glob("*.yaml"))


def config_path(preset_or_path: str | Path) -> Path:
    """The YAML file for a preset name, or the given path if it looks like one."""
    path = Path(preset_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    if str(preset_or_path) not in preset_names():
        raise ConfigError(f"unknown preset {str(preset_or_path)!r}; available presets: {', '.join(preset_names())}")
    return _presets_dir() / f"{preset_or_path}.yaml"


def _presets_dir() -> Path:
    return Path(str(resources.files("jaxllm") / "configs"))


# The Dense layers LoRA can adapt, as jaxllm/model.py names them (attention; llama MLP; gpt MLP).
LORA_TARGETS = ("query", "key", "value", "out", "gate", "up", "down", "fc", "proj")


class TrainConfig(BaseModel):
    """The training loop: batch, optimizer, schedule, logging, checkpoints."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    steps: PositiveInt = 1000  # optimizer updates
    # Parameter init and data order. JAX's PRNG keys take 32 bits: seeds outside [0, 2**32) are refused
    # (they used to wrap silently, so 0, 2**32 and 2**64 gave the same run).
    seed: int = Field(0, ge=0, lt=2**32)
    batch_size: PositiveInt = 32  # global sequences per optimizer update
    grad_accum: PositiveInt = 1  # micro-batches per update (batch_size must be divisible by it)
    learning_rate: PositiveFloat = 3e-4  # peak, after linear warmup
    min_lr_ratio: float = Field(0.1, ge=0, le=1)  # cosine decays to learning_rate * min_lr_ratio
    warmup_steps: NonNegativeInt = 100
    weight_decay: NonNegativeFloat = 0.1  # decoupled; not on biases, norms and gains
    beta1: float = Field(0.9, ge=0, lt=1)
    beta2: float = Field(0.95, ge=0, lt=1)
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegativeFloat = 1.0  # global-norm clipping; 0 disables
    # float32 matmul precision: "highest" is full fp32; "default"/"high" allow TF32/bf16 passes on GPUs.
    matmul_precision: Literal["default", "high", "highest"] = "default"
    nonfinite: Literal["stop", "skip"] = "stop"  # on a NaN/inf loss or gradient
    log_every: PositiveInt = 10
    eval_every: NonNegativeInt = 200  # 0 disables evaluation
    eval_batches: PositiveInt = 10
    checkpoint_every: NonNegativeInt = 500  # 0: only the final params
    keep_checkpoints: PositiveInt = 3
    peak_flops: PositiveFloat | None = None  # per-device peak for MFU; None: known table / measured on CPU
    # LoRA (jaxllm/lora.py, docs/finetune.md): rank 0 trains every parameter; rank R > 0 freezes the base
    # weights and trains W + (lora_alpha / R) * A @ B on the `lora_targets` Dense layers ("all": every one).
    lora_rank: NonNegativeInt = 0
    lora_alpha: PositiveFloat = 8.0
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    lora_targets: list[str] | Literal["all"] = ["query", "value"]
    lora_merge: bool = True  # final/: merged params (true) or a peft adapter directory (false)
    # "START:END": a jax.profiler trace of steps START to END (both included) in RUN/profile/ (jaxllm only).
    profile_steps: str | None = None

    @field_validator("profile_steps", mode="before")
    @classmethod
    def _steps_range(cls, v: Any) -> Any:
        from jaxllm.profiler import parse_steps

        if isinstance(v, int) and not isinstance(v, bool):  # YAML 1.1 reads an unquoted 10:12 as 612 (base 60)
            v = f"{v // 60}:{v % 60}" if v >= 60 else str(v)
        if isinstance(v, str):
            parse_steps(v)
        return v

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        from jaxllm.profiler import parse_steps

        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accum ({self.grad_accum})")
        if self.profile_steps is not None and parse_steps(self.profile_steps)[1] > self.steps:
            raise ValueError(f"profile_steps {self.profile_steps!r} ends after the last step (steps={self.steps})")
        return self

    @field_validator("lora_targets", mode="before")
    @classmethod
    def _split_targets(cls, targets: Any) -> Any:  # "query" or "query,value" on the command line
        return [t.strip() for t in targets.split(",")] if isinstance(targets, str) and targets != "all" else targets

    @field_validator("lora_targets")
    @classmethod
    def _known_targets(cls, targets: list[str] | str) -> list[str] | str:
        for name in [] if targets == "all" else targets:
            if name not in LORA_TARGETS:
                raise ValueError(f"unknown layer {name!r}{_suggest(name, LORA_TARGETS)}; LoRA targets: "
                                 f"{', '.join(LORA_TARGETS)} or all")  # fmt: skip
        return targets


class MeshConfig(BaseModel):
    """Device mesh sizes for the named axes; one of them may be -1 ("the rest of the devices")."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # A named parallelism (see jaxllm/sharding.py): dp, fsdp, tp or fsdp_tp; explicit sizes override it.
    strategy: Literal["dp", "fsdp", "tp", "fsdp_tp"] | None = None

    @model_validator(mode="after")
    def _check(self) -> MeshConfig:
        sizes = (self.data, self.fsdp, self.tensor)
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(
                f"mesh sizes must be positive or -1, got data={self.data} fsdp={self.fsdp} tensor={self.tensor}"
            )
        if sizes.count(-1) > 1 and not self.strategy:  # with a strategy, sharding.mesh_shape checks the result
            raise ValueError("at most one mesh axis may be -1")
        return self


class DataConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    path: str | None = None  # a directory written by `jaxllm preprocess`
    # Document masking: tokens attend only within their own document of a packed window, and positions
    # restart at each document (a document ends with the dataset's end-of-text id; docs/data.md).
    doc_mask: bool = False


class Config(BaseModel):
    """A whole config file: model, data, train and mesh sections."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelConfig
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    mesh: MeshConfig = MeshConfig()

    @classmethod
    def load(cls, preset_or_path: str | Path, overrides: Sequence[str] = ()) -> Config:
        """A preset or YAML file, with dotted `key=value` overrides (`train.steps=200 mesh.fsdp=2`)."""
        path = config_path(preset_or_path)
        return cls.from_data(read_yaml(path), overrides, str(path))

    @classmethod
    def from_data(cls, data: dict[str, Any], overrides: Sequence[str] = (), source: str = "config") -> Config:
        """`data` (the sections, as a YAML file holds them) with `overrides`; errors name `source`."""
        data = apply_overrides(data, overrides)
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            # A problem with a key given on the command line names the override, not the preset's file.
            for item in overrides:
                key = item.partition("=")[0]
                for e in err.errors():
                    loc = ".".join(str(p) for p in e["loc"])
                    if loc == key or loc.startswith(key + ".") or key.startswith(loc + "."):
                        raise ConfigError(f"override {item}: {_describe_error(e, cls, override=True)}") from None
            raise ConfigError(format_validation_error(err, cls, source)) from None

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `data` with each `a.b=value` set; values parse as YAML scalars (`1e-3`, `true`, `null`)."""
    data = copy.deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        *parents, leaf = key.split(".")
        node = data
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        try:
            node[leaf] = yaml.safe_load(raw)
        except yaml.YAMLError:
            node[leaf] = raw
    return data


def read_yaml(path: str | Path, need_model: bool = True) -> dict[str, Any]:
    """Parse a config file, checking it exists, is YAML, and has only known top-level sections (and
    a `model` section unless `need_model` is false: with `--init CK` the model is CK's)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a 'model:' section")
    for key in data:
        if key not in Config.model_fields:
            raise ConfigError(f"{path}: unknown section {key!r}{_suggest(key, Config.model_fields)}")
    if need_model and "model" not in data:
        raise ConfigError(f"{path}: missing the 'model:' section")
    return data


def format_validation_error(err: ValidationError, schema: type[BaseModel], source: str) -> str:
    """One line per problem, naming the dotted key and suggesting the closest valid key."""
    return f"{source}: " + "; ".join(_describe_error(e, schema) for e in err.errors())


def _describe_error(e: Any, schema: type[BaseModel], override: bool = False) -> str:
    """One pydantic error as a line naming the dotted key; an unknown key gets the closest valid one
    (`override`: the suggestion is the whole dotted key, and common short names such as `lr` count)."""
    key = ".".join(str(p) for p in e["loc"]) or "(root)"
    if e["type"] == "extra_forbidden":
        parent, leaf = tuple(e["loc"][:-1]), str(e["loc"][-1])
        fields = _schema_at(schema, parent).model_fields
        if not override:
            return f"unknown key {key!r}{_suggest(leaf, fields)}"
        guess = _guess_key(schema, parent, leaf)
        return f"unknown key {key!r}" + (f"; did you mean {guess!r}?" if guess else "")
    if e["type"] == "missing":
        return f"missing required key {key!r}"
    if e["type"] == "value_error":
        return f"{key}: {e['msg'].removeprefix('Value error, ')}"
    return f"{key}: {e['msg']} (got {e.get('input')!r})"


# Short names people type for a field (a suggestion only: they are never accepted as keys).
KEY_ALIASES = {
    "lr": "learning_rate",
    "learning-rate": "learning_rate",
    "wd": "weight_decay",
    "bs": "batch_size",
    "batch": "batch_size",
    "accum": "grad_accum",
    "gradient_accumulation_steps": "grad_accum",
    "warmup": "warmup_steps",
    "clip": "grad_clip",
    "max_steps": "steps",
    "iters": "steps",
    "layers": "n_layers",
    "heads": "n_heads",
    "dim": "d_model",
    "hidden_size": "d_model",
    "vocab": "vocab_size",
    "context": "context_length",
    "ctx": "context_length",
    "seq_len": "context_length",
    "block_size": "context_length",
}


def _guess_key(schema: type[BaseModel], parent: tuple, leaf: str) -> str | None:
    """The dotted key most likely meant by `parent.leaf`: an alias, a close spelling in the same
    section, or the same name in another section (`train.d_model` -> `model.d_model`)."""
    fields = _schema_at(schema, parent).model_fields
    prefix = "".join(f"{p}." for p in parent)
    alias = KEY_ALIASES.get(leaf.lower())
    if alias in fields:
        return prefix + alias
    close = difflib.get_close_matches(leaf, list(fields), n=1)
    if close:
        return prefix + close[0]
    if len(parent) == 1:
        for section, info in schema.model_fields.items():
            inner = info.annotation
            if isinstance(inner, type) and issubclass(inner, BaseModel) and leaf in inner.model_fields:
                return f"{section}.{leaf}"
    return None


def _schema_at(schema: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The nested model class that the field path `loc` points into."""
    for part in loc:
        inner = schema.model_fields[part].annotation if part in schema.model_fields else None
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            break
        schema = inner
    return schema


def _suggest(word: str, options: Any) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> dict[str, int]:
    """Matmul FLOPs per token, PaLM-style (appendix B of Chowdhery et al. 2022).

    forward  = 2 * N_matmul + 4 * n_layers * T * n_heads * head_dim
    training = 3 * forward  (backward costs twice the forward)

    N_matmul counts the weights of every matmul (attention, MLP, output head) and excludes
    embedding lookups, norms and biases; the second term is QK^T and AV over a context of T
    (the full context, not halved for causality, as PaLM counts it).
    """
    t = seq_len or cfg.context_length
    d, hd = cfg.d_model, cfg.dim_per_head
    attn = d * hd * (2 * cfg.n_heads + 2 * cfg.kv_heads)
    mlp = (3 if cfg.family == "llama" else 2) * d * cfg.d_ff
    n_matmul = cfg.n_layers * (attn + mlp) + d * cfg.vocab_size
    forward = 2 * n_matmul + 4 * cfg.n_layers * t * cfg.n_heads * hd
    return {"n_matmul_params": n_matmul, "forward": forward, "train": 3 * forward}


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    if n < 1000:
        return str(int(n))
    exp = min(int(math.log10(n) // 3), 4)
    return f"{n / 1000**exp:.3g}{' KMGT'[exp]}"
