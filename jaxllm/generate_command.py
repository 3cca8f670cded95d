"""The `jaxllm generate` command: load a checkpoint and its tokenizer, sample, print."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jaxllm import decode_layout
from jaxllm.checkpoint import load_params_on_mesh
from jaxllm.errors import InputError
from jaxllm.generation import complete_text, precompile, with_text_stops
from jaxllm.profiler import trace
from jaxllm.request import Sampling, as_int, check_request
from jaxllm.text import load_codec


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
    chat: bool = False,
    tokenizer_path: str | Path | None = None,
    max_new_tokens: int | None = None,
    num_samples: int = 1,
    out: Any = None,
    mesh_overrides: Sequence[str] = (),
    dtype: str | None = None,
    profile: str | Path | None = None,
    **options: Any,
) -> SampleStats:
    """What `jaxllm generate` does: load a checkpoint and its tokenizer, sample, print to `out`.

    `chat`: `prompt` is a user message, rendered with the checkpoint's chat template; only the
    answer is printed. One sample streams as it is generated; several print one after another. An
    empty prompt starts from the BOS (or end-of-text) token: unconditional samples. `max_new_tokens`
    None: as many as the context leaves, at most 256. `mesh_overrides`: `mesh.*=` overrides (as
    `jaxllm train`'s) to shard the model and its cache over devices. `dtype` (e.g. "bfloat16"): weights
    and computation in that dtype (`jaxllm.checkpoint.with_dtype`). `profile`: a `jax.profiler` trace of
    the generation (compilation excluded) into that directory. `options`: the other `Sampling` fields.
    """
    out = out or sys.stdout
    cfg, params = decode_layout.prepare(*load_params_on_mesh(checkpoint, mesh_overrides, dtype))
    codec = load_codec(checkpoint, cfg.vocab_size, tokenizer_path)
    num_samples = as_int(num_samples, "num_samples")
    if num_samples < 1:
        raise InputError(f"num_samples must be >= 1, got {num_samples}")
    ids = codec.encode_chat([{"role": "user", "content": prompt}]) if chat else codec.encode(prompt)
    if not ids:
        ids = codec.start_ids()
    if max_new_tokens is None:
        max_new_tokens = max(0, min(256, cfg.context_length - len(ids)))
    start = time.perf_counter()
    sampling = with_text_stops(cfg, codec, Sampling.make(None, {**options, "max_new_tokens": max_new_tokens}))
    req = check_request(cfg, [ids] * num_samples, sampling, codec)
    if req.max_new_tokens > 0:
        precompile(cfg, params, req)
    compile_seconds = time.perf_counter() - start
    stream = num_samples == 1
    shown = "" if chat else prompt
    if stream:
        print(shown, end="", file=out, flush=True)
    counted: list[int] = []

    def on_text(row: int, piece: str) -> None:
        print(piece, end="", file=out, flush=True)

    start = time.perf_counter()
    with trace(profile):
        texts = complete_text(
            cfg,
            params,
            codec,
            req,
            on_text=on_text if stream else None,
            callback=lambda row, token: counted.append(token),
        )
    elapsed = time.perf_counter() - start
    if stream:
        print(file=out, flush=True)
    else:
        for i, text in enumerate(texts):
            print(f"--- sample {i + 1} ---\n{shown}{text}", file=out)
    return SampleStats(len(counted), elapsed, compile_seconds)
