"""`jaxllm eval`: perplexity and bits per byte of a checkpoint on a dataset's `val` split or text files.

Tokens are scored in windows of `window` + 1 tokens that overlap by one (window i holds tokens
i·W … i·W + W), so every token after the first is predicted once, from the up to W tokens before it
in its window. The pure part is `window_nll` (jit-able: summed negative log-likelihood of each
window's targets, float32 log-softmax); the edge batches windows to one fixed shape (one compile),
shows a progress bar and returns an `EvalResult`:

- perplexity = exp(total NLL / scored tokens);
- bits per byte = total NLL / ln 2 / UTF-8 bytes of the text (a dataset's `val` split: the bytes
  `meta.json` records for it; text files: their own bytes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import InputError
from jaxllm.model import Params, forward


@dataclass
class EvalResult:
    source: str  # "DATA (val split)" or the files
    tokens: int  # tokens scored (predicted)
    bytes: int
    nll: float  # total negative log-likelihood, nats
    window: int

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.tokens)

    @property
    def bits_per_byte(self) -> float:
        return self.nll / math.log(2) / self.bytes

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "perplexity": self.perplexity, "bits_per_byte": self.bits_per_byte}


@partial(jax.jit, static_argnums=0)
def window_nll(cfg: ModelConfig, params: Params, tokens_BW1: jax.Array, mask_BW: jax.Array) -> jax.Array:
    """Summed NLL (nats, float32) of tokens_BW1[:, 1:] given what precedes them, where mask_BW is true."""
    logits_BWV = forward(cfg, params, tokens_BW1[:, :-1]).astype(jnp.float32)
    logp_BWV = jax.nn.log_softmax(logits_BWV, axis=-1)
    target_logp_BW = jnp.take_along_axis(logp_BWV, tokens_BW1[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(mask_BW, target_logp_BW, 0.0), axis=-1)


def windows(ids: np.ndarray, window: int) -> Iterator[np.ndarray]:
    """Consecutive slices of up to window + 1 tokens overlapping by one (each has >= 2 tokens)."""
    for start in range(0, max(len(ids) - 1, 0), window):
        yield ids[start : start + window + 1]


def score(
    cfg: ModelConfig, params: Params, sequences: Sequence[np.ndarray], window: int, batch_size: int,
    progress: bool = False,
) -> tuple[float, int]:  # fmt: skip
    """(total NLL, tokens scored) of every sequence, each cut into `windows`."""
    from tqdm import tqdm

    chunks = [w for ids in sequences for w in windows(np.asarray(ids), window)]
    total, count = 0.0, 0
    bar = tqdm(total=len(chunks), unit="window", disable=not progress, leave=False)
    for i in range(0, len(chunks), batch_size):
        batch = chunks[i : i + batch_size]
        tokens_BW1 = np.zeros((batch_size, window + 1), np.int32)
        mask_BW = np.zeros((batch_size, window), bool)
        for row, chunk in enumerate(batch):
            tokens_BW1[row, : len(chunk)] = chunk
            mask_BW[row, : len(chunk) - 1] = True
        total += float(np.sum(np.asarray(window_nll(cfg, params, tokens_BW1, mask_BW), np.float64)))
        count += int(mask_BW.sum())
        bar.update(len(batch))
    bar.close()
    return total, count


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | Path | None = None,
    files: Sequence[str | Path] = (),
    window: int | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> EvalResult:
    """What `jaxllm eval` does: load a checkpoint, score a dataset's val split or text files."""
    from jaxllm.checkpoint import load_params
    from jaxllm.slots import inference_config

    if (data is None) == (not files):
        raise InputError("give either --data DATA (its val split) or text FILEs, not both or neither")
    if batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {batch_size}")
    cfg, params = load_params(checkpoint)
    cfg = inference_config(cfg)
    window = min(cfg.context_length, 1024) if window is None else window
    if not 1 <= window <= cfg.context_length:
        raise InputError(f"--window must be between 1 and the context length {cfg.context_length}, got {window}")
    if data is not None:
        sequences, n_bytes, source = _val_split(cfg, data)
    else:
        sequences, n_bytes, source = _text_files(cfg, checkpoint, files)
    nll, tokens = score(cfg, params, sequences, window, batch_size, progress)
    if tokens == 0:
        raise InputError(f"{source}: nothing to score (fewer than two tokens)")
    return EvalResult(source, tokens, n_bytes, nll, window)


def _val_split(cfg: ModelConfig, data: str | Path) -> tuple[list[np.ndarray], int, str]:
    from jaxllm.data.loader import check_data_matches_model
    from jaxllm.data.meta import open_tokens

    meta = check_data_matches_model(data, cfg, allow_larger_model_vocab=True)
    return [np.asarray(open_tokens(data, "val", meta), np.int32)], meta.splits.val.bytes, f"{data} (val split)"


def _text_files(cfg: ModelConfig, checkpoint: str | Path, files: Sequence[str | Path]) -> tuple[list, int, str]:
    from jaxllm.text import load_codec

    codec = load_codec(checkpoint, cfg.vocab_size)
    sequences, n_bytes = [], 0
    for f in map(Path, files):
        if not f.is_file():
            raise InputError(f"{f}: no such file")
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{f}: not UTF-8 text ({err.reason} at byte {err.start})") from None
        sequences.append(np.asarray(codec.encode(text), np.int32))
        n_bytes += len(text.encode())
    return sequences, n_bytes, ", ".join(map(str, files))
