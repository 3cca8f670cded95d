"""The host/device boundary: importing jaxllm's framework-free parts and torch_ref never starts JAX."""

import logging
import subprocess
import sys
import textwrap

import pytest

# Run in a fresh interpreter where importing JAX (or anything built on it) raises.
BLOCK_JAX = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockJax(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"jax", "jaxlib", "flax", "optax", "orbax", "grain"}:
                raise ImportError(f"{name} imported, but this must not need JAX")

    sys.meta_path.insert(0, BlockJax())
    """
)


def run_without_jax(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_JAX + textwrap.dedent(code), *args], capture_output=True, text=True, timeout=120
    )


def test_the_blocker_does_catch_an_import_of_jax():
    """Positive control: the same harness fails when JAX is imported."""
    result = run_without_jax("import jaxllm.model")
    assert result.returncode != 0 and "must not need JAX" in result.stderr


def test_framework_free_modules_and_torch_ref_import_without_jax():
    result = run_without_jax(
        """
        import jaxllm, jaxllm.config, jaxllm.data, jaxllm.data.meta, jaxllm.request, jaxllm.completion
        import torch_ref, torch_ref.model, torch_ref.generate, torch_ref.data
        import jaxllm.base_checkpoint, jaxllm.data.chat, jaxllm.loop  # fine-tuning's framework-free parts
        cfg = jaxllm.ModelConfig.preset("mini")
        req = jaxllm.request.check_request(cfg, [[1, 2]], jaxllm.Sampling(max_new_tokens=3))
        assert req.prompts == [[1, 2]]
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_jaxllm_help_and_preprocess_do_not_import_jax(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"doc{i}.txt").write_text(f"def main():\n    return {i}\n" * 200)
    result = run_without_jax(
        """
        import sys
        from jaxllm.cli import main
        try:
            main(["--help"])
        except SystemExit as e:
            assert e.code == 0
        main(["preprocess", sys.argv[1], "--out", sys.argv[2], "--tokenizer", "byte", "--val-fraction", "0.1"])
        """,
        str(corpus),
        str(tmp_path / "data"),
    )
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "meta.json").is_file()


def test_first_jax_backed_name_applies_the_malloc_settings_once():
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(
            """
            import sys
            import jaxllm, jaxllm.config, jaxllm.data, torch_ref
            from jaxllm import host_memory
            assert "jax" not in sys.modules and host_memory._applied is None
            jaxllm.init_params
            assert "jax" in sys.modules and host_memory._applied is True
            print("ok")
            """
        )],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_a_dim_left_replicated_on_its_mesh_axis_is_logged_once_naming_the_parameter(caplog):
    from jaxllm.config import MeshConfig, ModelConfig
    from jaxllm.sharding import make_mesh, param_shardings

    cfg = ModelConfig.preset("mini").replace(vocab_size=1001)  # odd: cannot split over tensor=2
    mesh = make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    with caplog.at_level(logging.WARNING, logger="jaxllm.sharding"):
        shardings = param_shardings(cfg, mesh)
        param_shardings(cfg, mesh)
    messages = [r.getMessage() for r in caplog.records]
    assert shardings["token_embed"].spec[0] is None
    vocab_lines = [m for m in messages if "'vocab'" in m]
    assert vocab_lines and all("1001" in m for m in vocab_lines)
    assert any("token_embed" in m for m in vocab_lines)
    assert len(vocab_lines) == len(set(vocab_lines)), "each parameter is logged once, not per call"


@pytest.mark.parametrize("name", ["generate", "generate_text", "forward", "load_params"])
def test_lazy_names_resolve_to_functions_not_modules(name):
    import jaxllm

    assert callable(getattr(jaxllm, name))
