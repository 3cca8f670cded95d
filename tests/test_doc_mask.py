"""Document-masked packing (`data.doc_mask`): segment ids and restarted positions from the data edge,
attention that does not cross documents, the same in torch_ref and on the sharded mesh. (cuDNN's:
tests/test_parity_torch.py, with the other CUDA tests.)"""

import jax
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import torch_ref
from jaxllm import InputError, ModelConfig, forward, init_params, to_torch_state_dict
from jaxllm.config import Config
from jaxllm.data import make_loader
from jaxllm.data.meta import read_meta
from jaxllm.data.segments import document_batch, model_inputs, segments_from_starts, starts_after
from jaxllm.parity import eval_losses, step_losses
from jaxllm.train_step import loss_fn
from torch_ref.data import TorchBatches

from conftest import random_tokens
from data_corpus import write_corpus
from parity_helpers import LOSS_RTOL, export_init

T = 16
_LLAMA = ModelConfig.preset("advanced").replace(
    vocab_size=97, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96, context_length=T
)
FAMILIES = {
    "gpt": ModelConfig.preset("mini").replace(vocab_size=97, n_layers=2, context_length=T),  # learned positions
    "llama": _LLAMA,  # RoPE, grouped-query attention
    "llama-window": _LLAMA.replace(sliding_window=4),  # the window counts within a document too
}
_forward = jax.jit(forward, static_argnums=0)
_PARAMS = {name: init_params(cfg, 0) for name, cfg in FAMILIES.items()}


# Segment ids and positions ------------------------------------------------------------------------
def test_segments_restart_after_each_separator():
    tokens = np.array([[5, 0, 7, 7, 0, 0, 9, 3], [0, 1, 2, 3, 4, 0, 6, 0]])
    segment_ids, positions = segments_from_starts(starts_after(tokens, sep_id=0))
    # The separator ends its document (it is written after each one); the next token starts the next.
    assert segment_ids.tolist() == [[0, 0, 1, 1, 1, 2, 3, 3], [0, 1, 1, 1, 1, 1, 2, 2]]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0, 0, 1], [0, 0, 1, 2, 3, 4, 0, 1]]
    assert segment_ids.dtype == positions.dtype == np.int32


def test_example_starts_give_segments_directly():
    """A packer that knows where its examples start (chat SFT) passes the starts; row starts are implied."""
    starts = np.zeros((2, 6), bool)
    starts[0, [2, 5]] = True
    segment_ids, positions = segments_from_starts(starts)
    assert segment_ids.tolist() == [[0, 0, 1, 1, 1, 2], [0] * 6]
    assert positions.tolist() == [[0, 1, 0, 1, 2, 0], list(range(6))]
    assert not starts[:, 0].any()  # the caller's array is left as it was
    with pytest.raises(ValueError, match="shape"):
        segments_from_starts(np.zeros(6, bool))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.booleans(), min_size=1, max_size=24), min_size=1, max_size=3).map(
    lambda rows: [r[: min(map(len, rows))] for r in rows]
))  # fmt: skip
def test_a_position_is_the_distance_to_the_start_of_its_segment(rows):
    starts = np.array(rows)
    segment_ids, positions = segments_from_starts(starts)
    for b in range(starts.shape[0]):
        for t in range(starts.shape[1]):
            same = np.flatnonzero(segment_ids[b] == segment_ids[b, t])
            assert positions[b, t] == t - same[0]  # counted from the segment's first token
        is_start = starts[b].copy()
        is_start[0] = True
        assert np.array_equal(positions[b] == 0, is_start)
        assert np.array_equal(np.diff(segment_ids[b]), is_start[1:].astype(int))


def test_a_batch_dict_reads_as_model_inputs():
    windows = np.arange(2 * 9).reshape(2, 9) % 4
    inputs, targets, kwargs = model_inputs(document_batch(windows, sep_id=3))
    assert np.array_equal(inputs, windows[:, :-1]) and np.array_equal(targets, windows[:, 1:])
    expected = segments_from_starts(starts_after(windows[:, :-1], 3))
    assert np.array_equal(kwargs["segment_ids_BT"], expected[0])
    assert np.array_equal(kwargs["positions_BT"], expected[1])
    inputs, targets, kwargs = model_inputs(windows)  # a plain window array: no masking
    assert np.array_equal(inputs, windows[:, :-1]) and kwargs == {}


# The model ----------------------------------------------------------------------------------------
# Per row: the lengths of the documents packed into a window of T tokens (cut at 0 to 6 places).
packings = st.lists(st.sets(st.integers(1, T - 1), max_size=6).map(lambda cuts: np.diff([0, *sorted(cuts), T])),
                    min_size=1, max_size=2)  # fmt: skip


def packed_equals_alone(name: str, lengths: list[list[int]], seed: int) -> float:
    """max |logits of each document in its packed window - logits of that document run alone|."""
    cfg, params = FAMILIES[name], _PARAMS[name]
    tokens = random_tokens(cfg.vocab_size, len(lengths), T, seed)
    starts = np.zeros(tokens.shape, bool)
    for b, lens in enumerate(lengths):
        starts[b, np.cumsum(lens)[:-1]] = True
    segment_ids, positions = segments_from_starts(starts)
    packed = np.asarray(_forward(cfg, params, tokens, positions, segment_ids))
    worst = 0.0
    for b, lens in enumerate(lengths):
        for start, n in zip(np.cumsum([0, *lens[:-1]]), lens, strict=True):
            # The document alone at positions 0..n-1, on the plain causal path. Padded at the end to one
            # shape (one compile): a causal model's first n logits do not see later tokens (test_model).
            alone = np.zeros((1, T), np.int64)
            alone[0, :n] = tokens[b, start : start + n]
            logits = np.asarray(_forward(cfg, params, alone))[0, :n]
            worst = max(worst, float(np.abs(packed[b, start : start + n] - logits).max()))
    return worst


@pytest.mark.parametrize("name", list(FAMILIES))
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lengths=packings, seed=st.integers(0, 2**16))
def test_packed_window_logits_equal_each_document_run_alone(name, lengths, seed):
    assert packed_equals_alone(name, lengths, seed) <= 1e-5


def test_without_the_mask_documents_would_see_each_other():
    """The positive control: the same comparison fails when the segments are not passed."""
    cfg, params = FAMILIES["llama"], _PARAMS["llama"]
    tokens = random_tokens(cfg.vocab_size, 1, T)
    unmasked = np.asarray(_forward(cfg, params, tokens))[0, 8:]
    alone = np.asarray(_forward(cfg, params, np.concatenate([tokens[:, 8:], tokens[:, :8]], 1)))[0, :8]
    assert np.abs(unmasked - alone).max() > 1e-3
    assert packed_equals_alone("llama", [[8, 8]], 0) <= 1e-5


def test_segment_ids_need_restarted_positions_of_the_same_shape():
    cfg, params = FAMILIES["gpt"], _PARAMS["gpt"]
    tokens = random_tokens(cfg.vocab_size, 2, 8)
    segment_ids, positions = segments_from_starts(np.zeros((2, 8), bool))
    with pytest.raises(InputError, match="needs positions_BT"):
        forward(cfg, params, tokens, segment_ids_BT=segment_ids)
    with pytest.raises(InputError, match=r"segment_ids_BT has shape \(2, 7\)"):
        forward(cfg, params, tokens, positions, segment_ids[:, :7])


@pytest.mark.parametrize("name", ["gpt", "llama-window"])
def test_torch_ref_masks_documents_the_same_way(name):
    cfg, params = FAMILIES[name], _PARAMS[name]
    tokens = random_tokens(cfg.vocab_size, 2, T, seed=3)
    starts = np.zeros(tokens.shape, bool)
    starts[0, [3, 10]] = starts[1, [1, 2, 9]] = True
    segment_ids, positions = segments_from_starts(starts)
    model = torch_ref.build_model(cfg)
    model.load_state_dict(to_torch_state_dict(cfg, params))
    as_torch = lambda x: torch.from_numpy(np.asarray(x, np.int64))  # noqa: E731
    with torch.no_grad():
        expected = model(as_torch(tokens), as_torch(positions), segment_ids_BT=as_torch(segment_ids)).numpy()
        unmasked = model(as_torch(tokens)).numpy()
    got = np.asarray(forward(cfg, params, tokens, positions, segment_ids))
    assert np.abs(got - expected).max() <= 1e-4
    assert np.linalg.norm(got - expected) / np.linalg.norm(expected) <= 1e-5
    assert np.abs(unmasked - expected).max() > 1e-3  # the mask mattered


# Data and training ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_docs(tmp_path_factory):
    """Many short documents (about 20-150 bytes each): a 64-token window usually holds two or more."""
    from jaxllm.data.preprocess import preprocess

    root = tmp_path_factory.mktemp("short_docs")
    write_corpus(root / "text", n_docs=600, seed=1, lines=(1, 3))
    out = root / "data"
    preprocess([str(root / "text")], out, tokenizer="byte", on_warning=lambda _: None)
    return out


def test_loader_batches_carry_the_segments_of_the_documents(short_docs):
    eot = read_meta(short_docs).eot_id
    plain = make_loader(short_docs, "train", 64, 8, seed=3, process_index=0, process_count=1)
    masked = make_loader(short_docs, "train", 64, 8, seed=3, process_index=0, process_count=1, doc_mask=True)
    torch_batches = TorchBatches(short_docs, "train", 64, 8, seed=3, doc_mask=True)
    for _ in range(3):
        windows, batch, torch_batch = next(plain), next(masked), next(torch_batches)
        assert sorted(batch) == ["positions", "segment_ids", "tokens"]
        assert np.array_equal(batch["tokens"], windows)  # the same windows, in the same order
        expected = segments_from_starts(starts_after(windows[:, :-1], eot))
        assert np.array_equal(batch["segment_ids"], expected[0]) and np.array_equal(batch["positions"], expected[1])
        assert all(np.array_equal(torch_batch[k].numpy(), v) for k, v in batch.items())
        assert (batch["segment_ids"].max(1) >= 1).mean() >= 0.5  # most windows do pack several documents


def test_doc_mask_changes_the_loss_of_packed_windows(short_docs):
    cfg = FAMILIES["gpt"].replace(vocab_size=257, context_length=64)
    batch = next(make_loader(short_docs, "train", 64, 8, seed=0, process_index=0, process_count=1, doc_mask=True))
    params = init_params(cfg, 0)
    loss = jax.jit(loss_fn, static_argnums=0)
    masked, plain = float(loss(cfg, params, batch)), float(loss(cfg, params, batch["tokens"]))
    assert abs(masked - plain) > 1e-4 * plain


@pytest.mark.slow
def test_sharded_doc_mask_training_matches_torch_ref(short_docs, tmp_path):
    """jaxllm on the (2, 2, 2) mesh (segment ids batch-sharded like the tokens, two micro-batches) and
    torch_ref on one process: the same losses and eval losses from the same weights and batches."""
    from jaxllm.train import train
    from torch_ref import train as torch_train

    overrides = [
        "model.vocab_size=257", "model.n_layers=2", "train.batch_size=8", "train.grad_accum=2",
        "train.warmup_steps=2", "train.steps=6", "train.log_every=1", "train.eval_every=3",
        "train.eval_batches=1", "train.checkpoint_every=0", f"data.path={short_docs}", "data.doc_mask=true",
    ]  # fmt: skip
    cfg = Config.load("mini", [*overrides, "mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    train(cfg, tmp_path / "jax", progress=False)
    torch_cfg = Config.load("mini", [*overrides, "mesh.data=1"])
    torch_train.train(torch_cfg, tmp_path / "torch", init=export_init(torch_cfg, tmp_path), progress=False)
    jax_loss, torch_loss = step_losses(tmp_path / "jax"), step_losses(tmp_path / "torch")
    assert sorted(jax_loss) == sorted(torch_loss) == list(range(1, 7))
    np.testing.assert_allclose([torch_loss[s] for s in jax_loss], list(jax_loss.values()), rtol=LOSS_RTOL)
    jax_eval, torch_eval = eval_losses(tmp_path / "jax"), eval_losses(tmp_path / "torch")
    assert sorted(jax_eval) == sorted(torch_eval) == [3, 6]
    np.testing.assert_allclose([torch_eval[s] for s in jax_eval], list(jax_eval.values()), rtol=LOSS_RTOL)
