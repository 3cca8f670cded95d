"""`python -m benchmarks.parity`: jaxllm vs torch_ref from the same weights, per preset, dtype and device.

For each case: the max abs and relative-L2 logit error of one forward pass on random tokens, and the
max relative loss difference over a few AdamW steps on the same random batches (jaxllm's pure
`train_step` against torch_ref's `PlainTrainer`). Presets run at reduced depth/vocab on CPU where
the full size would be slow (the block structure is the preset's); on CUDA at full size.
Writes benchmarks/results/parity.{json,md}. Float32 runs use full-precision matmuls on both sides.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch

import torch_ref
from benchmarks.machine import RESULTS, describe, machine_info, write_results
from jaxllm import ModelConfig, forward, init_params, to_torch_state_dict
from jaxllm.config import Config, TrainConfig
from jaxllm.optim import make_optimizer
from jaxllm.train_step import init_state, train_step
from torch_ref.trainer import Dist, PlainTrainer

REDUCED = {  # CPU: reduced depth and vocabulary; the rest is the preset's
    "mini": {},
    "advanced": {"n_layers": 2, "vocab_size": 4096, "context_length": 256},
    "gpt2-124m": {"n_layers": 2, "vocab_size": 4096, "context_length": 256},
}


def case_config(preset: str, dtype: str, device: str) -> ModelConfig:
    cfg = ModelConfig.preset(preset)
    if device == "cpu":
        cfg = cfg.replace(**REDUCED[preset])
    return cfg.replace(dtype=dtype)


def logit_error(cfg: ModelConfig, device: str, batch: int) -> dict[str, float]:
    params = init_params(cfg, 0)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, cfg.context_length))
    jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    with jax.default_matmul_precision("highest"):
        ours = np.asarray(
            forward(cfg, jax.device_put(params, jax_device), jax.device_put(jnp.asarray(tokens), jax_device))
        )
    model = torch_ref.build_model(cfg, device)
    model.load_state_dict(to_torch_state_dict(cfg, params))
    with torch.no_grad():
        ref = model(torch.from_numpy(tokens).to(device)).float().cpu().numpy()
    return {
        "max_abs": float(np.max(np.abs(ours - ref))),
        "rel_l2": float(np.linalg.norm(ours - ref) / np.linalg.norm(ref)),
    }


def loss_difference(cfg: ModelConfig, device: str, steps: int, batch: int) -> dict[str, float]:
    """Max relative loss difference over `steps` AdamW updates from the same weights and batches."""
    config = Config(
        model=cfg,
        train=TrainConfig(
            steps=steps, batch_size=batch, warmup_steps=2, learning_rate=1e-3, matmul_precision="highest"
        ),
    )
    params = init_params(cfg, 0)
    optimizer = make_optimizer(config.train)
    jax_device = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    state = jax.device_put(init_state(params, optimizer), jax_device)
    step = jax.jit(partial(train_step, cfg, config.train, optimizer))
    model = torch_ref.build_model(cfg, device)
    model.load_state_dict(to_torch_state_dict(cfg, params))
    trainer = PlainTrainer(model, config, Dist(), torch.device(device))
    batches = np.random.default_rng(1).integers(0, cfg.vocab_size, (steps, batch, cfg.context_length + 1))
    ours, ref = [], []
    with jax.default_matmul_precision("highest"):
        for b in batches:
            state, metrics = step(state, jax.device_put(jnp.asarray(b, jnp.int32), jax_device))
            ours.append(float(metrics["loss"]))
            ref.append(trainer.train_step(torch.from_numpy(b).to(device)).loss)
    rel = np.abs(np.array(ours) - np.array(ref)) / np.abs(np.array(ref))
    return {"loss_first": ref[0], "loss_last": ref[-1], "max_rel_loss_diff": float(rel.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(REDUCED))
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--devices", nargs="+", choices=["cpu", "cuda"], help="default: cpu, and cuda when present")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for parity.{json,md}")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cuda = torch.cuda.is_available() and jax.default_backend() == "gpu"
    devices = args.devices or ["cpu"] + (["cuda"] if cuda else [])
    if "cuda" in devices and not cuda:
        raise SystemExit("error: --devices cuda needs a GPU that both torch and JAX see")
    info, rows = machine_info(), []
    for device in devices:
        for preset in args.presets:
            for dtype in ("float32", "bfloat16"):
                cfg = case_config(preset, dtype, device)
                row = {
                    "preset": preset,
                    "device": device,
                    "dtype": dtype,
                    "n_layers": cfg.n_layers,
                    "vocab": cfg.vocab_size,
                    "context": cfg.context_length,
                }
                row.update(logit_error(cfg, device, args.batch))
                row.update(loss_difference(cfg, device, args.steps, args.batch))
                rows.append(row)
                print(
                    f"{preset:10} {device:4} {dtype:8}  logits max abs {row['max_abs']:.2e} rel {row['rel_l2']:.2e}"
                    f"  loss rel diff over {args.steps} steps {row['max_rel_loss_diff']:.2e}",
                    flush=True,
                )
                paths = write_results(  # after every case: a run cut short keeps what it measured
                    "parity",
                    {"machine": info, "steps": args.steps, "batch": args.batch, "rows": rows},
                    markdown(rows, info, args.steps, args.batch),
                    args.out,
                )
    print("wrote", *paths)


def markdown(rows: list[dict], info: dict, steps: int, batch: int) -> str:
    lines = [
        "# Parity: jaxllm vs torch_ref from the same weights",
        "",
        f"Command: `{' '.join(['python -m benchmarks.parity', *sys.argv[1:]])}` ({steps} AdamW steps, batch {batch}).",
        f"Machine: {describe(info)}.",
        "Float32 runs use full-precision matmuls on both sides; bfloat16 is the compute dtype (params float32).",
        "",
        "| preset | device | dtype | layers | vocab | context | logits max abs | logits rel L2 | max rel loss diff |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['preset']} | {r['device']} | {r['dtype']} | {r['n_layers']} | {r['vocab']} | {r['context']} | "
        f"{r['max_abs']:.2e} | {r['rel_l2']:.2e} | {r['max_rel_loss_diff']:.2e} |"
        for r in rows
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
