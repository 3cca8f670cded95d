"""The training batch, and document masking of packed windows (which example each token belongs to,
and its position in it).

Pure numpy, no framework (torch_ref imports it too). A training window packs several examples end
to end (documents of a raw-text dataset; whole chat examples of an SFT one). With document masking a
token attends only to the earlier tokens of its own example (its *segment*), and its position counts
from that example's first token, as if the example were run alone.

Where examples start is said in one of two ways, with one result (`segments_from_starts`):

- a separator token (`starts_after`): a raw-text dataset writes each document followed by the
  end-of-text id (`meta.json` `eot_id`), so the separator ends its document and the next token
  starts the next one;
- stored example ids (`starts_where_changed`): a packed chat dataset stores a segment id per token
  (1, 2, ... per example, 0 padding; `jaxllm/data/meta.py`), and an example starts where the id
  changes, so a run of padding is a segment of its own (never in the loss).

A batch (`training_batch`) is either a (B, T+1) int array of windows (raw text, no masking) or a dict
(`Batch`): "tokens" (B, T+1) always; "loss_mask" (B, T+1), 1 where a token counts as a target (packed
datasets); and with document masking "segment_ids" and "positions" (B, T), both for the T inputs
`tokens[:, :-1]`. `model_inputs` reads either form for jaxllm and torch_ref alike (numpy, JAX or torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

TOKENS, LOSS_MASK, SEGMENT_IDS, POSITIONS = "tokens", "loss_mask", "segment_ids", "positions"

Batch = Mapping[str, Any]  # {"tokens": (B, T+1), ["loss_mask": (B, T+1)], ["segment_ids", "positions": (B, T)]}


def starts_after(tokens_BT: np.ndarray, sep_id: int) -> np.ndarray:
    """bool (B, T): True where the previous token of the row is `sep_id` (and at t = 0)."""
    tokens_BT = np.asarray(tokens_BT)
    starts_BT = np.zeros(tokens_BT.shape, dtype=bool)
    starts_BT[:, 0] = True
    starts_BT[:, 1:] = tokens_BT[:, :-1] == sep_id
    return starts_BT


def starts_where_changed(ids_BT: np.ndarray) -> np.ndarray:
    """bool (B, T): True where the id differs from the previous token's (and at t = 0)."""
    ids_BT = np.asarray(ids_BT)
    starts_BT = np.ones(ids_BT.shape, dtype=bool)
    starts_BT[:, 1:] = ids_BT[:, 1:] != ids_BT[:, :-1]
    return starts_BT


def segments_from_starts(starts_BT: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(segment_ids_BT, positions_BT), int32, from the bool (B, T) example starts.

    Segment ids count 0, 1, 2, ... along each row (the row's first token always starts segment 0);
    positions count 0, 1, 2, ... from each segment's first token.
    """
    starts_BT = np.array(starts_BT, dtype=bool)  # a copy: the first column is set below
    if starts_BT.ndim != 2:
        raise ValueError(f"starts must have shape (batch, time), got {starts_BT.shape}")
    if starts_BT.shape[1] == 0:
        empty = np.zeros(starts_BT.shape, np.int32)
        return empty, empty.copy()
    starts_BT[:, 0] = True
    t_T = np.arange(starts_BT.shape[1])
    first_BT = np.maximum.accumulate(np.where(starts_BT, t_T, 0), axis=1)  # each token's segment start
    return (np.cumsum(starts_BT, axis=1) - 1).astype(np.int32), (t_T - first_BT).astype(np.int32)


def with_segments(windows_BT1: np.ndarray, starts_BT: np.ndarray) -> dict[str, np.ndarray]:
    """The `Batch` of (B, T+1) windows whose T inputs start examples at `starts_BT`."""
    segment_ids_BT, positions_BT = segments_from_starts(starts_BT)
    return {TOKENS: windows_BT1, SEGMENT_IDS: segment_ids_BT, POSITIONS: positions_BT}


def document_batch(windows_BT1: np.ndarray, sep_id: int) -> dict[str, np.ndarray]:
    """The `Batch` of raw-text windows: a new document after each `sep_id` among the inputs."""
    return with_segments(windows_BT1, starts_after(windows_BT1[:, :-1], sep_id))


def training_batch(read: np.ndarray | Mapping[str, np.ndarray], *, doc_mask: bool, sep_id: int) -> Any:
    """The batch the model trains on, from the windows the loader read: a (B, T+1) token array (raw
    text) or a packed split's {"tokens", "loss_mask", "segment_ids"} (stored ids, (B, T+1) each).
    Without `doc_mask` packed examples see each other (plain packing), and the stored ids are dropped."""
    if not isinstance(read, Mapping):
        return document_batch(read, sep_id) if doc_mask else read
    batch = {TOKENS: read[TOKENS], LOSS_MASK: read[LOSS_MASK]}
    if doc_mask:
        batch = {**batch, **with_segments(read[TOKENS], starts_where_changed(read[SEGMENT_IDS][:, :-1]))}
    return batch


def model_inputs(batch: Any) -> tuple[Any, Any, dict[str, Any]]:
    """(inputs_BT, targets_BT, keyword arguments of the model's forward) of a window array or `Batch`."""
    if not isinstance(batch, Mapping):
        return batch[:, :-1], batch[:, 1:], {}
    tokens_BT1 = batch[TOKENS]
    kwargs = {}
    if SEGMENT_IDS in batch:
        kwargs = {"positions_BT": batch[POSITIONS], "segment_ids_BT": batch[SEGMENT_IDS]}
    return tokens_BT1[:, :-1], tokens_BT1[:, 1:], kwargs
