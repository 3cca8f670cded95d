"""save_params / load_params: a params directory that round-trips exactly and is written atomically."""

import jax
import numpy as np
import pytest
import yaml

from jaxllm import InputError, ModelConfig, init_params, load_params, save_params

CFG = ModelConfig.preset("mini").replace(n_layers=1, vocab_size=64)


def test_round_trip_is_bit_exact_and_keeps_the_config(tmp_path):
    params = init_params(CFG, 0)
    save_params(tmp_path / "ckpt", CFG, params)
    cfg, loaded = load_params(tmp_path / "ckpt")
    assert cfg == CFG
    assert jax.tree.structure(loaded) == jax.tree.structure(params)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(loaded), strict=True))
    assert yaml.safe_load((tmp_path / "ckpt" / "config.yaml").read_text())["model"]["vocab_size"] == 64


def test_no_temporary_directory_is_left_behind(tmp_path):
    save_params(tmp_path / "ckpt", CFG, init_params(CFG, 0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_existing_directory_is_not_overwritten_unless_asked(tmp_path):
    save_params(tmp_path / "ckpt", CFG, init_params(CFG, 0))
    with pytest.raises(InputError, match="already exists"):
        save_params(tmp_path / "ckpt", CFG, init_params(CFG, 1))
    save_params(tmp_path / "ckpt", CFG, init_params(CFG, 1), overwrite=True)
    _, loaded = load_params(tmp_path / "ckpt")
    np.testing.assert_array_equal(loaded["token_embed"], init_params(CFG, 1)["token_embed"])


def test_loading_a_directory_that_is_not_a_checkpoint_names_it(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty is not a jaxllm params directory"):
        load_params(tmp_path / "empty")


def test_restores_onto_given_shardings(tmp_path):
    save_params(tmp_path / "ckpt", CFG, init_params(CFG, 0))
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, init_params(CFG, 0))
    _, params = load_params(tmp_path / "ckpt", shardings)
    assert params["token_embed"].sharding == replicated
