"""GGUF (llama.cpp) interop: read a llama-architecture `.gguf` file into Hugging Face form.

`read_gguf` returns a `jaxllm.pretrained.HFCheckpoint`: the `config.json` transformers would write
for `LlamaForCausalLM`, the weights under transformers' names as float32 (dequantized with the
`gguf` package, the Q/K row permutation of llama.cpp's converter undone), and `tokenizer.json`,
`tokenizer_config.json` (with the chat template), `special_tokens_map.json` and
`generation_config.json` rebuilt from the file's metadata. `import_gguf` hands that checkpoint to
`jaxllm.hf.import_checkpoint`, the one writer of jaxllm params directories.

The results follow what `transformers` does with `from_pretrained(dir, gguf_file=name)`: the same
tensors, the same token ids. See docs/models.md ("GGUF files").
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxllm.errors import InputError
from jaxllm.pretrained import HFCheckpoint

if TYPE_CHECKING:
    from jaxllm.config import ModelConfig

MAGIC = b"GGUF"
ARCHITECTURES = ("llama",)

# Tensor types read (dequantized by `gguf.quants.dequantize`); any other is refused by name.
TENSOR_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# llama.cpp tensor names -> transformers LlamaForCausalLM names.
_TOP_TENSORS = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")

# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

# Split regexes transformers applies for some `tokenizer.ggml.pre` names of byte-level vocabularies
# (others keep GPT-2's default split). Only the ones llama-architecture files use.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    **dict.fromkeys(
        ("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral", "dbrx", "smaug-bpe", "midm-2.0"), _LLAMA3_SPLIT
    ),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


def read_gguf(path: str | Path) -> HFCheckpoint:
    """A llama-architecture GGUF file as an `HFCheckpoint` (float32 tensors, HF names and layout)."""
    path = Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise InputError(f"{path}: GGUF architecture {arch!r} is not supported (only {', '.join(ARCHITECTURES)})")
    config = _config(meta, reader, path)
    tensors = _tensors(reader, config, path)
    emb = tensors["model.embed_tokens.weight"]
    if emb.shape != (config["vocab_size"], config["hidden_size"]):
        raise InputError(
            f"{path}: token_embd.weight is {emb.shape}, metadata says vocab {config['vocab_size']} x "
            f"hidden {config['hidden_size']}"
        )
    files = _tokenizer_files(meta, config, path)
    return HFCheckpoint(config=config, tensors=tensors, files=files, source=str(path), source_format="gguf")


def import_gguf(file: str | Path, out_dir: str | Path) -> ModelConfig:
    """`read_gguf` then `jaxllm.hf.import_checkpoint`: a jaxllm params directory from a GGUF file."""
    ckpt = read_gguf(file)
    from jaxllm.hf import import_checkpoint  # the one HF -> jaxllm mapping lives there

    return import_checkpoint(ckpt, out_dir)


# --- file and metadata -------------------------------------------------------------------------


def _open(path: Path) -> Any:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if not path.is_file():
        raise InputError(f"{path}: not a file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != MAGIC:
        raise InputError(f"{path}: not a GGUF file (it does not start with {MAGIC!r})")
    from gguf import GGUFReader

    try:
        reader = GGUFReader(path)
    except Exception as err:  # the reader raises whatever numpy or struct gives on a short or corrupt file
        raise InputError(f"{path}: truncated or corrupt GGUF file ({type(err).__name__}: {err})") from None
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InputError(
                f"{path}: truncated GGUF file (tensor {t.name} ends at byte {t.data_offset + t.n_bytes}, "
                f"the file has {size})"
            )
    return reader


class _Metadata:
    """The key/value metadata of a GGUF file as Python values (str, int, float, bool, lists)."""

    def __init__(self, reader: Any, path: Path):
        self._fields = reader.fields
        self._path = path
        self._cache: dict[str, Any] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        if field is None:
            return default
        if key in self._cache:
            return self._cache[key]
        try:
            value = self._cache[key] = _field_value(field)
            return value
        except (UnicodeDecodeError, IndexError, ValueError) as err:
            raise InputError(f"{self._path}: unreadable metadata {key} ({err})") from None

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise InputError(f"{self._path}: GGUF metadata {key} is missing")
        return value

    def __iter__(self) -> Any:
        return iter(list(self._fields))


def _field_value(field: Any) -> Any:
    from gguf import GGUFValueType

    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        sub = field.types[-1]
        if sub == GGUFValueType.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data]
        if sub == GGUFValueType.ARRAY:
            raise ValueError("nested arrays")
        if not field.data:
            return []
        values = np.concatenate([field.parts[i] for i in field.data])
        return [bool(v) for v in values] if sub == GGUFValueType.BOOL else values.tolist()
    if kind == GGUFValueType.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    value = field.parts[field.data[0]][0]
    if kind == GGUFValueType.BOOL:
        return bool(value)
    if kind in (GGUFValueType.FLOAT32, GGUFValueType.FLOAT64):
        return _decimal(value)
    return int(value)


def _decimal(value: Any) -> float:
    """The shortest decimal that reads back as the same number (1e-05, not 9.99999974e-06 for a float32)."""
    return float(str(value))


# --- config ------------------------------------------------------------------------------------


def _config(meta: _Metadata, reader: Any, path: Path) -> dict[str, Any]:
    arch = "llama"
    n_heads = meta.require(f"{arch}.attention.head_count")
    n_kv = meta.get(f"{arch}.attention.head_count_kv", n_heads)
    for key, value in (("head_count", n_heads), ("head_count_kv", n_kv)):
        if not isinstance(value, int):  # llama.cpp allows a per-layer list; LlamaForCausalLM does not
            raise InputError(f"{path}: {arch}.attention.{key} per layer ({value!r}) is not supported")
    hidden = meta.require(f"{arch}.embedding_length")
    head_dim = meta.get(f"{arch}.attention.key_length") or meta.get(f"{arch}.rope.dimension_count")
    head_dim = head_dim or hidden // n_heads
    value_dim = meta.get(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise InputError(f"{path}: key length {head_dim} != value length {value_dim} is not supported")
    rope_dims = meta.get(f"{arch}.rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        raise InputError(f"{path}: partial RoPE ({rope_dims} of {head_dim} dimensions) is not supported")
    if any(t.name == "rope_freqs.weight" for t in reader.tensors):
        raise InputError(f"{path}: per-frequency RoPE factors (rope_freqs.weight, Llama-3.1 style) are not supported")
    if any(t.name.endswith("_exps.weight") for t in reader.tensors):
        raise InputError(f"{path}: mixture-of-experts llama files are not supported")

    tokens = meta.get("tokenizer.ggml.tokens") or []
    vocab = meta.get(f"{arch}.vocab_size") or len(tokens)
    if not vocab:
        emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = int(emb.shape[-1]) if emb is not None else 0
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": meta.require(f"{arch}.feed_forward_length"),
        "num_hidden_layers": meta.require(f"{arch}.block_count"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5),
        "rope_theta": meta.get(f"{arch}.rope.freq_base", 10000.0),
        "rope_scaling": _rope_scaling(meta, arch, path),
        "max_position_embeddings": meta.get(f"{arch}.context_length", 2048),
        "attention_bias": any(_BLOCK_RE.match(t.name) and t.name.endswith(".bias") for t in reader.tensors),
        "mlp_bias": False,
        "tie_word_embeddings": all(t.name != "output.weight" for t in reader.tensors),
        "torch_dtype": "float32",
    }
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        token_id = meta.get(f"tokenizer.ggml.{key.replace('pad_', 'padding_')}")
        if token_id is not None:
            config[key] = token_id
    return config


def _rope_scaling(meta: _Metadata, arch: str, path: Path) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    factor = meta.get(f"{arch}.rope.scaling.factor")
    if kind == "linear" and factor:
        return {"rope_type": "linear", "factor": factor}
    raise InputError(f"{path}: RoPE scaling {kind!r} is not supported (only linear)")


# --- tensors -----------------------------------------------------------------------------------


def _hf_name(name: str) -> str | None:
    if name in _TOP_TENSORS:
        return _TOP_TENSORS[name]
    m = _BLOCK_RE.match(name)
    if m and m.group(2) in _BLOCK_TENSORS:
        return f"model.layers.{m.group(1)}.{_BLOCK_TENSORS[m.group(2)]}.{m.group(3)}"
    return None


def _tensors(reader: Any, config: dict[str, Any], path: Path) -> dict[str, np.ndarray]:
    from gguf.quants import dequantize

    # Refuse before any work: names jaxllm cannot place, types it cannot read.
    for t in reader.tensors:
        if t.tensor_type.name not in TENSOR_TYPES:
            raise InputError(
                f"{path}: tensor {t.name} has type {t.tensor_type.name}, which is not supported "
                f"({', '.join(TENSOR_TYPES)})"
            )
        if _hf_name(t.name) is None:
            raise InputError(f"{path}: tensor {t.name} has no place in a llama model (not supported)")
    names = {_hf_name(t.name) for t in reader.tensors}
    expected = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{module}.weight"
        for i in range(config["num_hidden_layers"])
        for module in _BLOCK_TENSORS.values()
    ]
    missing = [n for n in expected if n not in names]
    if missing:
        raise InputError(f"{path}: {len(missing)} weight(s) missing, e.g. {missing[0]} (HF name)")
    out: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne innermost first; numpy outermost first
        try:
            w = dequantize(t.data, t.tensor_type)
        except (ValueError, NotImplementedError) as err:
            raise InputError(f"{path}: tensor {t.name} ({t.tensor_type.name}) cannot be read: {err}") from None
        w = np.array(w, dtype=np.float32).reshape(shape)  # a copy: nothing keeps the file mapped
        if ".attn_q." in t.name:
            w = _unpermute(w, config["num_attention_heads"])
        elif ".attn_k." in t.name:
            w = _unpermute(w, config["num_key_value_heads"])
        out[_hf_name(t.name)] = w
    return out


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row order: its converter interleaves each head's two RoPE halves.

    llama.cpp reorders the rows (outputs) of each head from HF's `[first half, second half]` to pairs
    `(x0, x_half), (x1, x_half+1), …` for its interleaved RoPE; this puts them back.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- tokenizer and generation files ------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: every byte as a printable character (the spelling of its vocabulary)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def _tokenizer_files(meta: _Metadata, config: dict[str, Any], path: Path) -> dict[str, bytes]:
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        return {"generation_config.json": _json(_generation_config(config))}
    tokens = meta.require("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or []
    if model == "gpt2":
        tokenizer = _byte_level_tokenizer(meta, tokens, types, path)
    elif model == "llama":
        tokenizer = _sentencepiece_tokenizer(meta, tokens, types, path)
    else:
        raise InputError(
            f"{path}: tokenizer model {model!r} is not supported (only 'gpt2', byte-level BPE, and 'llama', "
            "SentencePiece-style BPE)"
        )

    def token(key: str) -> str | None:
        token_id = meta.get(f"tokenizer.ggml.{key}")
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    named = {
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "pad_token": token("padding_token_id"),
    }
    named = {k: v for k, v in named.items() if v is not None}
    from tokenizers import AddedToken, processors

    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in named.values()])
    # Files from before the flag existed: llama.cpp adds BOS to a SentencePiece vocabulary unless told not to.
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama"))
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False))
    single, specials = "$A:0", []
    for flag, key, where in ((add_bos, "bos_token", "start"), (add_eos, "eos_token", "end")):
        if flag and key in named:
            single = f"{named[key]}:0 {single}" if where == "start" else f"{single} {named[key]}:0"
            specials.append((named[key], tokenizer.token_to_id(named[key])))
    pair = f"{single} {single.replace('$A', '$B').replace(':0', ':1')}"
    tokenizer.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)

    tok_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    template = _chat_template(meta)
    if template is not None:
        tok_config["chat_template"] = template
    return {
        "tokenizer.json": tokenizer.to_str(pretty=True).encode(),
        "tokenizer_config.json": _json(tok_config),
        "special_tokens_map.json": _json(named),
        "generation_config.json": _json(_generation_config(config)),
    }


def _byte_level_tokenizer(meta: _Metadata, tokens: list[str], types: list[int], path: Path) -> Any:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    merges = meta.get("tokenizer.ggml.merges")
    if not merges:
        raise InputError(f"{path}: byte-level (gpt2) tokenizer without tokenizer.ggml.merges is not supported")
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    def spelled(token: str) -> str:  # tokens outside the byte alphabet are respelled byte by byte
        return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

    vocab = {spelled(t): i for i, t in enumerate(tokens)}
    pairs = []
    for merge in merges:
        left, _, right = merge.partition(" ")
        pairs.append((left, right))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
    split = _PRE_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|>…) stay whole and are special; a "control" token spelled outside the
    # byte alphabet is a mislabel (transformers skips it too). User-defined tokens stay whole, not special.
    control = [t for t, k in zip(tokens, types, strict=False) if k == _CONTROL and set(t) <= alphabet]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer


def _sentencepiece_tokenizer(meta: _Metadata, tokens: list[str], types: list[int], path: Path) -> Any:
    """SentencePiece-style BPE (`llama`): "▁" for spaces, `<0xNN>` byte fallback, merges from the file or
    recovered from the token scores. Built as transformers' `LlamaTokenizer` does (a "▁" before the first
    word only; `tokenizer.ggml.add_space_prefix` is not consulted, as in transformers)."""
    from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    vocab = {t: i for i, t in enumerate(tokens)}
    merges = meta.get("tokenizer.ggml.merges")
    if merges:
        pairs = [tuple(m.partition(" ")[::2]) for m in merges]
    else:
        scores = meta.get("tokenizer.ggml.scores")
        if not scores or len(scores) != len(tokens):
            raise InputError(f"{path}: SentencePiece (llama) tokenizer without merges needs tokenizer.ggml.scores")
        pairs = _merges_from_scores(vocab, dict(zip(tokens, scores, strict=True)))
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=True, byte_fallback=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    control = [t for t, k in zip(tokens, types, strict=False) if k == _CONTROL]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types, strict=False) if k == _USER_DEFINED and t in vocab]
    tokenizer.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    return tokenizer


def _merges_from_scores(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a scored vocabulary: every split of a token into two tokens, best-scored
    result first (ties: longer left piece, then longer right piece, then vocabulary order), as transformers."""
    found = []
    for token, score in scores.items():
        splits = [(token[:i], token[i:]) for i in range(1, len(token)) if token[:i] in vocab and token[i:] in vocab]
        splits.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        found.extend((left, right, score) for left, right in splits)
    found.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)  # stable: equal keys keep their order
    return [(left, right) for left, right, _ in found]


def _chat_template(meta: _Metadata) -> str | list[dict[str, str]] | None:
    default = meta.get("tokenizer.chat_template")
    prefix = "tokenizer.chat_template."
    named = [{"name": key[len(prefix) :], "template": meta.get(key)} for key in meta if key.startswith(prefix)]
    if not named:
        return default
    return ([{"name": "default", "template": default}] if default is not None else []) + named


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    return {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}


def _json(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode()
