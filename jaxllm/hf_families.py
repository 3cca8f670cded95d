"""Per-family Hugging Face mappings: config.json <-> ModelConfig, and tensor names <-> torch_ref names.

Families: `gpt2` (family gpt) and the Llama family `llama`, `qwen2`, `mistral` (family llama). The
Llama-family files use the same module layout as torch_ref with other names (both store Linear
weights as (out, in)), so their tensors map by renaming alone; GPT-2 stores Conv1D weights (in, out)
and fuses q/k/v. Numpy only: the file I/O and the params writer live in `jaxllm/hf.py`.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import InputError

CONFIG_JSON = "config.json"
ARCHITECTURES = {
    "gpt2": "GPT2LMHeadModel",
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}
LLAMA_FAMILY = ("llama", "qwen2", "mistral")
ROPE_TYPES = ("default", "linear", "llama3")


# Config -----------------------------------------------------------------------------------------


def config_from_hf(hf: dict[str, Any], name: str = "hf") -> tuple[ModelConfig, str]:
    """(ModelConfig, model_type) from a `config.json` mapping; anything unsupported is refused by name."""
    if not isinstance(hf, dict):
        raise InputError(f"{CONFIG_JSON}: expected a JSON object, got {type(hf).__name__}")
    model_type = hf.get("model_type")
    if model_type not in ARCHITECTURES:
        raise InputError(
            f"{CONFIG_JSON}: model_type {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES)})"
        )
    for arch in hf.get("architectures") or []:
        if arch != ARCHITECTURES[model_type]:
            raise InputError(
                f"{CONFIG_JSON}: architecture {arch!r} is not supported for model_type {model_type!r} "
                f"(only {ARCHITECTURES[model_type]})"
            )
    try:
        cfg = _gpt2_config(hf, name) if model_type == "gpt2" else _llama_config(hf, model_type, name)
    except KeyError as err:
        raise InputError(f"{CONFIG_JSON}: missing key {err.args[0]!r} (needed for model_type {model_type!r})") from None
    return cfg, model_type


def default_model_type(cfg: ModelConfig) -> str:
    """The Hugging Face model_type a config exports as when its params directory does not record one."""
    if cfg.family == "gpt":
        return "gpt2"
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def config_to_hf(cfg: ModelConfig, model_type: str) -> dict[str, Any]:
    """`config.json` for `cfg` as `model_type`; refuses a config that the family cannot express."""
    check_exportable(cfg, model_type)
    if model_type == "gpt2":
        return _gpt2_config_to_hf(cfg)
    hf: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.d_ff,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.dim_per_head,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.context_length,
        "rms_norm_eps": cfg.norm_eps,
        "initializer_range": cfg.init_std,
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0,
        "rope_theta": cfg.rope_theta,  # transformers 4 layout; transformers 5 reads it too
        "rope_scaling": None,
    }
    if cfg.rope_scaling is not None:
        scaling = cfg.rope_scaling.model_dump()
        hf["rope_scaling"] = {"rope_type": scaling.pop("type"), **scaling}
    if model_type == "llama":
        hf |= {"attention_bias": False, "mlp_bias": False}
    elif model_type == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    elif model_type == "qwen2":
        window = cfg.sliding_window is not None
        hf |= {
            "use_sliding_window": window,
            "sliding_window": cfg.sliding_window,
            "max_window_layers": 0 if window else cfg.n_layers,
            "layer_types": ["sliding_attention" if window else "full_attention"] * cfg.n_layers,
        }
    return hf


def check_exportable(cfg: ModelConfig, model_type: str) -> None:
    if model_type not in ARCHITECTURES:
        raise InputError(f"model_type {model_type!r} cannot be exported (supported: {', '.join(ARCHITECTURES)})")
    if model_type == "gpt2":
        if cfg.family != "gpt" or cfg.kv_heads != cfg.n_heads or cfg.dim_per_head * cfg.n_heads != cfg.d_model:
            raise InputError(
                f"config {cfg.name!r} is not a GPT-2 architecture (needs family gpt, multi-head attention, "
                "n_heads * head_dim == d_model)"
            )
        if cfg.sliding_window is not None:
            raise InputError(f"config {cfg.name!r} has a sliding_window, which GPT-2 cannot express")
        return
    if cfg.family != "llama":
        raise InputError(f"config {cfg.name!r} is family {cfg.family!r}; model_type {model_type!r} needs family llama")
    if model_type == "qwen2" and not cfg.qkv_bias:
        raise InputError(f"config {cfg.name!r} has no qkv_bias, which model_type 'qwen2' always has")
    if model_type != "qwen2" and cfg.qkv_bias:
        raise InputError(f"config {cfg.name!r} has qkv_bias, which model_type {model_type!r} cannot express")
    if model_type == "llama" and cfg.sliding_window is not None:
        raise InputError(f"config {cfg.name!r} has a sliding_window, which model_type 'llama' cannot express")


def _gpt2_config(hf: dict[str, Any], name: str) -> ModelConfig:
    act = hf.get("activation_function", "gelu_new")
    if act not in _GELU:
        raise InputError(f"{CONFIG_JSON}: activation_function {act!r} is not supported ({sorted(_GELU)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise InputError(f"{CONFIG_JSON}: {flag}=true is not supported")
    if hf.get("scale_attn_weights") is False:
        raise InputError(f"{CONFIG_JSON}: scale_attn_weights=false is not supported")
    d = hf["n_embd"]
    return _model_config(
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


def _gpt2_config_to_hf(cfg: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": [ARCHITECTURES["gpt2"]],
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


def _llama_config(hf: dict[str, Any], model_type: str, name: str) -> ModelConfig:
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise InputError(f"{CONFIG_JSON}: hidden_act {act!r} is not supported (only 'silu')")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise InputError(f"{CONFIG_JSON}: {flag}=true is not supported")
    d, n = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or None
    if head_dim == d // n and d % n == 0:
        head_dim = None  # the default, kept implicit so that export -> import gives the same config
    return _model_config(
        name=name,
        family="llama",
        vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 2048),
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=n,
        n_kv_heads=hf.get("num_key_value_heads") or n,
        head_dim=head_dim,
        d_ff=hf["intermediate_size"],
        tie_embeddings=hf.get("tie_word_embeddings", False),
        norm_eps=hf.get("rms_norm_eps", 1e-6),
        init_std=hf.get("initializer_range", 0.02),
        qkv_bias=model_type == "qwen2",
        sliding_window=_sliding_window(hf, model_type),
        **_rope(hf),
    )


def _model_config(**fields: Any) -> ModelConfig:
    return ModelConfig.from_dict(fields, source=CONFIG_JSON)


def _sliding_window(hf: dict[str, Any], model_type: str) -> int | None:
    """Mistral: `sliding_window` (null: none). Qwen2: only with `use_sliding_window`, on every layer."""
    if model_type == "mistral":
        return hf.get("sliding_window")
    if model_type != "qwen2" or not hf.get("use_sliding_window") or hf.get("sliding_window") is None:
        return None
    n_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types") or [
        "sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n_layers)
    ]
    if all(t == "full_attention" for t in layer_types):
        return None
    if all(t == "sliding_attention" for t in layer_types):
        return hf["sliding_window"]
    raise InputError(
        f"{CONFIG_JSON}: a sliding window on some layers only (layer_types / max_window_layers) is not supported"
    )


def _rope(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling from transformers 5 `rope_parameters` or transformers 4 `rope_theta` +
    `rope_scaling` (key `rope_type` or `type`)."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise InputError(f"{CONFIG_JSON}: rope_parameters must be an object, got {params!r}")
    nested = [key for key, value in params.items() if isinstance(value, dict)]
    if nested:
        raise InputError(f"{CONFIG_JSON}: per-layer-type rope_parameters ({', '.join(nested)}) are not supported")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise InputError(
            f"{CONFIG_JSON}: rope scaling type {rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
        )
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise InputError(f"{CONFIG_JSON}: partial_rotary_factor {partial} is not supported (only 1.0)")
    out: dict[str, Any] = {"rope_theta": theta}
    if rope_type == "linear":
        out["rope_scaling"] = {"type": "linear", "factor": params.get("factor")}
    elif rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor")
        original = params.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
        out["rope_scaling"] = {
            "type": "llama3",
            **{k: params.get(k) for k in keys},
            "original_max_position_embeddings": original,
        }
    return out


_GELU = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu_fast": "tanh", "gelu": "exact"}


# Tensor names -----------------------------------------------------------------------------------
# Llama family: HF module names <-> torch_ref module names, per block (model.layers.{i}.X) and at the top.
_LLAMA_BLOCK = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.o_proj": "attn.out",
    "mlp.gate_proj": "mlp.gate",
    "mlp.up_proj": "mlp.up",
    "mlp.down_proj": "mlp.down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
}
_LLAMA_TOP = {"model.embed_tokens": "token_embed", "model.norm": "final_norm", "lm_head": "lm_head"}
# GPT-2 (keys without the optional "transformer." prefix).
_GPT2_BLOCK = {
    "ln_1": "attn_norm",
    "ln_2": "mlp_norm",
    "attn.c_proj": "attn.out",
    "mlp.c_fc": "mlp.fc",
    "mlp.c_proj": "mlp.proj",
}
_GPT2_TOP = {"wte": "token_embed", "wpe": "pos_embed", "ln_f": "final_norm"}
_GPT2_CONV1D = ("attn.out", "mlp.fc", "mlp.proj")

# Buffers some files carry that are not parameters: GPT-2's causal masks, old Llama files' inv_freq.
IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|\.rotary_emb\.inv_freq)$")


def hf_name(model_type: str, torch_name: str) -> str:
    """The Hugging Face name of a torch_ref parameter (GPT-2's fused c_attn excepted)."""
    module, leaf = torch_name.rsplit(".", 1)
    if model_type == "gpt2":
        if module.startswith("blocks."):
            _, i, rest = module.split(".", 2)
            return f"transformer.h.{i}.{_inverse(_GPT2_BLOCK)[rest]}.{leaf}"
        return "lm_head.weight" if module == "lm_head" else f"transformer.{_inverse(_GPT2_TOP)[module]}.{leaf}"
    if module.startswith("blocks."):
        _, i, rest = module.split(".", 2)
        return f"model.layers.{i}.{_inverse(_LLAMA_BLOCK)[rest]}.{leaf}"
    return f"{_inverse(_LLAMA_TOP)[module]}.{leaf}"


def _inverse(d: dict[str, str]) -> dict[str, str]:
    return {v: k for k, v in d.items()}


def to_hf_tensors(model_type: str, sd: dict[str, np.ndarray], tie: bool) -> dict[str, np.ndarray]:
    """torch_ref state dict (numpy) -> tensors named and laid out as transformers saves them."""
    sd = dict(sd)
    if tie:
        sd.pop("lm_head.weight", None)
    out: dict[str, np.ndarray] = {}
    if model_type == "gpt2":
        layers = sorted({int(k.split(".")[1]) for k in sd if k.startswith("blocks.")})
        for i in layers:
            p = f"blocks.{i}."
            for leaf in ("weight", "bias"):
                qkv = [sd.pop(f"{p}attn.{n}.{leaf}") for n in ("query", "key", "value")]
                out[f"transformer.h.{i}.attn.c_attn.{leaf}"] = np.concatenate(
                    [w.T for w in qkv] if leaf == "weight" else qkv, axis=-1
                )
    for key, w in sd.items():
        conv1d = model_type == "gpt2" and key.endswith(".weight") and key.rsplit(".", 1)[0].endswith(_GPT2_CONV1D)
        out[hf_name(model_type, key)] = w.T if conv1d else w
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def from_hf_tensors(
    model_type: str, tensors: dict[str, np.ndarray], expected: dict[str, tuple[int, ...]], tie: bool, source: str
) -> dict[str, np.ndarray]:
    """HF tensors -> a torch_ref state dict (float32 numpy), after checking names and shapes.

    `expected`: torch_ref name -> shape, for the config. A missing, unexpected or misshapen tensor is
    an `InputError` naming it (in the file's naming).
    """
    wanted = {}  # HF name -> (torch_ref name, shape in the file)
    for name, shape in expected.items():
        if tie and name == "lm_head.weight":
            continue
        if model_type == "gpt2" and ".attn." in name and name.rsplit(".", 2)[-2] in ("query", "key", "value"):
            _, i, _, proj, leaf = name.split(".")
            if proj == "query":  # the fused c_attn stands for all three
                fused = (shape[1], 3 * shape[0]) if leaf == "weight" else (3 * shape[0],)
                wanted[f"transformer.h.{i}.attn.c_attn.{leaf}"] = (f"blocks.{i}.attn.c_attn.{leaf}", fused)
            continue
        conv1d = model_type == "gpt2" and name.endswith(".weight") and name.rsplit(".", 1)[0].endswith(_GPT2_CONV1D)
        wanted[hf_name(model_type, name)] = (name, shape[::-1] if conv1d else shape)
    given = {}
    for key, w in tensors.items():
        if IGNORED.search(key):
            continue
        if model_type == "gpt2" and not key.startswith("transformer.") and key != "lm_head.weight":
            key = f"transformer.{key}"
        if tie and key == "lm_head.weight":
            continue  # some files store the tied head too
        given[key] = w
    missing, unexpected = sorted(set(wanted) - set(given)), sorted(set(given) - set(wanted))
    if missing:
        raise InputError(f"{source}: missing tensor{_s(missing)} {_names(missing)} (the config needs it)")
    if unexpected:
        raise InputError(f"{source}: unexpected tensor{_s(unexpected)} {_names(unexpected)} (not in the config)")
    sd: dict[str, np.ndarray] = {}
    for key, (name, shape) in wanted.items():
        w = np.asarray(given[key], dtype=np.float32)
        if tuple(w.shape) != tuple(shape):
            raise InputError(f"{source}: tensor {key!r} has shape {tuple(w.shape)}, the config needs {tuple(shape)}")
        if name.endswith(".c_attn.weight") or name.endswith(".c_attn.bias"):
            i, leaf = name.split(".")[1], name.rsplit(".", 1)[1]
            for proj, chunk in zip(("query", "key", "value"), np.split(w, 3, axis=-1), strict=True):
                sd[f"blocks.{i}.attn.{proj}.{leaf}"] = chunk.T if leaf == "weight" else chunk
            continue
        conv1d = model_type == "gpt2" and name.endswith(".weight") and name.rsplit(".", 1)[0].endswith(_GPT2_CONV1D)
        sd[name] = w.T if conv1d else w
    return sd


def _s(items: list) -> str:
    return "s" if len(items) > 1 else ""


def _names(items: list[str]) -> str:
    shown = ", ".join(repr(x) for x in items[:5])
    return shown + (f" and {len(items) - 5} more" if len(items) > 5 else "")
