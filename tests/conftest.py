"""Test-wide setup: 8 simulated CPU devices (set before JAX is first imported) and shared helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

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


def random_tokens(vocab_size: int, batch: int, time: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab_size, (batch, time), dtype=np.int64)


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
