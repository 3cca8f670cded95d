"""LoRA: frozen base, adapters only in the optimizer and checkpoints, exact resume, meshes, peft parity and export."""

import shutil
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxllm import ConfigError, InputError, load_params, save_params
from jaxllm.config import Config
from jaxllm.lora import applied, dropout_key, init_adapters, merge
from jaxllm.metrics import read_metrics
from jaxllm.model import Dense, forward, init_params
from jaxllm.train import train
from jaxllm.train_step import init_state, loss_fn, loss_sum, train_step

from parity_helpers import LOSS_RTOL

LLAMA = ["model.family=llama", "model.vocab_size=257", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
         "model.n_kv_heads=2", "model.d_ff=128", "model.context_length=64"]  # fmt: skip
GPT = ["model.vocab_size=257", "model.n_layers=2", "model.d_model=64", "model.n_heads=4", "model.d_ff=128",
       "model.context_length=64"]  # fmt: skip
RUN = ["train.batch_size=8", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
       "train.checkpoint_every=0", "train.learning_rate=1e-2", "mesh.data=1"]  # fmt: skip


def config(data, family, *overrides: str) -> Config:
    return Config.load("mini", [*family, *RUN, "train.lora_rank=4", f"data.path={data}", *overrides])


def make_base(cfg: Config, path, seed: int = 1):
    """A params directory of random weights: the frozen base (what `--init CK` names)."""
    return save_params(path, cfg.model, init_params(cfg.model, seed))


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def one_device() -> list:
    return jax.devices()[:1]


def test_adapter_init_is_peft_default_and_leaves_the_base_model_unchanged():
    cfg = Config.load("mini", [*LLAMA, "train.lora_rank=4", "train.lora_targets=all"])
    adapters = init_adapters(cfg.model, cfg.train)
    q, o = adapters["blocks_0"]["attn"]["query"], adapters["blocks_0"]["attn"]["out"]
    assert q["lora_a"].shape == (64, 4) and q["lora_b"].shape == (4, 4, 16)
    assert o["lora_a"].shape == (4, 16, 4) and o["lora_b"].shape == (4, 64)
    for a, fan_in in [(q["lora_a"], 64), (o["lora_a"], 64), (adapters["blocks_1"]["mlp"]["down"]["lora_a"], 128)]:
        bound = 1 / np.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert np.abs(a).max() <= bound and np.abs(a).max() > 0.9 * bound
    b_leaves = [x for p, x in jax.tree_util.tree_flatten_with_path(adapters)[0] if p[-1].key == "lora_b"]
    assert len(b_leaves) == 2 * 7 and not any(np.any(b) for b in b_leaves)
    base = init_params(cfg.model, 1)
    for x, y in zip(jax.tree.leaves(base), jax.tree.leaves(merge(cfg.train, base, adapters)), strict=True):
        np.testing.assert_array_equal(x, y)


def test_lora_matches_peft_within_1e4_over_10_steps(byte_dataset, tmp_path):
    """Same base, same adapter init (copied across as a peft adapter dir), same batches: jaxllm vs peft."""
    from torch_ref.lora_peft import lora_parity

    cfg = config(byte_dataset, LLAMA, "train.steps=10", "train.lora_targets=all", "train.lora_alpha=16")
    ours, theirs = lora_parity(cfg, make_base(cfg, tmp_path / "base"), tmp_path)
    assert len(ours) == len(theirs) == 10
    np.testing.assert_allclose(ours, theirs, rtol=LOSS_RTOL, atol=0)
    assert min(ours[5:]) < ours[0] - 0.2  # the adapters did learn (the base is frozen)


def test_base_stays_frozen_and_only_adapters_are_checkpointed(byte_dataset, tmp_path):
    import orbax.checkpoint as ocp

    cfg = config(byte_dataset, GPT, "train.steps=4", "train.checkpoint_every=4")
    base = make_base(cfg, tmp_path / "base")
    result = train(cfg, tmp_path / "run", init=base, progress=False, devices=one_device())
    _, before = load_params(base)
    _, after = load_params(result.final_dir)
    flat_before = dict(jax.tree_util.tree_flatten_with_path(before)[0])
    for path, new in jax.tree_util.tree_flatten_with_path(after)[0]:
        name = jax.tree_util.keystr(path)
        changed = not np.array_equal(new, flat_before[path])
        assert changed == (("'query'" in name or "'value'" in name) and "kernel" in name), name
    state = ocp.StandardCheckpointer().restore(tmp_path / "run" / "checkpoints" / "4" / "state")
    names = {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state["params"])[0]}
    assert names and all(n.endswith(("['lora_a']", "['lora_b']")) for n in names)
    assert {n.split("['")[-2] for n in names} == {"query']", "value']"}
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    assert size(state["opt_state"]) <= 3 * size(state["params"]) < size(before) / 10


def test_resume_is_exact_and_refuses_another_base(byte_dataset, tmp_path):
    cfg = config(byte_dataset, GPT, "train.steps=6", "train.checkpoint_every=3", "train.lora_targets=all")
    base = make_base(cfg, tmp_path / "base")
    train(cfg, tmp_path / "ref", init=base, progress=False, devices=one_device())
    train(cfg, tmp_path / "run", init=base, progress=False, devices=one_device())
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "6")
    shutil.rmtree(tmp_path / "run" / "final")
    other = make_base(cfg, tmp_path / "other", seed=2)
    with pytest.raises(InputError, match=r"trained on base .*base \(sha256 [0-9a-f]{12}\), but --init gives"):
        train(cfg, tmp_path / "run", init=other, resume=True, progress=False, devices=one_device())
    resumed = train(cfg, tmp_path / "run", init=base, resume=True, progress=False, devices=one_device())
    assert resumed.start_step == 3
    np.testing.assert_allclose(losses(tmp_path / "run"), losses(tmp_path / "ref"), rtol=1e-6)
    _, a = load_params(tmp_path / "ref" / "final")
    _, b = load_params(tmp_path / "run" / "final")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_lora_on_fsdp_tp_mesh_matches_one_device(byte_dataset, tmp_path, dropout):
    run = ["train.steps=5", "train.lora_targets=all", f"train.lora_dropout={dropout}"]
    cfg = config(byte_dataset, LLAMA, *run)
    base = make_base(cfg, tmp_path / "base")
    train(cfg, tmp_path / "one", init=base, progress=False, devices=one_device())
    mesh = ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"]
    sharded = train(config(byte_dataset, LLAMA, *run, *mesh), tmp_path / "mesh", init=base, progress=False)
    np.testing.assert_allclose(losses(tmp_path / "mesh"), losses(tmp_path / "one"), rtol=1e-5)
    sh = sharded.param_shardings["blocks_0"]  # the adapters' shardings, from the one rules table
    assert sh["attn"]["query"]["lora_a"].spec == P("fsdp", None)
    assert sh["attn"]["query"]["lora_b"].spec == P(None, "tensor", None)
    assert sh["attn"]["out"]["lora_a"].spec == P("tensor", None, None)
    assert sh["mlp"]["down"]["lora_b"].spec == P(None, "fsdp")


@pytest.mark.parametrize("family", ["llama", "gpt"])
def test_peft_adapter_dir_loads_onto_the_exported_base_and_matches_the_merged_model(byte_dataset, tmp_path, family):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from jaxllm.hf import export_hf

    targets = "train.lora_targets=all" if family == "llama" else "train.lora_targets=[key,value,out,fc]"
    cfg = config(byte_dataset, LLAMA if family == "llama" else GPT, "train.steps=3", targets)
    base = make_base(cfg, tmp_path / "base")
    merged = train(cfg, tmp_path / "merged", init=base, progress=False, devices=one_device())
    unmerged_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lora_merge": False})})
    adapter = train(unmerged_cfg, tmp_path / "adapter", init=base, progress=False, devices=one_device()).final_dir
    assert sorted(p.name for p in adapter.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    export_hf(base, tmp_path / "hf_base")
    export_hf(merged.final_dir, tmp_path / "hf_merged")  # export-hf of merged LoRA weights: transformers loads it

    tokens = np.random.default_rng(0).integers(0, 257, (2, 16))
    mcfg, params = load_params(merged.final_dir)
    ours = np.asarray(forward(mcfg, params, tokens))
    assert not np.allclose(ours, np.asarray(forward(mcfg, load_params(base)[1], tokens)), atol=1e-3)  # it trained
    with torch.no_grad():
        hf_base = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base", dtype=torch.float32)
        peft_logits = PeftModel.from_pretrained(hf_base, adapter)(torch.as_tensor(tokens)).logits.numpy()
        hf_merged = AutoModelForCausalLM.from_pretrained(tmp_path / "hf_merged", dtype=torch.float32)
        merged_logits = hf_merged(torch.as_tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(peft_logits, ours, atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(merged_logits, ours, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.lora_targets=[query,gate]"], "the gpt family has no 'gate' layer"),
        (["train.lora_dropout=0.1", "model.scan_layers=true"], r"train.lora_dropout=0.1 needs model.scan_layers=false"),
        (["train.lora_targets=[]"], "train.lora_targets is empty"),
    ],
)
def test_bad_lora_settings_are_one_line_config_errors(byte_dataset, tmp_path, overrides, message):
    cfg = config(byte_dataset, GPT, *overrides)
    base = make_base(cfg, tmp_path / "base")
    with pytest.raises(ConfigError, match=message) as err:
        train(cfg, tmp_path / "run", init=base, progress=False, devices=one_device())
    assert "\n" not in str(err.value)


def test_lora_needs_a_base_of_the_configs_shapes(byte_dataset, tmp_path):
    cfg = config(byte_dataset, GPT)
    with pytest.raises(ConfigError, match="pass --init CK"):
        train(cfg, tmp_path / "run", progress=False, devices=one_device())
    wider = Config.load("mini", [*GPT, "model.d_model=128"])
    with pytest.raises(ConfigError, match=r"model.d_model=64 would change the shapes of .*\(it has 128\)"):
        train(cfg, tmp_path / "run", init=make_base(wider, tmp_path / "wide"), progress=False, devices=one_device())


def test_unknown_lora_target_names_it():
    with pytest.raises(ConfigError, match=r"train.lora_targets: unknown layer 'q_proj'.*LoRA targets: query, key"):
        Config.load("mini", ["train.lora_targets=[q_proj]"])
    assert Config.load("mini", ["train.lora_targets=query,out"]).train.lora_targets == ["query", "out"]


def test_torch_ref_refuses_lora_in_one_line(byte_dataset, tmp_path):
    from torch_ref.train import train as torch_train

    with pytest.raises(ConfigError, match="torch_ref does not train LoRA; Hugging Face peft is its PyTorch reference"):
        torch_train(config(byte_dataset, GPT), tmp_path / "run")


def test_full_fine_tuning_from_init_starts_from_its_weights(byte_dataset, tmp_path):
    """Rank 0 with `init`: the params directory's weights start the state (here jaxllm's own init for the
    run's seed, so the losses equal a fresh run's)."""
    cfg = config(byte_dataset, GPT, "train.steps=3", "train.lora_rank=0")
    base = make_base(cfg, tmp_path / "base", seed=cfg.train.seed)
    train(cfg, tmp_path / "fresh", progress=False, devices=one_device())
    train(cfg, tmp_path / "init", init=base, progress=False, devices=one_device())
    np.testing.assert_allclose(losses(tmp_path / "init"), losses(tmp_path / "fresh"), rtol=1e-6)
    other = train(cfg, tmp_path / "other", init=make_base(cfg, tmp_path / "b2", seed=5), progress=False,
                  devices=one_device())  # fmt: skip
    assert abs(losses(other.run_dir)[0] - losses(tmp_path / "fresh")[0]) > 1e-4


# LoRA dropout (train.lora_dropout > 0): adapters applied at the Dense calls, y = x·W + s·dropout(x)·A·B ------------


class _Attn(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x):
        return Dense((64,), ("heads", "head_dim", "embed"), False, jnp.float32, 0.02, n_in=2, name="out")(x)


class _Net(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x):
        return _Attn(self.cfg, name="attn")(x)


def _noisy(adapters, seed=3):
    """Adapters with a nonzero B (init has B = 0, where dropout changes nothing)."""
    leaves, treedef = jax.tree.flatten(adapters)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([x + 0.1 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)])


def test_dropout_adapter_at_a_dense_call_matches_the_hand_written_formula():
    """An `out`-shaped Dense (in dims (4, 16)) at path attn/out: x·W + s·(mask⊙x/(1-p))·A·B, the mask drawn
    from the key folded with the path's hash (the documented derivation)."""
    cfg = Config.load("mini", [*LLAMA, "train.lora_rank=3", "train.lora_alpha=6", "train.lora_dropout=0.25"])
    net = _Net(cfg.model)
    x_BTHK = jax.random.normal(jax.random.key(0), (2, 5, 4, 16))
    params = nn.unbox(net.init(jax.random.key(1), x_BTHK))["params"]
    a_HKR, b_RD = jax.random.normal(jax.random.key(2), (4, 16, 3)), jax.random.normal(jax.random.key(3), (3, 64))
    adapters = {"attn": {"out": {"lora_a": a_HKR, "lora_b": b_RD}}}
    key = jax.random.key(7)

    @jax.jit
    def ours(adapters, key):
        with applied(cfg.train, adapters, key):
            return net.apply({"params": params}, x_BTHK)

    keep_BTHK = jax.random.bernoulli(jax.random.fold_in(key, zlib.crc32(b"attn/out") & 0x7FFFFFFF), 0.75, x_BTHK.shape)
    w_HKD = params["attn"]["out"]["kernel"]
    dropped_BTHK = np.where(keep_BTHK, x_BTHK / 0.75, 0.0)
    want = np.einsum("bthk,hkd->btd", x_BTHK, w_HKD) + 2.0 * np.einsum("bthk,hkr,rd->btd", dropped_BTHK, a_HKR, b_RD)
    np.testing.assert_allclose(ours(adapters, key), want, rtol=1e-5, atol=1e-5)
    assert 0.6 < keep_BTHK.mean() < 0.9  # the mask did drop some inputs, about p of them
    no_dropout = np.einsum("bthk,hkd->btd", x_BTHK, w_HKD + 2.0 * np.einsum("hkr,rd->hkd", a_HKR, b_RD))
    np.testing.assert_allclose(ours(adapters, None), no_dropout, rtol=1e-5, atol=1e-5)  # no key: no dropout


def test_dropout_loss_tends_to_the_merged_loss_and_changes_it_for_p_above_zero(byte_dataset):
    def cfg_for(p):
        return Config.load("mini", [*LLAMA, "train.lora_rank=4", "train.lora_targets=all", f"train.lora_dropout={p}"])

    cfg = cfg_for(1e-7)
    base = init_params(cfg.model, 1)
    adapters = _noisy(init_adapters(cfg.model, cfg.train))
    tokens = np.random.default_rng(0).integers(0, 257, (4, 17))
    merged = float(loss_fn(cfg.model, merge(cfg.train, base, adapters), tokens))

    def dropped(p, key):
        with applied(cfg_for(p).train, adapters, key):
            return float(loss_fn(cfg.model, base, tokens))

    key = jax.random.key(0)
    assert abs(dropped(1e-7, key) - merged) < 1e-5 * abs(merged)
    assert dropped(0.3, key) == dropped(0.3, key)  # the same key: the same masks
    assert abs(dropped(0.3, key) - merged) > 1e-3
    assert abs(dropped(0.3, key) - dropped(0.3, jax.random.key(1))) > 1e-4


@pytest.mark.slow
def test_dropout_run_trains_resumes_exactly_and_final_holds_merged_weights(byte_dataset, tmp_path):
    import orbax.checkpoint as ocp

    cfg = config(byte_dataset, LLAMA, "train.steps=8", "train.checkpoint_every=4", "train.lora_targets=all",
                 "train.lora_dropout=0.1")  # fmt: skip
    base = make_base(cfg, tmp_path / "base")
    train(cfg, tmp_path / "ref", init=base, progress=False, devices=one_device())
    ref = losses(tmp_path / "ref")
    assert len(ref) == 8 and min(ref[4:]) < ref[0] - 0.1  # it trains (the base is frozen)
    no_drop = cfg.model_copy(update={"train": cfg.train.model_copy(update={"lora_dropout": 0.0})})
    train(no_drop, tmp_path / "plain", init=base, progress=False, devices=one_device())
    assert not np.allclose(losses(tmp_path / "plain")[1:], ref[1:], rtol=1e-5)  # dropout did act (B is 0 at step 0)

    train(cfg, tmp_path / "run", init=base, progress=False, devices=one_device())
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "8")
    shutil.rmtree(tmp_path / "run" / "final")
    assert train(cfg, tmp_path / "run", init=base, resume=True, progress=False, devices=one_device()).start_step == 4
    np.testing.assert_allclose(losses(tmp_path / "run"), ref, rtol=1e-6)

    adapters = ocp.StandardCheckpointer().restore(tmp_path / "ref" / "checkpoints" / "8" / "state")["params"]
    _, base_params = load_params(base)
    _, final = load_params(tmp_path / "ref" / "final")
    want = merge(cfg.train, base_params, adapters)  # W + s·A·B, no dropout
    for x, y in zip(jax.tree.leaves(final), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_dropout_train_step_draws_a_mask_per_micro_batch():
    """grad_accum=2: the step's loss is the sum over micro-batches (rows j, j+2) of each one's loss under
    its own key, `dropout_key(step, j)`, divided by the whole batch's count."""
    cfg = Config.load("mini", [*LLAMA, "train.lora_rank=4", "train.lora_targets=all", "train.lora_dropout=0.3",
                               "train.batch_size=4", "train.grad_accum=2"])  # fmt: skip
    base = init_params(cfg.model, 1)
    adapters = _noisy(init_adapters(cfg.model, cfg.train))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 257, (4, 17)))
    state = {**init_state(adapters, optax.sgd(0.0)), "step": jnp.asarray(5, jnp.int32)}
    _, metrics = jax.jit(lambda s, b, base: train_step(cfg.model, cfg.train, optax.sgd(0.0), s, b, None, base))(
        state, tokens, base
    )

    def micro_loss(j, key_j):
        with applied(cfg.train, adapters, dropout_key(cfg.train, 5, key_j)):
            return loss_sum(cfg.model, base, tokens[j::2])

    count = 4 * 16
    want = sum(float(micro_loss(j, j)) for j in range(2)) / count
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    same_key = sum(float(micro_loss(j, 0)) for j in range(2)) / count
    assert abs(float(metrics["loss"]) - same_key) > 1e-5  # each micro-batch has its own masks
