"""The `jaxllm generate` command: load a checkpoint and its tokenizer, sample, print."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxllm.checkpoint import load_params
from jaxllm.completion import end_of_text_id
from jaxllm.data.tokenizer import checkpoint_tokenizer
from jaxllm.errors import InputError
from jaxllm.generation import complete_text, precompile, with_text_stops
from jaxllm.request import Sampling, as_int, check_request


@dataclass
class SampleStats:
    tokens: int
    seconds: float  # generation, compilation excluded
    compile_seconds: float

    def summary(self) -> str:
        rate = self.tokens / self.seconds if self.seconds > 0 else float("inf")
        return (
            f"{self.tokens} tokens in {self.seconds:.2f} s: {rate:.1f} tokens/s "
            f"(compilation before that: {self.compile_seconds:.1f} s)"
        )


def sample_checkpoint(
    checkpoint: str | Path,
    prompt: str,
    *,
    tokenizer_path: str | Path | None = None,
    max_new_tokens: int | None = None,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    num_samples: int = 1,
    stop: Sequence[str] = (),
    out: Any = None,
) -> SampleStats:
    """What `jaxllm generate` does: load a checkpoint and its tokenizer, sample, print to `out`.

    One sample streams as it is generated; several print one after another. An empty prompt
    starts from the end-of-text token (unconditional samples). `max_new_tokens` None: as many as
    the context leaves, at most 256.
    """
    out = out or sys.stdout
    cfg, params = load_params(checkpoint)
    tokenizer = checkpoint_tokenizer(checkpoint, cfg.vocab_size, tokenizer_path)
    num_samples = as_int(num_samples, "num_samples")
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    ids = tokenizer.encode(prompt).ids
    eot = end_of_text_id(tokenizer)
    if not ids and eot is not None:
        ids = [eot]
    if max_new_tokens is None:
        max_new_tokens = max(0, min(256, cfg.context_length - len(ids)))
    start = time.perf_counter()
    sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, stop)
    req = check_request(cfg, [ids] * num_samples, with_text_stops(cfg, tokenizer, sampling), tokenizer)
    if req.max_new_tokens > 0:
        precompile(cfg, params, req)
    compile_seconds = time.perf_counter() - start
    stream = num_samples == 1
    if stream:
        print(prompt, end="", file=out, flush=True)
    counted: list[int] = []

    def on_text(row: int, piece: str) -> None:
        print(piece, end="", file=out, flush=True)

    start = time.perf_counter()
    texts = complete_text(
        cfg,
        params,
        tokenizer,
        req,
        on_text=on_text if stream else None,
        callback=lambda row, token: counted.append(token),
    )
    elapsed = time.perf_counter() - start
    if stream:
        print(file=out)
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} ---\n{prompt}{text}", file=out)
    return SampleStats(len(counted), elapsed, compile_seconds)
