"""LoRA parity: jaxllm's LoRA training vs Hugging Face peft on the exported transformers model.

    python -m benchmarks.lora_parity              # 10 steps, rank 4 on every Dense layer

From the same base weights (a random tiny Llama, exported with `jaxllm export-hf`), the same adapter
init (jaxllm's, copied into peft as an adapter directory) and the same batches (the byte-level dataset
of `benchmarks.train_parity`), float32 on CPU: jaxllm on one device vs a torch loop with torch's AdamW
and jaxllm's schedule (`torch_ref/lora_peft.py`). Writes benchmarks/results/lora_parity.{json,md}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from jaxllm.checkpoint import save_params
from jaxllm.config import Config
from jaxllm.model import init_params

LLAMA = ["model.family=llama", "model.vocab_size=257", "model.n_layers=2", "model.d_model=64", "model.n_heads=4",
         "model.n_kv_heads=2", "model.d_ff=128", "model.context_length=64"]  # fmt: skip
RUN = ["train.batch_size=8", "train.warmup_steps=2", "train.log_every=1", "train.eval_every=0",
       "train.checkpoint_every=0", "train.learning_rate=1e-2", "mesh.data=1", "train.lora_rank=4",
       "train.lora_alpha=16", "train.lora_targets=all"]  # fmt: skip


def main() -> None:
    from benchmarks.machine import describe, machine_info, write_results
    from benchmarks.train_parity import make_dataset
    from torch_ref.lora_peft import lora_parity

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = Config.load("mini", [*LLAMA, *RUN, f"train.steps={args.steps}", f"data.path={make_dataset(tmp / 'd')}"])
        base = save_params(tmp / "base", cfg.model, init_params(cfg.model, 1))
        ours, theirs = lora_parity(cfg, base, tmp)
    rel = [abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)]
    info = machine_info(("jax", "jaxlib", "flax", "optax", "torch", "transformers", "peft", "numpy"))
    lines = [
        "# LoRA parity: jaxllm vs Hugging Face peft (CPU, float32)",
        "",
        "Command: `python -m benchmarks.lora_parity`. A random tiny Llama (2 layers, d_model 64, 4 heads / 2 kv "
        "heads, vocab 257) as the base, exported with `jaxllm export-hf`; LoRA rank 4, alpha 16, on every Dense "
        "layer (q/k/v/o, gate/up/down), jaxllm's adapter init copied into peft as an adapter directory; the same "
        "byte-level batches (8 x 64); AdamW (jaxllm: optax; peft: torch.optim.AdamW) with warmup + cosine, "
        "learning rate 1e-2, weight decay 0.1, clipping at 1.0.",
        "",
        f"Machine: {describe(info)}.",
        "",
        "| step | jaxllm | peft | relative difference |",
        "|---:|---:|---:|---:|",
        *[f"| {i + 1} | {ours[i]:.7f} | {theirs[i]:.7f} | {r:.1e} |" for i, r in enumerate(rel)],
        "",
        f"Max relative loss difference over {len(rel)} steps: {max(rel):.1e} (the bound: 1e-4).",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    data = {"machine": info, "config": [*LLAMA, *RUN], "jaxllm": ours, "peft": theirs, "rel_loss_diff": rel,
            "max_rel_loss_diff": max(rel)}  # fmt: skip
    write_results("lora_parity", data, text)


if __name__ == "__main__":
    main()
