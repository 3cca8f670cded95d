"""Profiler traces (`jax.profiler`) of training steps and of a generation, for xprof / TensorBoard.

A trace directory holds `plugins/profile/<time>/<host>.xplane.pb` (and `<host>.trace.json.gz`), the
layout xprof and TensorBoard's profile plugin open: `xprof --logdir DIR` (`pip install xprof`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def parse_steps(spec: str) -> tuple[int, int]:
    """`"START:END"` -> (START, END): steps counted from 1, both included; a `ValueError` names what is wrong."""
    start, sep, end = spec.partition(":")
    if not sep or not start.strip().isdigit() or not end.strip().isdigit():
        raise ValueError(f"expected START:END (two step numbers, e.g. 10:12), got {spec!r}")
    first, last = int(start), int(end)
    if first < 1 or last < first:
        raise ValueError(f"expected 1 <= START <= END, got {spec!r}")
    return first, last


class StepTrace:
    """A trace of training steps `first`..`last` (both included) into `log_dir`.

    `begin(step, state)` before dispatching a step: the trace starts at the first step of the range
    that runs, once `state` (the previous step's output) is ready. `end(step, outputs)` after
    dispatching it: the trace stops after the range's last step, once `outputs` are ready. So the
    trace holds those steps whole and nothing of their neighbours (those two steps sync the host).
    """

    def __init__(self, spec: str | None, log_dir: Path, enabled: bool = True):
        self.range = parse_steps(spec) if spec and enabled else None
        self.log_dir = log_dir
        self.active = False

    def begin(self, step: int, state: Any) -> None:
        import jax

        if self.range and not self.active and self.range[0] <= step <= self.range[1]:
            jax.block_until_ready(state)
            self.log_dir.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self.log_dir))
            self.active = True

    def end(self, step: int, outputs: Any) -> None:
        import jax

        if self.active and self.range and step >= self.range[1]:
            jax.block_until_ready(outputs)
            self.close()
            self.range = None  # once per run

    def close(self) -> None:
        """Stop the trace (if running) and write it."""
        import jax

        if self.active:
            self.active = False
            jax.profiler.stop_trace()


def trace_files(log_dir: str | Path) -> list[Path]:
    """The `.xplane.pb` files under a trace directory, newest run last."""
    return sorted(Path(log_dir).glob("plugins/profile/*/*.xplane.pb"))


@contextlib.contextmanager
def trace(log_dir: str | Path | None) -> Iterator[None]:
    """A `jax.profiler` trace of the block into `log_dir` (None: no trace)."""
    if log_dir is None:
        yield
        return
    import jax

    Path(log_dir).mkdir(parents=True, exist_ok=True)
    with jax.profiler.trace(str(log_dir)):
        yield
