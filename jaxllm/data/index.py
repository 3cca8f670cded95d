"""Which tokens form which batch: the one index order, shared by jaxllm's loader and torch_ref.

Pure numpy, no framework. With C = context and N tokens in a split:

- window w is `tokens[w*C : w*C + C + 1]` (C inputs plus the next-token targets); consecutive
  windows overlap by one token, so each token after the first is a target once per epoch, and
  there are `(N - 1) // C` windows;
- epoch e visits the windows in the order `argsort(splitmix64(arange(n) ^ key(seed, e)))` (or
  0, 1, 2, ... unshuffled): a fixed integer formula, so the order does not depend on numpy's
  random generators or their versions;
- that order is cut into global batches of G windows; the `n % G` windows left over at the end
  of an epoch are skipped. Global step s is batch `s % steps_per_epoch` of epoch
  `s // steps_per_epoch`;
- a process reads only its rows of each global batch: by default process p of P holds rows
  `[p*G/P, (p+1)*G/P)`.

A packed dataset (chat examples, `jaxllm/data/chat.py`) is already cut into windows of C + 1 tokens:
window w is `tokens[w*(C+1) : (w+1)*(C+1)]` (`BatchPlan.packed`), the same for its per-token arrays.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from jaxllm.errors import ConfigError, InputError

_MASK64 = (1 << 64) - 1


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finalizer, elementwise on uint64 (wrapping arithmetic): a bijection."""
    z = np.asarray(x, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def epoch_key(seed: int, epoch: int) -> int:
    """A 64-bit key per (seed, epoch)."""
    mixed = splitmix64(np.array([seed & _MASK64], dtype=np.uint64))
    return int(splitmix64(mixed ^ np.uint64(epoch & _MASK64))[0])


@functools.lru_cache(maxsize=4)
def epoch_order(n_windows: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """Window ids in the order epoch `epoch` visits them, shape (n_windows,), read-only int64."""
    ids = np.arange(n_windows, dtype=np.uint64)
    if shuffle:
        ids = np.argsort(splitmix64(ids ^ np.uint64(epoch_key(seed, epoch))), kind="stable")
    order = ids.astype(np.int64)
    order.setflags(write=False)
    return order


@dataclass(frozen=True)
class BatchPlan:
    """Everything that decides the global batches; every process of a run builds the same plan."""

    n_tokens: int
    context: int
    global_batch: int
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None: repeat forever
    packed: bool = False  # windows are consecutive rows of context + 1 tokens (no overlap)

    def __post_init__(self) -> None:
        for name in ("context", "global_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.seed < 0:
            raise ConfigError(f"seed must be non-negative, got {self.seed}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"num_epochs must be positive or None, got {self.num_epochs}")

    @property
    def stride(self) -> int:
        """Tokens from one window's start to the next's."""
        return self.context + 1 if self.packed else self.context

    @property
    def n_windows(self) -> int:
        if self.packed:
            return self.n_tokens // self.stride
        return max(self.n_tokens - 1, 0) // self.context

    @property
    def steps_per_epoch(self) -> int:
        return self.n_windows // self.global_batch

    @property
    def num_steps(self) -> int | None:
        """Total steps, or None when the plan repeats forever."""
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def require_one_batch(self, what: str) -> None:
        """InputError unless the split holds at least one full global batch."""
        if self.steps_per_epoch == 0:
            raise InputError(
                f"{what} has {self.n_tokens} tokens: {self.n_windows} windows of "
                f"{self.context}+1 tokens, fewer than one global batch of {self.global_batch}"
            )


def global_batch_windows(plan: BatchPlan, step: int) -> np.ndarray:
    """Window ids of global batch `step`, shape (global_batch,)."""
    if step < 0 or (plan.num_steps is not None and step >= plan.num_steps):
        raise IndexError(f"step {step} is outside the plan's {plan.num_steps} steps")
    epoch, b = divmod(step, plan.steps_per_epoch)
    order = epoch_order(plan.n_windows, plan.seed, epoch, plan.shuffle)
    return order[b * plan.global_batch : (b + 1) * plan.global_batch]


def process_rows(process_index: int, process_count: int, global_batch: int) -> np.ndarray:
    """Rows of each global batch that process `process_index` of `process_count` reads."""
    if not 0 <= process_index < process_count:
        raise ConfigError(f"process_index {process_index} is not in [0, {process_count})")
    if global_batch % process_count:
        raise ConfigError(f"global batch size {global_batch} is not divisible by {process_count} processes")
    local = global_batch // process_count
    return np.arange(process_index * local, (process_index + 1) * local)


def read_windows(tokens: np.ndarray, window_ids: np.ndarray, context: int, stride: int | None = None) -> np.ndarray:
    """tokens[w*S : w*S + C + 1] for each window id (S = `stride`, default C), shape
    (len(window_ids), C + 1), int32."""
    starts = np.asarray(window_ids, dtype=np.int64) * (stride or context)
    return tokens[starts[:, None] + np.arange(context + 1)].astype(np.int32)


def local_batch(tokens: np.ndarray, plan: BatchPlan, step: int, rows: np.ndarray) -> np.ndarray:
    """This process's part of global batch `step`: shape (len(rows), context + 1), int32."""
    return read_windows(tokens, global_batch_windows(plan, step)[rows], plan.context, plan.stride)


def local_batches(arrays: dict[str, np.ndarray], plan: BatchPlan, step: int, rows: np.ndarray) -> dict[str, np.ndarray]:
    """`local_batch` of each per-token array of a packed split (tokens, loss mask, segment ids)."""
    windows = global_batch_windows(plan, step)[rows]
    return {name: read_windows(a, windows, plan.context, plan.stride) for name, a in arrays.items()}
