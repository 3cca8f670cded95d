"""Starting a run from a params directory (`--init CK`): its config, its tokenizer, the files it hands on.

Framework-free (shared by `jaxllm train` and torch_ref). A params directory is anything
`import-hf`/`import-gguf`/`train` wrote: `config.yaml` (the model section), `params/`, and where it
has them `tokenizer.json` and Hugging Face's tokenizer/generation/chat-template files
(`jaxllm.pretrained.KEPT_FILES`). A run started from it:

- takes the model section from it (`config_from_checkpoint`); overrides that would change a
  parameter's shape are refused (`model.dtype`, `model.remat`, a llama's `context_length`… are fine);
- trains only on data tokenized with its tokenizer (`check_data_tokenizer`, by hash);
- writes those files into `RUN/final/` (`carried_files`), so `generate --chat` and `serve` work on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxllm.config import Config, ModelConfig, config_path, read_yaml
from jaxllm.errors import ConfigError, InputError
from jaxllm.pretrained import KEPT_FILES, SOURCE_FILE

CONFIG_FILE = "config.yaml"  # jaxllm.checkpoint's names (that module imports JAX)
PARAMS_DIR = "params"
TOKENIZER_FILE = "tokenizer.json"
# Model fields that decide parameter shapes (context_length too, for the learned positions of "gpt").
_SHAPE_FIELDS = ("family", "vocab_size", "d_model", "n_layers", "n_heads", "kv_heads", "dim_per_head", "d_ff",
                 "tie_embeddings", "qkv_bias")  # fmt: skip


def is_params_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / PARAMS_DIR).is_dir()


def checkpoint_model(ck: str | Path) -> ModelConfig:
    """The model section of the params directory `ck`; an `InputError` when it is not one."""
    if not is_params_dir(ck):
        raise InputError(f"--init {ck}: not a jaxllm params directory (needs {CONFIG_FILE} and {PARAMS_DIR}/)")
    return ModelConfig.from_yaml(Path(ck) / CONFIG_FILE)


def config_from_checkpoint(ck: str | Path, config: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """The run's config: the model section of `ck`, the other sections of `config` (a preset or YAML
    file; None: the defaults), then `overrides`. Refuses a `model.*` value that changes shapes."""
    base = checkpoint_model(ck)
    sections = read_yaml(config_path(config), need_model=False) if config else {}
    data: dict[str, Any] = {k: v for k, v in sections.items() if k != "model"}
    cfg = Config.from_data({**data, "model": base.to_dict()}, overrides, f"{ck}/{CONFIG_FILE}")
    check_same_param_shapes(base, cfg.model, str(ck))
    return cfg


def param_shape_key(cfg: ModelConfig) -> dict[str, Any]:
    """The model fields that decide the parameters' shapes, by name."""
    key = {f: getattr(cfg, f) for f in _SHAPE_FIELDS}
    if cfg.family == "gpt":
        key["context_length"] = cfg.context_length  # learned positions
    return key


def check_same_param_shapes(base: ModelConfig, cfg: ModelConfig, ck: str) -> None:
    """`ConfigError` naming the first `model.*` value that gives `cfg` other parameter shapes than `base`."""
    before, after = param_shape_key(base), param_shape_key(cfg)
    for field, value in before.items():
        if after[field] != value:
            name = {"kv_heads": "n_kv_heads", "dim_per_head": "head_dim"}.get(field, field)
            raise ConfigError(
                f"model.{name}={after[field]!r} would change the shapes of {ck}'s parameters "
                f"(it has {value!r}): with --init, only fields such as dtype, remat or attention may change"
            )


def checkpoint_tokenizer_file(ck: str | Path) -> Path | None:
    file = Path(ck) / TOKENIZER_FILE
    return file if file.is_file() else None


def check_data_tokenizer(data_dir: str | Path, ck: str | Path) -> None:
    """`InputError` unless the dataset was tokenized with `ck`'s tokenizer (same SHA-256 of the file as
    meta.json records, or of the canonical JSON of both). A checkpoint without a tokenizer: no check."""
    from jaxllm.data.meta import read_meta
    from jaxllm.data.tokenizer import same_tokenizer_file, sha256_hex

    own = checkpoint_tokenizer_file(ck)
    if own is None:
        return
    meta = read_meta(data_dir)
    if meta.tokenizer.sha256 == sha256_hex(own.read_bytes()):
        return
    if not same_tokenizer_file(Path(data_dir) / meta.tokenizer.file, own):
        raise InputError(
            f"{data_dir} was tokenized with another tokenizer (sha256 {meta.tokenizer.sha256[:12]}) than {own} "
            f"(sha256 {sha256_hex(own.read_bytes())[:12]}): preprocess it with --tokenizer {ck}"
        )


def carried_files(ck: str | Path | None, data_dir: str | Path) -> list[Path]:
    """What `RUN/final/` holds beside the params: the checkpoint's tokenizer, chat template, generation
    config… (`KEPT_FILES`, `source.json`) when started from one, else the dataset's tokenizer."""
    files = []
    if ck is not None and is_params_dir(ck):
        files = [Path(ck) / name for name in (TOKENIZER_FILE, *KEPT_FILES, SOURCE_FILE) if (Path(ck) / name).is_file()]
    if not any(f.name == TOKENIZER_FILE for f in files) and (Path(data_dir) / TOKENIZER_FILE).is_file():
        files.append(Path(data_dir) / TOKENIZER_FILE)
    return files
