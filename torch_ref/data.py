"""torch_ref's batches: the same DATA_DIR files in the same index order as jaxllm's loader.

Batch `step` here equals batch `step` of `jaxllm.data.make_loader` with the same arguments (rank =
process index, world_size = process count), because both call `jaxllm.data.index.local_batch`;
only the container differs (int64 tensors here, int32 numpy there; dicts of them for a packed dataset
or with `doc_mask`, built by the same `jaxllm.data.segments.training_batch`). No grain, no jax needed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from jaxllm.data.index import BatchPlan, local_batch, local_batches, process_rows
from jaxllm.data.loader import check_packed_context
from jaxllm.data.meta import SPLITS, open_split, open_tokens, read_meta
from jaxllm.data.segments import training_batch
from jaxllm.errors import InputError


class TorchBatches(Iterator[torch.Tensor | dict[str, torch.Tensor]]):
    """Iterator of (local_batch, context + 1) int64 tensors (packed or with `doc_mask`: dicts of tensors, as
    jaxllm's loader); `state_dict()` resumes exactly."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        context: int,
        global_batch_size: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        *,
        shuffle: bool = True,
        num_epochs: int | None = None,
        device: str | torch.device = "cpu",
        doc_mask: bool = False,
    ):
        if split not in SPLITS:
            raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
        meta = read_meta(data_dir)
        check_packed_context(data_dir, meta, context)
        packed = meta.packing is not None
        self.plan = BatchPlan(meta.tokens(split), context, global_batch_size, seed, shuffle, num_epochs, packed)
        self.plan.require_one_batch(f"{Path(data_dir) / split}.bin")
        self.rows = process_rows(rank, world_size, global_batch_size)
        self.device = torch.device(device)
        self.step = 0
        self._arrays = open_split(data_dir, split, meta) if packed else open_tokens(data_dir, split, meta)
        self._doc_mask, self._eot_id = doc_mask, meta.eot_id

    def __iter__(self) -> TorchBatches:
        return self

    def __next__(self) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.plan.num_steps is not None and self.step >= self.plan.num_steps:
            raise StopIteration
        step, self.step = self.step, self.step + 1
        if isinstance(self._arrays, dict):
            read = local_batches(self._arrays, self.plan, step, self.rows)
        else:
            read = local_batch(self._arrays, self.plan, step, self.rows)
        batch = training_batch(read, doc_mask=self._doc_mask, sep_id=self._eot_id)
        to_torch = lambda x: torch.from_numpy(x).to(self.device, torch.int64)  # noqa: E731
        return {k: to_torch(v) for k, v in batch.items()} if isinstance(batch, dict) else to_torch(batch)

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.plan.seed, "n_tokens": self.plan.n_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("seed"), state.get("n_tokens")) != (self.plan.seed, self.plan.n_tokens):
            raise InputError("batch state is from another dataset or seed")
        self.step = int(state["step"])
