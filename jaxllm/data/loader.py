"""The training loader: a grain pipeline over a split's memmap, yielding this process's rows of every
global batch as numpy, plus the step from those rows to a global `jax.Array`.

Typical use in a training loop (every process runs the same code)::

    check_data_matches_model(data_dir, cfg)                 # clear error before any work
    sharding = NamedSharding(mesh, P("data"))                # batch axis over the data axis
    loader = make_loader(data_dir, "train", cfg.context_length, global_batch, seed, sharding=sharding)
    loader.set_state(saved_state)                            # when resuming
    for local in loader:                                     # (local_batch, context + 1) int32
        batch = loader.to_global(local, sharding)            # (global_batch, context + 1)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        ...
        state = loader.get_state()                           # JSON-serializable; same on every process

Each batch is the (local_batch, context + 1) int32 token array of a raw-text dataset, or a dict
(`jaxllm.data.segments.training_batch`): "tokens" as above plus "loss_mask" for a packed (chat)
dataset, and with `doc_mask=True` "segment_ids" and "positions" (local_batch, context) of the inputs,
derived here in numpy (from the end-of-text id, or the packed examples' boundaries); `to_global`
places every array the same way, rows over the batch axes.

Which windows form which batch is decided by `jaxllm.data.index` alone (shared with torch_ref).
grain and jax are imported only when a loader is built.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from jaxllm.config import ModelConfig
from jaxllm.data.index import BatchPlan, local_batch, local_batches, process_rows
from jaxllm.data.meta import SPLITS, DataMeta, open_split, open_tokens, read_meta
from jaxllm.data.segments import training_batch
from jaxllm.errors import ConfigError, InputError

if TYPE_CHECKING:
    import jax

_INFINITE_STEPS = 2**62


LocalBatch = np.ndarray | dict[str, np.ndarray]


class Loader(Iterator[LocalBatch]):
    """Iterator of local batches, shape (local_batch, context + 1), int32 (a packed dataset or `doc_mask`:
    a dict with those tokens, see the module docstring); checkpointable."""

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        plan: BatchPlan,
        rows: np.ndarray,
        meta: DataMeta,
        *,
        read_threads: int = 2,
        prefetch: int = 4,
        doc_mask: bool = False,
    ):
        import grain

        self.data_dir, self.split, self.plan, self.meta = Path(data_dir), split, plan, meta
        self.doc_mask = doc_mask
        self.rows = np.asarray(rows, dtype=np.int64)
        self.rows.setflags(write=False)
        rows = self.rows
        steps = _INFINITE_STEPS if plan.num_steps is None else plan.num_steps
        if plan.packed:
            arrays = open_split(data_dir, split, meta)
            read = lambda step: local_batches(arrays, plan, int(step), rows)  # noqa: E731
        else:
            tokens = open_tokens(data_dir, split, meta)
            read = lambda step: local_batch(tokens, plan, int(step), rows)  # noqa: E731
        batch = lambda step: training_batch(read(step), doc_mask=doc_mask, sep_id=meta.eot_id)  # noqa: E731
        dataset = grain.MapDataset.range(0, steps).map(batch)
        options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self._iter = iter(dataset.to_iter_dataset(options))
        self._shard_rows: dict[Any, bool] = {}

    @property
    def global_batch_size(self) -> int:
        return self.plan.global_batch

    @property
    def local_batch_size(self) -> int:
        return len(self.rows)

    @property
    def step(self) -> int:
        """How many batches this iterator has yielded (from the start of the plan)."""
        return int(self._iter.get_state()["next_index"])

    def __iter__(self) -> Loader:
        return self

    def __next__(self) -> LocalBatch:
        return next(self._iter)

    def get_state(self) -> dict[str, Any]:
        """JSON-serializable state; `set_state` on an equal loader resumes at the next batch."""
        return {"grain": self._iter.get_state(), "plan": self._fingerprint()}

    def set_state(self, state: dict[str, Any]) -> None:
        """Resume from `get_state()` output (possibly of another process or process layout)."""
        try:
            saved, grain_state = state["plan"], state["grain"]
        except (KeyError, TypeError):
            raise InputError("not a loader state: expected the dict from Loader.get_state()") from None
        mine = self._fingerprint()
        diff = [f"{k}: saved {saved.get(k)!r}, now {v!r}" for k, v in mine.items() if saved.get(k) != v]
        if diff:
            raise InputError("loader state is from a different data plan (" + "; ".join(diff) + ")")
        self._iter.set_state(grain_state)

    def to_global(self, local: LocalBatch, sharding: jax.sharding.Sharding) -> jax.Array | dict[str, jax.Array]:
        """This process's batch as part of the global (global_batch, context + 1) array (or dict of arrays)."""
        if sharding not in self._shard_rows:
            shape = (self.global_batch_size, self.plan.context + 1)
            self._shard_rows[sharding] = np.array_equal(rows_for_sharding(sharding, shape), self.rows)
        if not self._shard_rows[sharding]:
            raise ConfigError(
                "this sharding places other rows of the batch on this process than the loader "
                "reads: build the loader with make_loader(..., sharding=sharding)"
            )
        if isinstance(local, dict):
            return {k: to_global_array(v, sharding, self.global_batch_size) for k, v in local.items()}
        return to_global_array(local, sharding, self.global_batch_size)

    def _fingerprint(self) -> dict[str, Any]:
        p = self.plan
        return {
            "split": self.split,
            "tokenizer_sha256": self.meta.tokenizer.sha256,
            "n_tokens": p.n_tokens,
            "context": p.context,
            "global_batch": p.global_batch,
            "seed": p.seed,
            "shuffle": p.shuffle,
            "num_epochs": p.num_epochs,
            "packed": p.packed,
        }


def make_loader(
    data_dir: str | Path,
    split: str,
    context: int,
    global_batch_size: int,
    seed: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    *,
    sharding: jax.sharding.Sharding | None = None,
    shuffle: bool = True,
    num_epochs: int | None = None,
    read_threads: int = 2,
    prefetch: int = 4,
    doc_mask: bool = False,
) -> Loader:
    """A `Loader` over `DATA_DIR/{split}.bin` (windows of `context + 1` tokens).

    Rows read by this process: those `sharding` places on its devices when given; else rows
    [p*G/P, (p+1)*G/P) for process p of P (default: `jax.process_index()` of
    `jax.process_count()`). `num_epochs=None` repeats forever; use `shuffle=False, num_epochs=1`
    for one pass over the validation split in file order. `doc_mask`: batches carry the segment ids
    and restarted positions of the documents packed into each window (see the module docstring).
    """
    if split not in SPLITS:
        raise InputError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    meta = read_meta(data_dir)
    check_packed_context(data_dir, meta, context)
    packed = meta.packing is not None
    plan = BatchPlan(meta.tokens(split), context, global_batch_size, seed, shuffle, num_epochs, packed)
    plan.require_one_batch(f"{Path(data_dir) / split}.bin")
    if sharding is not None:
        if process_index is not None or process_count is not None:
            raise ConfigError("give either sharding or process_index/process_count, not both")
        rows = rows_for_sharding(sharding, (global_batch_size, context + 1))
    else:
        if process_index is None or process_count is None:
            import jax

            process_index = jax.process_index() if process_index is None else process_index
            process_count = jax.process_count() if process_count is None else process_count
        rows = process_rows(process_index, process_count, global_batch_size)
    return Loader(data_dir, split, plan, rows, meta, read_threads=read_threads, prefetch=prefetch, doc_mask=doc_mask)


def rows_for_sharding(sharding: jax.sharding.Sharding, global_shape: tuple[int, ...]) -> np.ndarray:
    """Sorted rows (dim 0) of a `global_shape` array that `sharding` puts on this process's devices.

    `jax.make_array_from_process_local_data` expects exactly these rows, in this order.
    """
    rows: set[int] = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows.update(range(*index[0].indices(global_shape[0])))
    return np.array(sorted(rows), dtype=np.int64)


def to_global_array(local: np.ndarray, sharding: jax.sharding.Sharding, global_batch_size: int) -> jax.Array:
    """`jax.make_array_from_process_local_data` for a (local_batch, ...) batch."""
    import jax

    return jax.make_array_from_process_local_data(sharding, local, (global_batch_size, *local.shape[1:]))


def check_packed_context(data_dir: str | Path, meta: DataMeta, context: int) -> None:
    """InputError unless a packed dataset's windows are of `context` (+ 1) tokens."""
    if meta.packing is not None and meta.packing.context != context:
        raise InputError(
            f"{data_dir} is packed in windows of context {meta.packing.context}, the model's context_length is "
            f"{context}: set model.context_length={meta.packing.context}, or preprocess with --context {context}"
        )


def check_data_matches_model(
    data_dir: str | Path, cfg: ModelConfig, *, allow_larger_model_vocab: bool = False
) -> DataMeta:
    """The dataset's meta, after checking it is complete and fits `cfg`; else an InputError.

    Checks meta.json (present, valid), both token files (present, of the size meta.json gives),
    and that the data's vocab_size equals the model's (or is smaller, with
    `allow_larger_model_vocab`, for a model whose embedding is padded).
    """
    meta = read_meta(data_dir)
    for split in SPLITS:
        open_tokens(data_dir, split, meta) if meta.packing is None else open_split(data_dir, split, meta)
    check_packed_context(data_dir, meta, cfg.context_length)
    fits = meta.vocab_size == cfg.vocab_size or (allow_larger_model_vocab and meta.vocab_size < cfg.vocab_size)
    if not fits:
        raise InputError(
            f"{Path(data_dir) / 'meta.json'}: vocab_size {meta.vocab_size} does not match the model's "
            f"vocab_size {cfg.vocab_size} ({cfg.name}); preprocess with --vocab-size "
            f"{cfg.vocab_size} or use a model of vocab_size {meta.vocab_size}"
        )
    return meta
