"""Generation in PyTorch with its own KV cache: the reference for `jaxllm/generate.py`.

Same options (`jaxllm.Sampling`), same validation (`jaxllm.request.check_request`) and the same host-side
handling of stop ids, stop strings and callbacks (`jaxllm.completion.Collector`); the numerics are this package's
own: `torch_ref.model` with a `KVCache`, `torch_ref.sampling`. Prompts are right-padded to the
longest one and every token sits at its own position, as in jaxllm; eager PyTorch needs no
buckets. `compile=True` runs the model through `torch.compile`.

Random draws come from one `torch.Generator` seeded with `seed`: reproducible, but not the same
tokens as jaxllm's (a different generator); greedy decoding is identical token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from jaxllm.completion import Collector, Completion
from jaxllm.request import Sampling, check_request
from torch_ref.model import Transformer, init_cache
from torch_ref.sampling import sample


@torch.no_grad()
def complete(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
    *,
    tokenizer: Any = None,
    callback: Callable[[int, int], None] | None = None,
    compile: bool = False,
    **options: Any,
) -> list[Completion]:
    """`generate`, returning a `Completion` (tokens, text, finish reason) per prompt."""
    cfg = model.cfg
    req = check_request(cfg, prompts, Sampling.make(sampling, options), tokenizer)
    if req.max_new_tokens == 0:
        return [Completion([], "" if tokenizer is not None else None, "length") for _ in req.prompts]
    device = next(model.parameters()).device
    b = len(req.prompts)
    lengths_B = torch.tensor([len(p) for p in req.prompts], device=device)
    t = int(lengths_B.max())
    s = t + req.max_new_tokens
    tokens_BT = torch.zeros((b, t), dtype=torch.long, device=device)
    for i, p in enumerate(req.prompts):
        tokens_BT[i, : len(p)] = torch.tensor(p)
    rows_B = torch.arange(b, device=device)
    stop_ids = torch.tensor(req.stop_ids, dtype=torch.long, device=device)
    generator = torch.Generator(device).manual_seed(req.seed)
    settings = (req.temperature, req.top_k, req.top_p)
    run = torch.compile(model, dynamic=False) if compile else model

    cache = init_cache(cfg, b, s, device)
    logits_BV = run(tokens_BT, torch.arange(t, device=device).expand(b, t), cache, lengths_B - 1)[:, 0]
    next_B = sample(logits_BV, *settings, generator=generator)
    seq_BS = torch.zeros((b, s), dtype=torch.long, device=device)
    seq_BS[:, :t] = tokens_BT
    seq_BS[rows_B, lengths_B] = next_B
    positions_B = lengths_B.clone()
    end_B = lengths_B + req.max_new_tokens
    done_B = torch.isin(next_B, stop_ids) | (positions_B >= end_B - 1)

    rows = Collector(req, tokenizer, callback)
    interactive = callback is not None or bool(req.stop_strings)
    while True:
        if interactive or bool(done_B.all()):
            raw = [seq_BS[i, len(p) : int(positions_B[i]) + 1].tolist() for i, p in enumerate(req.prompts)]
            ended = rows.update(raw, done_B.tolist())
            if rows.all_final:
                break
            done_B[ended] = True
        logits_BV = run(seq_BS[rows_B, positions_B][:, None], positions_B[:, None], cache)[:, 0]
        next_B = sample(logits_BV, *settings, generator=generator)
        active_B = ~done_B
        positions_B = positions_B + active_B
        seq_BS[rows_B[active_B], positions_B[active_B]] = next_B[active_B]
        done_B |= active_B & (torch.isin(next_B, stop_ids) | (positions_B >= end_B - 1))
    return rows.results  # type: ignore[return-value]


def generate(
    model: Transformer,
    prompts: Sequence[Sequence[int]],
    sampling: Sampling | None = None,
    *,
    tokenizer: Any = None,
    callback: Callable[[int, int], None] | None = None,
    compile: bool = False,
    **options: Any,
) -> list[list[int]]:
    """Generated token ids per prompt, prompt excluded: `jaxllm.generate`'s contract, with `model`."""
    done = complete(model, prompts, sampling, tokenizer=tokenizer, callback=callback, compile=compile, **options)
    return [c.tokens for c in done]
