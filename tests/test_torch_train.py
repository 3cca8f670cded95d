"""torch_ref training: parity with jaxllm from the same weights and batches, accumulation, resume, DDP,
activation checkpointing, non-finite steps, DeepSpeed config checks, and checkpoint interop.

Tolerances: see parity_helpers.py.
"""

import json
import math
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from jaxllm import ConfigError, InputError, load_params
from jaxllm.cli import main as jaxllm_main
from jaxllm.config import Config, flops_per_token
from jaxllm.metrics import read_metrics
from jaxllm.model import init_params
from jaxllm.parity import compare_params, compare_runs, step_losses
from torch_ref import train as torch_train
from torch_ref.train_deepspeed import load_deepspeed_config, resolve_deepspeed_config

from parity_helpers import LOSS_RTOL, PARAM_ATOL, assert_params_agree, export_init, made_once
from torchrun_helpers import fresh, torchrun

TINY = ["model.vocab_size=257", "model.n_layers=2", "train.batch_size=8", "train.warmup_steps=2"]
QUIET = ["train.log_every=1", "train.eval_every=0", "train.checkpoint_every=0"]


def config(data, *overrides: str) -> Config:
    return Config.load("mini", [*TINY, *QUIET, f"data.path={data}", "mesh.data=1", *overrides])


def jax_train(cfg: Config, run_dir):
    from jaxllm.train import train

    return train(cfg, run_dir, devices=jax.devices()[:1], progress=False)


@pytest.fixture(scope="module")
def twenty_steps(byte_dataset, tmp_path_factory):
    """jaxllm and torch_ref, 20 steps each from the same (exported) initial weights; made once per session."""
    cfg = config(byte_dataset, "train.steps=20")

    def make(tmp):
        jax_train(cfg, tmp / "jax")
        torch_train.train(cfg, tmp / "torch", init=export_init(cfg, tmp), progress=False)

    return made_once(tmp_path_factory, "twenty_steps", make), cfg


def test_both_loops_divide_mfu_by_the_same_logged_peak(twenty_steps):
    tmp, cfg = twenty_steps
    runs = {name: json.loads((tmp / name / "run.json").read_text()) for name in ("jax", "torch")}
    assert runs["jax"] == runs["torch"]  # one figure for the machine, whichever framework trains
    assert runs["jax"]["peak_flops"] > 0 and "cached in" in runs["jax"]["peak_flops_source"]
    flops = flops_per_token(cfg.model)["train"]
    for name, run in runs.items():
        timed = [r for r in read_metrics(tmp / name / "metrics.jsonl") if "mfu" in r]
        assert timed and all(r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / run["peak_flops"]) for r in timed)


def test_torch_ref_matches_jaxllm_step_by_step_for_20_steps(twenty_steps):
    tmp, cfg = twenty_steps
    comparison = compare_runs(tmp / "jax", tmp / "torch", init=init_params(cfg.model, cfg.train.seed))
    assert comparison.steps == list(range(1, 21))
    np.testing.assert_allclose(comparison.loss_b, comparison.loss_a, rtol=LOSS_RTOL, atol=0)
    assert comparison.loss_a[-1] < comparison.loss_a[0] - 1.0  # it did learn: the comparison is not vacuous
    assert_params_agree(comparison)
    jax_rows, torch_rows = (read_metrics(tmp / run / "metrics.jsonl") for run in ("jax", "torch"))
    # The same schedule (one definition), the same grad norms before clipping, the same columns.
    np.testing.assert_allclose([r["lr"] for r in torch_rows], [r["lr"] for r in jax_rows], rtol=1e-6)
    np.testing.assert_allclose([r["grad_norm"] for r in torch_rows], [r["grad_norm"] for r in jax_rows], rtol=1e-4)
    assert [sorted(r) for r in torch_rows] == [sorted(r) for r in jax_rows]


def test_torch_run_directory_has_jaxllm_layout(twenty_steps):
    tmp, cfg = twenty_steps
    run = tmp / "torch"
    saved = Config.load(run / "config.yaml")
    assert saved.model_copy(update={"data": cfg.data}) == cfg  # (another xdist worker may have made the run)
    assert (run / "loss_curve.png").stat().st_size > 1000
    final_cfg, _ = load_params(run / "final")  # generate/serve read it as they read jaxllm's
    assert final_cfg == cfg.model
    files = {p.name for p in (run / "final").iterdir()}
    assert files >= {"config.yaml", "params", "tokenizer.json", "model.safetensors"}
    timed = [r for r in read_metrics(run / "metrics.jsonl") if "tokens_per_s" in r]
    # MFU > 0 only: the CPU "peak" is a matmul timed at start, which a loaded machine (xdist workers) can
    # under-measure several-fold; these runs reach 0.3-0.5 of it when the machine is quiet.
    assert len(timed) == 19 and all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < math.inf for r in timed)


def test_gradient_accumulation_matches_jaxllm_and_one_big_batch(byte_dataset, tmp_path):
    steps = ["train.steps=4", "train.batch_size=16"]
    cfg4 = config(byte_dataset, *steps, "train.grad_accum=4")
    jax_train(cfg4, tmp_path / "jax4")
    init = export_init(cfg4, tmp_path)
    torch_train.train(cfg4, tmp_path / "torch4", init=init, progress=False)
    torch_train.train(config(byte_dataset, *steps), tmp_path / "torch1", init=init, progress=False)
    jax4, torch4, torch1 = (step_losses(tmp_path / r) for r in ("jax4", "torch4", "torch1"))
    np.testing.assert_allclose(list(torch4.values()), list(jax4.values()), rtol=LOSS_RTOL)
    # 4 micro-batches of 4 are one batch of 16: only the summation order differs (~1e-7 relative).
    np.testing.assert_allclose(list(torch4.values()), list(torch1.values()), rtol=1e-5)


def test_resumed_run_repeats_the_uninterrupted_one_exactly(byte_dataset, tmp_path):
    cfg = config(byte_dataset, "train.steps=10", "train.checkpoint_every=5", "train.keep_checkpoints=1")
    torch_train.train(cfg, tmp_path / "full", progress=False)
    assert sorted(p.name for p in (tmp_path / "full" / "checkpoints").iterdir()) == ["10"]  # keep_checkpoints=1
    # An interrupted run: its last checkpoint is step 5, metrics were logged past it, no final/.
    torch_train.train(
        cfg.model_copy(update={"train": cfg.train.model_copy(update={"keep_checkpoints": 3})}),
        tmp_path / "cut",
        progress=False,
    )
    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "10")
    shutil.rmtree(tmp_path / "cut" / "final")
    with pytest.raises(InputError, match="already holds a run: pass --resume"):
        torch_train.train(cfg, tmp_path / "cut", progress=False)
    result = torch_train.train(cfg, tmp_path / "cut", resume=True, progress=False)
    assert result.start_step == 5
    full, resumed = step_losses(tmp_path / "full"), step_losses(tmp_path / "cut")
    assert sorted(resumed) == list(range(1, 11))  # rows after the checkpoint were redone, not duplicated
    assert [resumed[s] for s in range(1, 11)] == [full[s] for s in range(1, 11)]  # bit-identical
    _, a = load_params(tmp_path / "full" / "final")
    _, b = load_params(tmp_path / "cut" / "final")
    assert all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_activation_checkpointing_leaves_the_numbers_unchanged(byte_dataset, tmp_path, remat):
    cfg = config(byte_dataset, "train.steps=3")
    torch_train.train(cfg, tmp_path / "plain", progress=False)
    torch_train.train(config(byte_dataset, "train.steps=3", f"model.remat={remat}"), tmp_path / "remat", progress=False)
    # Recomputation runs the same kernels on the same inputs: the losses may differ by rounding only.
    np.testing.assert_allclose(
        list(step_losses(tmp_path / "remat").values()), list(step_losses(tmp_path / "plain").values()), rtol=1e-6
    )


def test_two_ddp_ranks_match_one_process(byte_dataset, tmp_path):
    overrides = [*TINY, *QUIET, "mesh.data=1", "train.steps=4", "train.grad_accum=2"]
    cfg = config(byte_dataset, "train.steps=4", "train.grad_accum=2")
    torch_train.train(cfg, tmp_path / "one", progress=False)
    args = ["-m", "torch_ref.train", "--config", "mini", "--data", str(byte_dataset), "--out", str(tmp_path / "ddp"),
            "--no-progress", *overrides]  # fmt: skip
    out = torchrun(args, nproc=2, prepare=fresh(tmp_path / "ddp"), timeout=300)
    assert out.stdout.count("trained steps 1-4") == 1  # rank 0 reports
    one, ddp = step_losses(tmp_path / "one"), step_losses(tmp_path / "ddp")
    # Each rank averages its 4 rows, DDP averages the ranks: the same mean in another order.
    np.testing.assert_allclose(list(ddp.values()), list(one.values()), rtol=1e-5)
    _, a = load_params(tmp_path / "one" / "final")
    _, b = load_params(tmp_path / "ddp" / "final")
    diffs = compare_params(a, b, init=None)
    assert max(d.max_abs for d in diffs.values()) <= PARAM_ATOL


def test_non_finite_steps_stop_or_are_skipped_without_being_applied(byte_dataset, tmp_path):
    from jaxllm.train import TrainingError

    blowup = ["train.learning_rate=1e30", "train.grad_clip=0", "train.warmup_steps=0"]
    with pytest.raises(TrainingError, match=r"non-finite loss or gradient at step \d+"):
        torch_train.train(
            config(byte_dataset, "train.steps=30", "train.checkpoint_every=1", *blowup),
            tmp_path / "stop",
            progress=False,
        )
    assert not (tmp_path / "stop" / "final").exists()
    for ckpt in (tmp_path / "stop" / "checkpoints").iterdir():  # every checkpoint holds finite weights
        import torch

        state = torch.load(ckpt / "state.pt", weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values())
    torch_train.train(
        config(byte_dataset, "train.steps=6", "train.nonfinite=skip", *blowup), tmp_path / "skip", progress=False
    )
    assert any(r.get("skipped") for r in read_metrics(tmp_path / "skip" / "metrics.jsonl"))
    _, params = load_params(tmp_path / "skip" / "final")
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


# Checkpoint interop ---------------------------------------------------------------------------------
def test_torch_weights_import_into_jaxllm_and_export_back_unchanged(twenty_steps, tmp_path):
    run, _ = twenty_steps
    weights = run / "torch" / "final" / "model.safetensors"
    jaxllm_main(["import-torch", str(weights), str(tmp_path / "imported")])
    cfg, imported = load_params(tmp_path / "imported")
    _, final = load_params(run / "torch" / "final")
    assert cfg.n_layers == 2
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(imported), jax.tree.leaves(final), strict=True))
    jaxllm_main(["export-torch", str(tmp_path / "imported"), str(tmp_path / "back.safetensors")])
    from safetensors.numpy import load_file

    first, back = load_file(str(weights)), load_file(str(tmp_path / "back.safetensors"))
    assert set(first) == set(back) and all(np.array_equal(first[k], back[k]) for k in first)


def test_weights_that_do_not_fit_the_config_are_refused(twenty_steps, tmp_path, capsys):
    run, cfg = twenty_steps
    weights = run / "torch" / "final" / "model.safetensors"
    with pytest.raises(SystemExit) as exit_:
        jaxllm_main(["import-torch", str(weights), str(tmp_path / "x"), "--config", "mini"])
    assert exit_.value.code == 2
    assert "holds a model with vocab_size=257, but the config has 1000" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    deeper = cfg.model_copy(update={"model": cfg.model.replace(n_layers=3)})
    with pytest.raises(InputError, match="n_layers=2, but the config has 3"):
        torch_train.train(deeper, tmp_path / "run", init=weights, progress=False)


# DeepSpeed configs (checked before DeepSpeed starts) ------------------------------------------------
def ds_check(byte_dataset, ds: dict, *overrides: str, world_size: int = 2, device: str = "cpu") -> dict:
    return resolve_deepspeed_config(ds, config(byte_dataset, *overrides), world_size, device, "ds.json")


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_zero_configs_take_batch_sizes_and_clipping_from_the_train_config(byte_dataset, stage):
    ds, _ = load_deepspeed_config(f"zero{stage}")
    out = ds_check(byte_dataset, ds, "train.batch_size=16", "train.grad_accum=2", "train.grad_clip=0.5")
    assert out["zero_optimization"]["stage"] == stage
    assert (out["train_batch_size"], out["gradient_accumulation_steps"], out["train_micro_batch_size_per_gpu"]) == (
        16, 2, 4)  # fmt: skip
    assert out["gradient_clipping"] == 0.5 and "torch_autocast" not in out
    bf16 = ds_check(byte_dataset, {**ds, "bf16": {"enabled": True}}, "model.dtype=bfloat16")
    assert bf16["torch_autocast"] == {"enabled": True, "dtype": "bfloat16"} and "bf16" not in bf16


@pytest.mark.parametrize(
    ("ds", "overrides", "message"),
    [
        ({"train_batch_size": 64}, [], "ds.json: train_batch_size=64 contradicts train.batch_size=8"),
        ({"gradient_accumulation_steps": 4}, ["train.grad_accum=2"],
         "gradient_accumulation_steps=4 contradicts train.grad_accum=2"),
        ({"train_micro_batch_size_per_gpu": 8}, [],
         r"train_micro_batch_size_per_gpu=8 contradicts train.batch_size / \(train.grad_accum x ranks\) = "
         r"8 / \(1 x 2\) = 4"),
        ({"gradient_clipping": 0.5}, [], "gradient_clipping=0.5 contradicts train.grad_clip=1.0"),
        ({"bf16": {"enabled": True}}, [], "bf16.enabled=true contradicts model.dtype=float32"),
        ({"bf16": {"enabled": False}}, ["model.dtype=bfloat16"], "bf16.enabled=false contradicts model.dtype=bfloat16"),
        ({"torch_autocast": {"enabled": True}}, [], "torch_autocast.enabled=true contradicts model.dtype=float32"),
        ({"optimizer": {"type": "Adam"}}, [], "remove the 'optimizer' section"),
        ({"scheduler": {"type": "WarmupLR"}}, [], "remove the 'scheduler' section"),
        ({"activation_checkpointing": {}}, [], "set model.remat=full"),
        ({"zero_optimization": {"stage": 0}}, [], "zero_optimization.stage must be 1, 2 or 3, got 0"),
        ({"zero_optimization": {}}, [], "zero_optimization.stage must be 1, 2 or 3, it is missing"),
    ],
)  # fmt: skip
def test_deepspeed_config_that_contradicts_the_train_config_is_refused(byte_dataset, ds, overrides, message):
    ds = {"zero_optimization": {"stage": 3}, **ds}
    with pytest.raises(ConfigError, match=message):
        ds_check(byte_dataset, ds, *overrides)


def test_batch_that_does_not_split_over_ranks_and_micro_batches_is_refused(byte_dataset):
    with pytest.raises(ConfigError, match=r"train.batch_size=8 is not divisible by train.grad_accum x ranks = 4 x 4"):
        ds_check(byte_dataset, {"zero_optimization": {"stage": 1}}, "train.grad_accum=4", world_size=4)


def test_fp16_is_refused_on_cpu_and_contradicts_the_model_dtype_on_gpus(byte_dataset):
    fp16 = {"zero_optimization": {"stage": 2}, "fp16": {"enabled": True}}
    with pytest.raises(ConfigError, match="DeepSpeed does not support fp16 on CPU"):
        ds_check(byte_dataset, fp16)
    with pytest.raises(ConfigError, match=r"fp16\.enabled=true contradicts model\.dtype=bfloat16"):
        ds_check(byte_dataset, fp16, "model.dtype=bfloat16", device="cuda")


def test_bad_deepspeed_config_fails_in_one_line_and_writes_nothing(byte_dataset, tmp_path):
    bad = tmp_path / "fp16.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}, "fp16": {"enabled": True}}))
    cmd = [sys.executable, "-m", "torch_ref.train_deepspeed", "--config", "mini", "--data", str(byte_dataset),
           "--out", str(tmp_path / "run"), "--deepspeed", str(bad), *TINY]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.count("\n") == 1
    assert "fp16.enabled=true, but DeepSpeed does not support fp16 on CPU" in out.stderr
    assert not (tmp_path / "run").exists()
