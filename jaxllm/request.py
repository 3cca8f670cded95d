"""What one generation call asks for: `Sampling` options and the checked `Request` (framework-free).

Shared by jaxllm's host API (`jaxllm.generation`), torch_ref's generation and the server: the one
place where prompts and sampling options are validated. Imports neither JAX nor torch.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.errors import InputError

INT32_MAX = 2**31 - 1  # the engines hold top_k as int32
SEED_MAX = 2**32 - 1  # a seed is the uint32 of the PRNG key: larger ones are refused, not wrapped


@dataclass(frozen=True)
class Sampling:
    """How to continue a prompt: length, sampling settings, seed and stop conditions.

    - `temperature` 0 is greedy; else temperature, then `top_k` (0: off), then `top_p` (1: off).
    - Row i of a call draws with its own key derived from `seed` and i: the same seed and prompts
      give the same tokens.
    - `stop`: stop token ids (the id is not returned) and stop strings (need a tokenizer; the text
      ends right before the string).
    - `ignore_eos`: text generation does not add the model's end tokens to `stop` (fixed-length
      runs, benchmarks).
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0
    stop: Sequence[int | str] = ()
    ignore_eos: bool = False

    @classmethod
    def make(cls, sampling: Sampling | None = None, options: Mapping[str, Any] | None = None) -> Sampling:
        """`sampling` (or the defaults) with keyword `options` replacing fields; unknown names are refused."""
        if sampling is not None and not isinstance(sampling, Sampling):
            raise InputError(
                f"expected a jaxllm.Sampling or keyword options (max_new_tokens=..., temperature=...), "
                f"got {type(sampling).__name__} {sampling!r}"
            )
        options = dict(options or {})
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise InputError(f"unknown sampling option {unknown[0]!r}; known: {', '.join(sorted(names))}")
        return dataclasses.replace(sampling or cls(), **options)


@dataclass(frozen=True)
class Request:
    """Checked, normalised prompts and sampling options of one call: what the engines consume."""

    prompts: list[list[int]]
    max_new_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_ids: list[int]
    stop_strings: list[str]

    def row(self, i: int) -> Request:
        """Row i on its own (one prompt, the same options)."""
        return dataclasses.replace(self, prompts=[self.prompts[i]])


def as_int(x: Any, what: str) -> int:
    """`x` as a Python int (bools and floats refused), else `InputError` naming `what`."""
    if isinstance(x, bool):
        raise InputError(f"{what} must be an integer, got {x!r}")
    try:
        return operator.index(x)
    except TypeError:
        raise InputError(f"{what} must be an integer, got {x!r}") from None


def check_request(
    cfg: ModelConfig, prompts: Sequence[Sequence[int]], sampling: Sampling, tokenizer: Any = None
) -> Request:
    """Raise `InputError` with a clear message for any bad argument; else the normalised request.

    Refused: no prompts, an empty prompt, a token id outside the vocabulary, temperature < 0 (or
    not finite), top_k outside [0, 2**31), top_p outside (0, 1], max_new_tokens < 0, a seed outside
    [0, 2**32), a prompt longer than the
    context, prompt + max_new_tokens past the context, stop strings without a tokenizer.
    """
    checked = _check_prompts(cfg, prompts)
    max_new_tokens = as_int(sampling.max_new_tokens, "max_new_tokens")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    c = cfg.context_length
    for i, ids in enumerate(checked):
        if len(ids) > c:
            raise InputError(f"prompt {i} has {len(ids)} tokens, more than the context length {c}")
        if len(ids) + max_new_tokens > c:
            raise InputError(
                f"prompt {i} ({len(ids)} tokens) + max_new_tokens {max_new_tokens} = {len(ids) + max_new_tokens} "
                f"tokens overflows the context length {c}; use max_new_tokens <= {c - len(ids)}"
            )
    try:
        temperature, top_p = float(sampling.temperature), float(sampling.top_p)
    except (TypeError, ValueError):
        raise InputError(
            f"temperature and top_p must be numbers, got {sampling.temperature!r}, {sampling.top_p!r}"
        ) from None
    if not math.isfinite(temperature) or temperature < 0:
        raise InputError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    top_k = as_int(sampling.top_k, "top_k")
    if not 0 <= top_k <= INT32_MAX:
        raise InputError(f"top_k must be between 0 (off) and {INT32_MAX}, got {top_k}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1] (1 switches it off), got {top_p}")
    seed = as_int(sampling.seed, "seed")
    if not 0 <= seed <= SEED_MAX:
        raise InputError(f"seed must be between 0 and {SEED_MAX} (32 bits), got {seed}")
    stop_ids, stop_strings = _check_stops(cfg, sampling.stop)
    if stop_strings and tokenizer is None:
        raise InputError("stop strings need a tokenizer (to turn tokens into text); pass tokenizer=...")
    return Request(checked, max_new_tokens, temperature, top_k, top_p, seed, stop_ids, stop_strings)


def _check_prompts(cfg: ModelConfig, prompts: Sequence[Sequence[int]]) -> list[list[int]]:
    if isinstance(prompts, np.ndarray):
        prompts = list(prompts)
    if isinstance(prompts, str | bytes) or not isinstance(prompts, Sequence) or not prompts:
        raise InputError("prompts must be a non-empty list of token-id lists")
    checked = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str | bytes) or not isinstance(prompt, Sequence | np.ndarray):
            raise InputError(f"prompt {i} must be a list of token ids, got {type(prompt).__name__}")
        ids = [as_int(t, f"prompt {i}'s tokens") for t in np.asarray(prompt).reshape(-1).tolist()]
        if not ids:
            raise InputError(f"prompt {i} is empty: generation needs at least one token to continue")
        bad = [t for t in ids if not 0 <= t < cfg.vocab_size]
        if bad:
            raise InputError(f"prompt {i}: token id {bad[0]} is outside the vocabulary [0, {cfg.vocab_size})")
        checked.append(ids)
    return checked


def _check_stops(cfg: ModelConfig, stop: int | str | Sequence[int | str]) -> tuple[list[int], list[str]]:
    """(sorted unique stop token ids, stop strings)."""
    if isinstance(stop, str | int):
        stop = [stop]
    stop_ids, stop_strings = set(), []
    for item in stop:
        if isinstance(item, str):
            if not item:
                raise InputError("a stop string must not be empty")
            stop_strings.append(item)
        else:
            tok = as_int(item, "a stop token id")
            if not 0 <= tok < cfg.vocab_size:
                raise InputError(f"stop token id {tok} is outside the vocabulary [0, {cfg.vocab_size})")
            stop_ids.add(tok)
    return sorted(stop_ids), stop_strings
