"""The config schema, presets, parameter counts and `jaxllm info`."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jaxllm import ConfigError, ModelConfig, count_params, flops_per_token
from jaxllm.config import Config, preset_names

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("preset", "expected"),
    [("mini", 529_408), ("gpt2-124m", 124_439_808)],
)
def test_preset_has_exact_parameter_count(preset, expected):
    assert count_params(ModelConfig.preset(preset)) == expected


def test_advanced_is_within_one_percent_of_the_original_demo():
    n = count_params(ModelConfig.preset("advanced"))
    assert abs(n - 56_808_854) / 56_808_854 <= 0.01
    assert n == 56_369_664  # the documented shapes in configs/advanced.yaml


def test_advanced_is_llama_style_with_grouped_query_attention():
    cfg = ModelConfig.preset("advanced")
    assert cfg.family == "llama" and cfg.kv_heads < cfg.n_heads and not cfg.use_bias


def test_every_preset_is_a_yaml_file_in_configs():
    files = sorted(p.stem for p in (REPO / "configs").glob("*.yaml"))
    assert set(preset_names()) <= set(files)
    for name in preset_names():
        assert ModelConfig.from_yaml(REPO / "configs" / f"{name}.yaml") == ModelConfig.preset(name)


def test_unknown_preset_names_the_available_ones():
    with pytest.raises(ConfigError, match=r"unknown preset 'gpt5'.*mini"):
        ModelConfig.preset("gpt5")


def _write(tmp_path, model: dict, **sections) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": model, **sections}))
    return path


def test_misspelt_key_is_named_with_a_suggestion(tmp_path):
    model = {**ModelConfig.preset("mini").to_dict()}
    model["n_layrs"] = model.pop("n_layers")
    with pytest.raises(ConfigError, match=r"unknown key 'n_layrs' \(did you mean 'n_layers'\?\)"):
        ModelConfig.from_yaml(_write(tmp_path, model))


def test_ill_typed_key_is_named(tmp_path):
    model = {**ModelConfig.preset("mini").to_dict(), "d_model": "wide"}
    with pytest.raises(ConfigError, match=r"d_model: .*integer.*'wide'"):
        ModelConfig.from_yaml(_write(tmp_path, model))


def test_bad_enum_value_is_named(tmp_path):
    model = {**ModelConfig.preset("mini").to_dict(), "family": "mamba"}
    with pytest.raises(ConfigError, match=r"family: .*'gpt' or 'llama'"):
        ModelConfig.from_yaml(_write(tmp_path, model))


def test_unknown_section_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown section 'modle'"):
        ModelConfig.from_yaml(_write(tmp_path, ModelConfig.preset("mini").to_dict(), modle={}))


def test_inconsistent_heads_are_refused():
    with pytest.raises(ConfigError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        ModelConfig.preset("mini").replace(n_kv_heads=3)
    with pytest.raises(ConfigError, match=r"divisible by n_heads"):
        ModelConfig.preset("mini").replace(d_model=130)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        ModelConfig.from_yaml(tmp_path / "nope.yaml")


def test_flops_per_token_follows_the_stated_formula():
    cfg = ModelConfig.preset("mini")
    d, f, v, L, T = 128, 256, 1000, 2, 64
    n_matmul = L * (4 * d * d + 2 * d * f) + d * v
    flops = flops_per_token(cfg)
    assert flops["n_matmul_params"] == n_matmul
    assert flops["forward"] == 2 * n_matmul + 4 * L * T * d
    assert flops["train"] == 3 * flops["forward"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxllm.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_json_reports_count_flops_and_shapes():
    out = run_cli("info", "gpt2-124m", "--json")
    assert out.returncode == 0, out.stderr
    desc = json.loads(out.stdout)
    assert desc["n_params"] == 124_439_808
    assert desc["flops_per_token"] == flops_per_token(ModelConfig.preset("gpt2-124m"))
    shapes = {p["name"]: p["shape"] for p in desc["params"]}
    assert shapes["token_embed"] == [50257, 768]
    assert shapes["blocks_11/attn/query/kernel"] == [768, 12, 64]


def test_info_text_for_a_yaml_path(tmp_path):
    out = run_cli("info", str(REPO / "configs" / "mini.yaml"))
    assert out.returncode == 0, out.stderr
    assert "529,408" in out.stdout and "(embed, heads, head_dim)" in out.stdout


def test_info_unknown_preset_exits_2_without_traceback():
    out = run_cli("info", "gpt5")
    assert out.returncode == 2
    assert "error: unknown preset 'gpt5'" in out.stderr and "Traceback" not in out.stderr


def test_hf_family_fields_are_validated_and_round_trip_through_yaml(tmp_path):
    advanced = ModelConfig.preset("advanced")
    assert (advanced.qkv_bias, advanced.sliding_window, advanced.rope_scaling) == (False, None, None)
    cfg = advanced.replace(
        qkv_bias=True, sliding_window=4096,
        rope_scaling={"type": "llama3", "factor": 8, "low_freq_factor": 1, "high_freq_factor": 4,
                      "original_max_position_embeddings": 8192},
    )  # fmt: skip
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"model": cfg.to_dict()}))
    assert ModelConfig.from_yaml(tmp_path / "c.yaml") == cfg
    assert hash(cfg) == hash(ModelConfig.from_yaml(tmp_path / "c.yaml"))  # a static jit argument
    assert count_params(cfg) == count_params(advanced) + advanced.n_layers * (512 + 2 * 256)  # q, k, v biases
    with pytest.raises(ConfigError, match="rope_scaling"):
        advanced.replace(rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(ConfigError, match="qkv_bias applies to the llama family"):
        ModelConfig.preset("mini").replace(qkv_bias=True)
    with pytest.raises(ConfigError, match="sliding_window"):
        advanced.replace(sliding_window=0)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("train.lr=1", "override train.lr=1: unknown key 'train.lr'; did you mean 'train.learning_rate'?"),
        ("model.n_layrs=1", "override model.n_layrs=1: unknown key 'model.n_layrs'; did you mean 'model.n_layers'?"),
        ("train.d_model=64", "override train.d_model=64: unknown key 'train.d_model'; did you mean 'model.d_model'?"),
        ("trian.steps=3", "override trian.steps=3: unknown key 'trian'; did you mean 'train'?"),
        ("train.steps=abc", "override train.steps=abc: train.steps: Input should be a valid integer"),
    ],
)
def test_a_bad_override_is_named_as_typed_with_a_suggestion(override, expected):
    with pytest.raises(ConfigError) as err:
        Config.load("mini", [override])
    assert str(err.value).startswith(expected)
    assert "mini.yaml" not in str(err.value)  # the preset's file is not where the mistake is


def test_a_bad_override_on_the_command_line_is_one_error_line():
    out = subprocess.run(
        [sys.executable, "-m", "jaxllm.cli", "train", "--config", "mini", "train.lr=1"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: override train.lr=1: unknown key 'train.lr'; did you mean 'train.learning_rate'?"
    ]


def test_a_mistake_in_the_file_still_names_the_file(tmp_path):
    path = _write(tmp_path, ModelConfig.preset("mini").to_dict(), train={"lr": 1})
    with pytest.raises(ConfigError, match=rf"{path}: unknown key 'train.lr'"):
        Config.load(path)


@pytest.mark.parametrize("seed", [-1, 2**32, 2**64])
def test_train_seeds_outside_32_bits_are_refused(seed):
    """JAX's PRNG keys take 32 bits: 2**32 used to wrap silently to the run of seed 0."""
    with pytest.raises(ConfigError, match=rf"override train.seed={seed}: train.seed: Input should be"):
        Config.load("mini", [f"train.seed={seed}"])


def test_the_largest_32_bit_train_seed_is_accepted():
    assert Config.load("mini", [f"train.seed={2**32 - 1}"]).train.seed == 2**32 - 1
