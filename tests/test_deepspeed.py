"""DeepSpeed ZeRO on CPU (gloo): ZeRO-3 on 2 ranks against jaxllm sharded over 8 simulated devices,
DeepSpeed checkpoint resume, ZeRO-1 bf16 and ZeRO-2 with activation checkpointing.

Few DeepSpeed processes on purpose: the first in a fresh environment compiles DeepSpeed's CPU comm
op (about 1-2 minutes on 2 cores, cached in ~/.cache/torch_extensions afterwards). Four launches
here. Tolerances: parity_helpers.py, except the bf16 one below.
"""

import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install '.[deepspeed]')")

from jaxllm import load_params
from jaxllm.config import Config
from jaxllm.model import init_params
from jaxllm.parity import compare_runs, step_losses
from jaxllm.train import train as jax_train

from parity_helpers import LOSS_RTOL, assert_params_agree, export_init, made_once
from torchrun_helpers import fresh, torchrun

pytestmark = pytest.mark.slow

# 16 sequences per update = 2 micro-batches x 2 ranks x 4 rows (jaxllm: 2 micro-batches x 8 devices x 1 row).
OVERRIDES = ["model.vocab_size=257", "model.n_layers=2", "train.batch_size=16", "train.grad_accum=2",
             "train.warmup_steps=2", "train.steps=10", "train.log_every=1", "train.eval_every=5",
             "train.eval_batches=2", "train.checkpoint_every=5", "mesh.data=1", "mesh.fsdp=-1"]  # fmt: skip


def deepspeed_run(data, out, stage: int, *extra: str, ranks: int = 2, init=None, resume: bool = False, prepare=None):
    args = ["-m", "torch_ref.train_deepspeed", "--config", "mini", "--data", str(data), "--out", str(out),
            "--deepspeed", f"zero{stage}", "--no-progress", *(["--init", str(init)] if init else []),
            *(["--resume"] if resume else []), *OVERRIDES, *extra]  # fmt: skip
    return torchrun(args, nproc=ranks, prepare=prepare or fresh(out))


@pytest.fixture(scope="module")
def zero3(byte_dataset, tmp_path_factory):
    """jaxllm FSDP over 8 simulated devices, and DeepSpeed ZeRO-3 on 2 ranks, from the same weights;
    made once per session."""
    cfg = Config.load("mini", [*OVERRIDES, f"data.path={byte_dataset}"])

    def make(tmp):
        assert len(jax.devices()) == 8
        jax_train(cfg, tmp / "jax", progress=False)
        deepspeed_run(byte_dataset, tmp / "ds", 3, init=export_init(cfg, tmp))

    tmp = made_once(tmp_path_factory, "zero3", make)
    return tmp, cfg, tmp / "init.safetensors"


def test_zero3_on_two_ranks_matches_jaxllm_sharded_over_8_devices(zero3):
    tmp, cfg, _ = zero3
    comparison = compare_runs(tmp / "jax", tmp / "ds", init=init_params(cfg.model, cfg.train.seed))
    assert comparison.steps == list(range(1, 11))
    np.testing.assert_allclose(comparison.loss_b, comparison.loss_a, rtol=LOSS_RTOL, atol=0)
    assert sorted(comparison.eval_b) == sorted(comparison.eval_a) == [5, 10]
    np.testing.assert_allclose(list(comparison.eval_b.values()), list(comparison.eval_a.values()), rtol=LOSS_RTOL)
    assert_params_agree(comparison)
    assert sorted(p.name for p in (tmp / "ds" / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "5"]


def test_deepspeed_checkpoint_resumes_to_the_same_losses_and_weights(zero3, byte_dataset, tmp_path):
    tmp = zero3[0]
    # The run as if it had died between steps 5 and 10: DeepSpeed's `latest` names step 5.
    cut = tmp_path / "cut"

    def make_cut():
        shutil.rmtree(cut, ignore_errors=True)
        shutil.copytree(tmp / "ds", cut)
        shutil.rmtree(cut / "checkpoints" / "10")
        shutil.rmtree(cut / "final")
        (cut / "checkpoints" / "latest").write_text("5")

    deepspeed_run(byte_dataset, cut, 3, resume=True, prepare=make_cut)
    full, resumed = step_losses(tmp / "ds"), step_losses(cut)
    assert sorted(resumed) == list(range(1, 11))
    # Same ranks, same partitions, same reduction order: the continuation is exact.
    assert [resumed[s] for s in range(6, 11)] == [full[s] for s in range(6, 11)]
    _, a = load_params(tmp / "ds" / "final")
    _, b = load_params(cut / "final")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_zero2_with_activation_checkpointing_on_one_rank_matches_jaxllm(zero3, byte_dataset, tmp_path):
    tmp, cfg, init = zero3
    deepspeed_run(byte_dataset, tmp_path / "ds", 2, "model.remat=save_dots", ranks=1, init=init)
    comparison = compare_runs(tmp / "jax", tmp_path / "ds", init=init_params(cfg.model, cfg.train.seed))
    np.testing.assert_allclose(comparison.loss_b, comparison.loss_a, rtol=LOSS_RTOL, atol=0)
    assert_params_agree(comparison)


def test_zero1_bf16_trains_close_to_float32_and_saves_float32_weights(zero3, byte_dataset, tmp_path):
    tmp, _, init = zero3
    deepspeed_run(byte_dataset, tmp_path / "ds", 1, "model.dtype=bfloat16", "model.remat=full", ranks=1, init=init)
    fp32, bf16 = step_losses(tmp / "jax"), step_losses(tmp_path / "ds")
    # bf16 rounds activations to an 8-bit mantissa (unit roundoff 2^-9 ~ 2e-3); the mean loss over 1,024
    # tokens averages those roundings: measured <= 1.2e-4 relative. The bound is the unit roundoff itself,
    # while a real bug (no update, a wrong schedule) moves these losses by 10-40%. And bf16 was really on:
    # float32 runs agree to <= 4e-7, this one differs by more than 1e-5.
    rel = [abs(bf16[s] - fp32[s]) / fp32[s] for s in fp32]
    assert sorted(bf16) == sorted(fp32) and max(rel) <= 2e-3
    assert max(rel) > 1e-5
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ds" / "final" / "model.safetensors"), framework="numpy") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {np.dtype("float32")}  # noqa: SIM118
