"""The PyTorch reference for jaxllm's LoRA: Hugging Face peft on the transformers model of the base.

torch_ref itself does not train LoRA; this short loop is what jaxllm's LoRA training is compared with
(`tests/test_lora.py`, `benchmarks/lora_parity.py`): the base exported with `jaxllm export-hf`, the
initial adapters loaded from a peft adapter directory (`jaxllm.lora_peft.write_peft_adapter` of
jaxllm's init: the same weights, copied across), the same batches (`TorchBatches`), torch's AdamW on
the adapters only, with jaxllm's schedule and global-norm clipping. peft and transformers are
imported when called.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from jaxllm.config import Config
from jaxllm.errors import ConfigError
from torch_ref.data import TorchBatches
from torch_ref.optim import learning_rate, set_learning_rate


def peft_losses(config: Config, hf_base: str | Path, adapter_dir: str | Path, steps: int) -> list[float]:
    """The training loss of each of `steps` AdamW updates of the adapters in `adapter_dir` on `hf_base`."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tcfg = config.train
    if tcfg.grad_accum != 1:
        raise ConfigError("peft_losses takes whole batches: set train.grad_accum=1")
    torch.manual_seed(tcfg.seed)
    base = AutoModelForCausalLM.from_pretrained(str(hf_base), dtype=torch.float32, attn_implementation="eager")
    model = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=learning_rate(tcfg, 0), betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps,
        weight_decay=tcfg.weight_decay,
    )  # fmt: skip
    batches = TorchBatches(config.data.path, "train", config.model.context_length, tcfg.batch_size, tcfg.seed)
    losses = []
    for step in range(steps):
        batch_BT1 = next(batches)
        set_learning_rate(optimizer, learning_rate(tcfg, step))
        logits_BTV = model(input_ids=batch_BT1[:, :-1]).logits
        loss = F.cross_entropy(logits_BTV.reshape(-1, logits_BTV.shape[-1]).float(), batch_BT1[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tcfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, tcfg.grad_clip)
        optimizer.step()
        losses.append(loss.item())
    return losses


def lora_parity(config: Config, base_dir: str | Path, work_dir: str | Path) -> tuple[list[float], list[float]]:
    """(jaxllm's, peft's) loss at each of `train.steps` LoRA updates from the params directory `base_dir`
    (jaxllm on one device; `train.log_every` must be 1). Writes the exported base, the initial adapters
    and jaxllm's run under `work_dir`."""
    import jax

    from jaxllm.hf import export_hf
    from jaxllm.lora import init_adapters
    from jaxllm.lora_peft import write_peft_adapter
    from jaxllm.metrics import read_metrics
    from jaxllm.train import train

    work = Path(work_dir)
    export_hf(base_dir, work / "hf_base")
    adapters = init_adapters(config.model, config.train)
    write_peft_adapter(work / "adapter_init", config.model, config.train, adapters, work / "hf_base")
    train(config, work / "run", init=base_dir, progress=False, devices=jax.devices()[:1])
    ours = [r["loss"] for r in read_metrics(work / "run" / "metrics.jsonl") if "loss" in r]
    return ours, peft_losses(config, work / "hf_base", work / "adapter_init", config.train.steps)
