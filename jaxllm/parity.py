"""Compare two training runs (jaxllm, torch_ref or DeepSpeed) step by step: losses and final weights.

Every run directory has `metrics.jsonl` and a jaxllm params directory in `final/`, whichever
framework wrote it, so one comparison serves every pair. Used by the parity tests and by
`benchmarks/train_parity.py`.

Parameter agreement is measured per tensor, against how far training moved it:
`rel_to_update = ||p_b - p_a|| / ||p_a - p_init||`. Attention key biases are the exception: in exact
arithmetic they get no gradient (adding q·b_k shifts every score of a softmax row equally), so what
Adam does with them is normalized rounding noise and no relative measure applies; they are held
to the absolute bound only (`has_exact_gradient`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from jaxllm.metrics import read_metrics


@dataclass(frozen=True)
class TensorDiff:
    max_abs: float  # max |p_b - p_a|
    rel_to_update: float  # ||p_b - p_a|| / ||p_a - p_init|| (nan without an init)


@dataclass
class RunComparison:
    steps: list[int]
    loss_a: list[float]
    loss_b: list[float]
    eval_a: dict[int, float] = field(default_factory=dict)
    eval_b: dict[int, float] = field(default_factory=dict)
    tensors: dict[str, TensorDiff] = field(default_factory=dict)

    @property
    def rel_loss_diffs(self) -> list[float]:
        return [abs(b - a) / abs(a) for a, b in zip(self.loss_a, self.loss_b, strict=True)]

    @property
    def max_rel_loss_diff(self) -> float:
        return max(self.rel_loss_diffs)

    @property
    def max_abs_param_diff(self) -> float:
        return max(t.max_abs for t in self.tensors.values())

    def worst_rel_to_update(self) -> tuple[str, float]:
        """The tensor (with an exact gradient) whose difference is largest against its own update."""
        name = max((n for n in self.tensors if has_exact_gradient(n)), key=lambda n: self.tensors[n].rel_to_update)
        return name, self.tensors[name].rel_to_update


def has_exact_gradient(name: str) -> bool:
    """False for attention key biases (see the module docstring)."""
    return not name.endswith("attn/key/bias")


def step_losses(run_dir: str | Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "loss" in r}


def eval_losses(run_dir: str | Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if "eval_loss" in r}


def _flat(params: Any) -> dict[str, np.ndarray]:
    import jax

    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, dtype=np.float32)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params)
    }


def compare_params(a: Any, b: Any, init: Any = None) -> dict[str, TensorDiff]:
    """Per-tensor differences between two jaxllm param trees, `init` being where both started."""
    fa, fb = _flat(a), _flat(b)
    f0 = _flat(init) if init is not None else {}
    if set(fa) != set(fb):
        raise ValueError(f"the runs have different parameters: {sorted(set(fa) ^ set(fb))[:5]}")
    out = {}
    for name, x in fa.items():
        diff = fb[name] - x
        moved = np.linalg.norm(x - f0[name]) if name in f0 else np.nan
        rel = float(np.linalg.norm(diff) / moved) if moved else float("nan")
        out[name] = TensorDiff(float(np.abs(diff).max()), rel)
    return out


def compare_runs(a_dir: str | Path, b_dir: str | Path, init: Any = None) -> RunComparison:
    """Losses at the steps both runs logged, eval losses, and final-weight differences (RUN/final)."""
    from jaxllm.checkpoint import load_params

    la, lb = step_losses(a_dir), step_losses(b_dir)
    steps = sorted(set(la) & set(lb))
    if not steps:
        raise ValueError(f"{a_dir} and {b_dir} logged no common steps")
    _, pa = load_params(Path(a_dir) / "final")
    _, pb = load_params(Path(b_dir) / "final")
    return RunComparison(
        steps=steps,
        loss_a=[la[s] for s in steps],
        loss_b=[lb[s] for s in steps],
        eval_a=eval_losses(a_dir),
        eval_b=eval_losses(b_dir),
        tensors=compare_params(pa, pb, init),
    )
