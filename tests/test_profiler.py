"""Profiler traces: `train.profile_steps` and `jaxllm generate --profile` write traces xprof opens."""

import pytest

from jaxllm.cli import main
from jaxllm.config import Config
from jaxllm.errors import ConfigError
from jaxllm.profiler import trace_files

TINY = ["model.vocab_size=257", "model.n_layers=2", "train.batch_size=8", "train.warmup_steps=2"]
QUIET = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0"]


def assert_trace(log_dir) -> None:
    """One run in xprof's layout (plugins/profile/RUN/HOST.xplane.pb), non-empty."""
    files = trace_files(log_dir)
    assert len(files) == 1, list(log_dir.rglob("*"))
    assert files[0].stat().st_size > 1000


def test_profile_steps_write_a_trace_under_the_run_directory(byte_dataset, tmp_path):
    import jax

    from jaxllm.train import train

    cfg = Config.load("mini", [*TINY, *QUIET, f"data.path={byte_dataset}", "train.steps=4",
                               "train.profile_steps=2:3", "mesh.data=1"])  # fmt: skip
    train(cfg, tmp_path / "run", devices=jax.devices()[:1], progress=False)
    assert_trace(tmp_path / "run" / "profile")


@pytest.mark.parametrize(
    "value, message",
    [
        ("3:2", "expected 1 <= START <= END, got '3:2'"),
        ("0:2", "expected 1 <= START <= END"),
        ("two:three", "expected START:END"),
        ("5", "expected START:END"),
        ("2:50", "ends after the last step (steps=10)"),
    ],
)
def test_a_bad_profile_steps_is_one_line_naming_the_key(value, message):
    with pytest.raises(ConfigError) as err:
        Config.load("mini", ["train.steps=10", f"train.profile_steps={value}"])
    text = str(err.value)
    assert "profile_steps" in text and message in text and "\n" not in text


def test_profile_steps_unquoted_in_yaml_is_read_as_a_range(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {family: gpt, vocab_size: 64, context_length: 16, d_model: 32, n_layers: 1, "
                    "n_heads: 2, d_ff: 64}\ntrain:\n  steps: 100\n  profile_steps: 10:12\n")  # fmt: skip
    assert Config.load(path).train.profile_steps == "10:12"  # YAML 1.1 alone would give 612


def test_generate_profile_writes_a_trace_of_the_generation(checkpoint, tmp_path, capsys):
    main(["generate", "--checkpoint", str(checkpoint[0]), "--prompt", "the cat", "--max-new-tokens", "4",
          "--temperature", "0", "--profile", str(tmp_path / "trace")])  # fmt: skip
    assert capsys.readouterr().out.startswith("the cat")
    assert_trace(tmp_path / "trace")
