"""torch_ref's batches: the same DATA_DIR files in the same index order as jaxllm's loader.

Batch `step` here equals batch `step` of `jaxllm.data.make_loader` with the same arguments (rank =
process index, world_size = process count), because both call `jaxllm.data.index.local_batch`;
only the container differs (int64 tensors here, int32 numpy there). No grain, no jax needed. With
`doc_mask`, a batch is a dict of tensors with the segment ids and positions of the same function
(`jaxllm.data.segments.document_batch`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from jaxllm.data.index import BatchPlan, local_batch, process_rows
from jaxllm.data.meta import SPLITS, open_tokens, read_meta
from jaxllm.data.segments import document_batch
from jaxllm.errors import InputError


class TorchBatches(Iterator[torch.Tensor | dict[str, torch.Tensor]]):
    """Iterator of (local_batch, context + 1) int64 tensors (with `doc_mask`: dicts of tensors, as
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
        self.plan = BatchPlan(meta.tokens(split), context, global_batch_size, seed, shuffle, num_epochs)
        self.plan.require_one_batch(f"{Path(data_dir) / split}.bin")
        self.rows = process_rows(rank, world_size, global_batch_size)
        self.device = torch.device(device)
        self.step = 0
        self._tokens = open_tokens(data_dir, split, meta)
        self._eot_id = meta.eot_id if doc_mask else None

    def __iter__(self) -> TorchBatches:
        return self

    def __next__(self) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.plan.num_steps is not None and self.step >= self.plan.num_steps:
            raise StopIteration
        batch = local_batch(self._tokens, self.plan, self.step, self.rows)
        self.step += 1
        to_torch = lambda x: torch.from_numpy(x).to(self.device, torch.int64)  # noqa: E731
        if self._eot_id is None:
            return to_torch(batch)
        return {name: to_torch(x) for name, x in document_batch(batch, self._eot_id).items()}

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "seed": self.plan.seed, "n_tokens": self.plan.n_tokens}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state.get("seed"), state.get("n_tokens")) != (self.plan.seed, self.plan.n_tokens):
            raise InputError("batch state is from another dataset or seed")
        self.step = int(state["step"])
