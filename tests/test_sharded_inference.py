"""Sharded inference: `mesh.*=` overrides shard the parameters and the KV cache by the one rules table
(tensor parallel over heads and MLP, data parallel over slots), with the same greedy tokens as one device.

Runs on the 8 simulated CPU devices that conftest.py sets up; the CLI case runs in a subprocess.
"""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxllm import ModelConfig, generate, init_params, save_params
from jaxllm.checkpoint import load_params, load_params_on_mesh
from jaxllm.generate_command import sample_checkpoint
from jaxllm.generation import _prefilled
from jaxllm.request import Sampling, check_request
from jaxllm.scoring import score_tokens
from jaxllm.serve import EngineSettings
from jaxllm.serve.engine import Finished
from jaxllm.serve.logprobs import Scoring
from jaxllm.serve.server import load_engine

from serve_helpers import collect

MESHES = [["mesh.tensor=2"], ["mesh.data=2", "mesh.tensor=2"]]  # (data 4, tensor 2) on all 8; (2, 2) on 4
PROMPTS = [[5, 17, 3], [9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2], [1], [7, 1, 8, 2, 8]]


@pytest.fixture(scope="module")
def llama_checkpoint(tmp_path_factory, tokenizer_file):
    """A tiny grouped-query Llama (4 heads, 2 kv heads) with a tokenizer: every sharded dim divides 2."""
    from tokenizers import Tokenizer

    vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size()
    cfg = ModelConfig.preset("advanced").replace(vocab_size=vocab + vocab % 2, d_model=64, n_layers=2, n_heads=4,
                                                 n_kv_heads=2, d_ff=96, context_length=128, init_std=0.2)  # fmt: skip
    path = save_params(tmp_path_factory.mktemp("sharded") / "ckpt", cfg, init_params(cfg, 0))
    shutil.copy(tokenizer_file, path / "tokenizer.json")
    return path


@pytest.mark.parametrize("overrides", MESHES, ids=" ".join)
def test_sharded_generate_gives_the_same_greedy_tokens_as_one_device(llama_checkpoint, overrides):
    assert jax.device_count() == 8
    cfg, params = load_params(llama_checkpoint)
    _, sharded = load_params_on_mesh(llama_checkpoint, overrides)
    data = 2 if "mesh.data=2" in overrides else 4
    assert sharded["blocks_0"]["attn"]["query"]["kernel"].sharding.spec[:2] == (None, "tensor")
    assert sharded["blocks_0"]["mlp"]["up"]["kernel"].sharding.spec[:2] == (None, "tensor")
    assert sharded["blocks_0"]["attn"]["query"]["kernel"].sharding.mesh.shape == {"data": data, "fsdp": 1, "tensor": 2}
    req = check_request(cfg, PROMPTS, Sampling(max_new_tokens=20, temperature=0.0), None)
    _, _, state = _prefilled(cfg, sharded, req)
    assert state.cache[0].k_BKSH.sharding.spec[:2] == ("data", "tensor")  # rows over data, kv heads over tensor
    assert generate(cfg, sharded, PROMPTS, max_new_tokens=20, temperature=0) == generate(
        cfg, params, PROMPTS, max_new_tokens=20, temperature=0
    )


@pytest.mark.parametrize("overrides", MESHES, ids=" ".join)
def test_sharded_serving_gives_the_same_greedy_tokens_as_one_device(llama_checkpoint, overrides):
    cfg, params = load_params(llama_checkpoint)
    settings = EngineSettings(slots=4, max_prefill_batch=2, warmup=False, min_cache=16)
    engine = load_engine(llama_checkpoint, settings, mesh_overrides=overrides)
    try:
        assert engine.wait_ready(300)
        jobs = [engine.submit(check_request(cfg, [p], Sampling(max_new_tokens=30, temperature=0.0), None))
                for p in PROMPTS]  # fmt: skip
        served = [collect(job, timeout=300)[0].tokens for job in jobs]
        assert engine._state.cache[0].k_BKSH.sharding.spec[:2] == ("data", "tensor")  # 4 slots over data
        # One-token scoring (its prefill scores the prompt) on the mesh: one device's log-probabilities.
        scored = engine.submit(check_request(cfg, [PROMPTS[1]], Sampling(max_new_tokens=1, temperature=0.0), None),
                               Scoring(echo=True, top=2))  # fmt: skip
        event = scored.events.get(timeout=300)
        assert isinstance(event, Finished), event
    finally:
        engine.stop()
    assert served == generate(cfg, params, PROMPTS, max_new_tokens=30, temperature=0)
    seq = PROMPTS[1] + served[1][:1]  # the greedy first token, as generated above
    target_BT, top_logp_BTK, _ = score_tokens(cfg, params, np.asarray([seq]))
    assert event.scores.tokens == seq and event.scores.logprobs[0] is None
    assert np.allclose(event.scores.logprobs[1:], np.asarray(target_BT)[0], atol=1e-4)
    assert np.allclose([[v for _, v in top] for top in event.scores.top[1:]], np.asarray(top_logp_BTK)[0, :, :2],
                       atol=1e-4)  # fmt: skip


def test_jaxllm_generate_with_mesh_overrides_prints_what_one_device_prints(llama_checkpoint):
    flags = ["--prompt", "the cat", "--temperature", "0", "--max-new-tokens", "16", "--ignore-eos"]
    one = io.StringIO()
    sample_checkpoint(llama_checkpoint, "the cat", out=one, temperature=0, max_new_tokens=16, ignore_eos=True)
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
    argv = [sys.executable, "-m", "jaxllm.cli", "generate", "--checkpoint", str(llama_checkpoint), *flags,
            "mesh.data=2", "mesh.tensor=2"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == one.getvalue() and len(one.getvalue()) > len("the cat")


def test_overrides_other_than_mesh_are_refused_in_one_line(llama_checkpoint, capsys):
    from jaxllm.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--checkpoint", str(llama_checkpoint), "train.steps=3"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.steps=3" in err and "mesh" in err
    with pytest.raises(SystemExit):
        main(["generate", "--checkpoint", str(llama_checkpoint), "mesh.tensor=3"])
    assert "mesh" in capsys.readouterr().err
