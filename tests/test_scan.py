"""`model.scan_layers`: one `nn.scan` over the blocks computes what the Python loop does, trains the
same on a (2, 2, 2) mesh, decodes the same tokens, and every file and export stays per-layer."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import ConfigError, InputError, ModelConfig, forward, generate, init_params, load_params, save_params
from jaxllm.checkpoint import load_params_on_mesh
from jaxllm.config import Config
from jaxllm.convert import from_torch_state_dict, to_numpy_state_dict
from jaxllm.data.segments import segments_from_starts
from jaxllm.metrics import read_metrics
from jaxllm.model import abstract_params, forward_cached, init_cache, logical_axes, to_layout, to_per_layer
from jaxllm.sharding import make_mesh, param_shardings
from jaxllm.train import train

from conftest import random_tokens

TINY = {
    "gpt": ModelConfig.preset("mini").replace(vocab_size=101, context_length=32, n_layers=3),
    "llama": ModelConfig.preset("advanced").replace(
        vocab_size=101, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=96, context_length=32,
        sliding_window=6, qkv_bias=True,
    ),
}  # fmt: skip


def scanned(cfg: ModelConfig, **changes) -> ModelConfig:
    return cfg.replace(scan_layers=True, **changes)


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("family", sorted(TINY))
def test_scanned_logits_equal_unrolled_with_the_same_layer_params(family):
    cfg = TINY[family]
    params = init_params(cfg, 0)
    stacked = init_params(scanned(cfg), 0)  # the same seed: the same values, stacked
    assert_trees_equal(stacked, to_layout(scanned(cfg), params))
    assert_trees_equal(to_per_layer(stacked), params)
    assert jax.tree.map(lambda x: x.shape, stacked) == jax.tree.map(lambda x: x.shape, abstract_params(scanned(cfg)))
    assert stacked["blocks"]["attn"]["query"]["kernel"].shape[0] == cfg.n_layers
    assert logical_axes(scanned(cfg))["blocks"]["mlp"]["up" if family == "llama" else "fc"]["kernel"] == P(
        "layers", "embed", "mlp"
    )
    tokens = random_tokens(cfg.vocab_size, 2, 20)
    want = np.asarray(forward(cfg, params, tokens))
    for remat in ("none", "full", "save_dots"):
        got = jax.jit(lambda p, t, r=remat: forward(scanned(cfg, remat=r), p, t))(stacked, tokens)
        np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
    # The cache path: one cache with a leading layer axis, holding what the per-layer caches hold.
    positions = np.broadcast_to(np.arange(20), (2, 20))
    logits, caches = forward_cached(cfg, params, tokens, positions, init_cache(cfg, 2, 24))
    s_logits, s_cache = forward_cached(scanned(cfg), stacked, tokens, positions, init_cache(scanned(cfg), 2, 24))
    assert s_cache.k_BKSH.shape == (cfg.n_layers, 2, cfg.kv_heads, 24, cfg.dim_per_head)
    np.testing.assert_allclose(np.asarray(s_logits), np.asarray(logits), rtol=0, atol=1e-5)
    np.testing.assert_allclose(s_cache.v_BKSH, np.stack([c.v_BKSH for c in caches]), rtol=0, atol=1e-5)
    # Document masking: the segment ids reach every scanned layer as they reach every unrolled one.
    starts = np.zeros((2, 20), bool)
    starts[:, [0, 7, 13]] = True
    segment_ids, seg_positions = segments_from_starts(starts)
    want = np.asarray(forward(cfg, params, tokens, seg_positions, segment_ids))
    got = forward(scanned(cfg), stacked, tokens, seg_positions, segment_ids)
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=1e-5)
    assert not np.allclose(want, np.asarray(forward(cfg, params, tokens, seg_positions)), atol=1e-3)


def test_params_in_the_wrong_layout_are_refused_in_one_line():
    cfg = TINY["gpt"]
    with pytest.raises(InputError, match=r"per-layer .* model.scan_layers=true") as err:
        forward(scanned(cfg), init_params(cfg, 0), random_tokens(cfg.vocab_size, 1, 4))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("family", sorted(TINY))
def test_greedy_generation_with_the_kv_cache_is_identical_scanned(family):
    cfg = TINY[family]
    params = init_params(cfg.replace(init_std=0.3), 1)  # peaked logits: greedy ties are not a coin toss
    prompts = [[3, 1, 4, 1, 5], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3], [2]]
    want = generate(cfg, params, prompts, max_new_tokens=12, temperature=0.0)
    got = generate(scanned(cfg), to_layout(scanned(cfg), params), prompts, max_new_tokens=12, temperature=0.0)
    assert got == want
    assert all(len(row) == 12 for row in got)


def test_params_directories_and_exports_stay_per_layer(tmp_path):
    cfg = TINY["llama"]
    params = init_params(cfg, 0)
    stacked = to_layout(scanned(cfg), params)
    save_params(tmp_path / "scanned", scanned(cfg), stacked)
    on_disk = ocp.StandardCheckpointer().metadata(tmp_path / "scanned" / "params").item_metadata
    assert sorted(k for k in on_disk if k.startswith("blocks")) == ["blocks_0", "blocks_1", "blocks_2"]
    # Loaded back in the config's layout; the same files read as an unrolled model give the same values.
    loaded_cfg, loaded = load_params(tmp_path / "scanned")
    assert loaded_cfg.scan_layers
    assert_trees_equal(loaded, stacked)
    # Sharded loading: each stacked array restored onto the shardings asked for.
    mesh = make_mesh(Config.load("mini", ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]).mesh)
    shardings = param_shardings(scanned(cfg), mesh)
    _, placed = load_params(tmp_path / "scanned", shardings)
    assert placed["blocks"]["mlp"]["up"]["kernel"].sharding.spec == P(None, "fsdp", "tensor")
    assert_trees_equal(placed, stacked)
    # Inference (generate/serve) loads the layers unrolled whatever the directory says.
    infer_cfg, unrolled = load_params_on_mesh(tmp_path / "scanned")
    assert not infer_cfg.scan_layers
    assert_trees_equal(unrolled, params)
    # torch_ref / HF / GGUF go through the torch_ref state dict: the same tensors from either layout.
    sd = to_numpy_state_dict(scanned(cfg), stacked)
    assert_trees_equal(sd, to_numpy_state_dict(cfg, params))
    assert "blocks.2.mlp.up.weight" in sd
    assert_trees_equal(from_torch_state_dict(scanned(cfg), sd), stacked)
    assert_trees_equal(from_torch_state_dict(cfg, sd), params)


def test_hf_export_of_a_scanned_model_round_trips(tmp_path):
    from jaxllm.hf import export_hf, import_hf

    cfg = scanned(TINY["llama"], sliding_window=None, qkv_bias=False)
    params = init_params(cfg, 0)
    save_params(tmp_path / "ckpt", cfg, params)
    export_hf(tmp_path / "ckpt", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    back_cfg, back = load_params(tmp_path / "back")
    assert not back_cfg.scan_layers  # an HF model says nothing of scanning
    assert_trees_equal(back, to_per_layer(params))


# Training on a (2, 2, 2) mesh -------------------------------------------------------------------

MESH = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]


def train_config(data, *overrides: str) -> Config:
    return Config.load(
        "advanced",
        [
            "model.vocab_size=257", "model.context_length=32", "model.d_model=64", "model.n_layers=3",
            "model.n_heads=4", "model.n_kv_heads=2", "model.d_ff=96", "train.batch_size=8", "train.warmup_steps=2",
            "train.log_every=1", "train.eval_every=0", "train.steps=20", "train.checkpoint_every=10",
            f"data.path={data}", *MESH, *overrides,
        ],
    )  # fmt: skip


def test_scanned_training_matches_unrolled_on_a_2x2x2_mesh(byte_dataset, tmp_path):
    unrolled = train(train_config(byte_dataset), tmp_path / "unrolled", progress=False)
    scan = train(train_config(byte_dataset, "model.scan_layers=true", "model.remat=full"), tmp_path / "scan",
                 progress=False)  # fmt: skip
    a, b = ({r["step"]: r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r}
            for d in (tmp_path / "unrolled", tmp_path / "scan"))  # fmt: skip
    assert sorted(a) == sorted(b) == list(range(1, 21))
    np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-5, atol=0)
    assert a[20] < a[1] - 0.5  # it learned something
    # The stacked params were sharded by the rules, their layer axis on no mesh axis.
    assert scan.param_shardings["blocks"]["mlp"]["up"]["kernel"].spec == P(None, "fsdp", "tensor")
    assert scan.param_shardings["blocks"]["attn"]["out"]["kernel"].spec == P(None, "tensor", None, "fsdp")
    # final/ is per-layer on disk; loaded in the run's layout, it equals the unrolled run's params.
    on_disk = ocp.StandardCheckpointer().metadata(scan.final_dir / "params").item_metadata
    assert "blocks_2" in on_disk and "blocks" not in on_disk
    _, p_scan = load_params(scan.final_dir)
    _, p_unrolled = load_params(unrolled.final_dir)
    for x, y in zip(jax.tree.leaves(to_per_layer(p_scan)), jax.tree.leaves(p_unrolled), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)
    # A resume with scan_layers changed is refused, in one line, before anything is trained.
    with pytest.raises(ConfigError, match=r"model\.scan_layers=true") as err:
        train(train_config(byte_dataset, "train.steps=30"), tmp_path / "scan", resume=True, progress=False)
    assert "\n" not in str(err.value)
