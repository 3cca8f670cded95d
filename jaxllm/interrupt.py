"""SIGINT / SIGTERM for `jaxllm train`: a clean exit at any moment, a checkpoint when training has begun.

Two phases:
- before the training loop (imports, set-up, compilation) there is nothing to save: a signal prints
  one line and ends the process at once with 128 + the signal number (130 for SIGINT, 143 for SIGTERM).
  `os._exit` skips the interpreter's teardown, during which XLA's threads used to crash the process
  (a KeyboardInterrupt raised in the middle of JAX's start-up ended in a segmentation fault);
- during the loop a signal only raises a flag (`StopFlag`); the loop checks it after each step,
  checkpoints that step and raises `Interrupted`, which the command line turns into one line and the
  same exit status.

With several processes every process must stop at the same step: SIGTERM is JAX's preemption notice
(the coordination service's preemption sync manager catches it), a SIGINT is turned into one, and the
loop asks `multihost_utils.reached_preemption_sync_point(step)` each step, which is True on every
process at the same step.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """Training stopped on a signal after checkpointing `step` into `saved`."""

    def __init__(self, signum: int, step: int, saved: Path | None):
        super().__init__(signum, step, saved)
        self.signum, self.step, self.saved = signum, step, saved

    def __str__(self) -> str:
        step = self.step
        where = f"checkpoint of step {step} saved in {self.saved}" if self.saved else f"stopped at step {step}"
        return f"interrupted by {signal.Signals(self.signum).name}: {where}; continue with --resume"

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def _exit_now(signum: int, frame: object) -> None:
    print(f"interrupted by {signal.Signals(signum).name}: stopped at once, nothing saved", file=sys.stderr, flush=True)
    os._exit(128 + signum)


def exit_on_signal() -> None:
    """Phase one: SIGINT/SIGTERM end the process at once (nothing to save yet)."""
    if threading.current_thread() is threading.main_thread():
        for s in SIGNALS:
            signal.signal(s, _exit_now)


@dataclass
class StopFlag:
    """Phase two: a signal is remembered; `stop_at(step)` says (on every process alike) when to stop."""

    signum: int | None = None
    multiprocess: bool = False

    def install(self) -> StopFlag:
        if threading.current_thread() is not threading.main_thread():
            return self
        signal.signal(signal.SIGINT, self._on_signal)
        if not self.multiprocess:  # with several processes JAX's preemption notifier owns SIGTERM
            signal.signal(signal.SIGTERM, self._on_signal)
        return self

    def _on_signal(self, signum: int, frame: object) -> None:
        if self.signum is not None:  # a second signal: stop now (the checkpoint may be lost)
            _exit_now(signum, frame)
        self.signum = signum
        if self.multiprocess and signum != signal.SIGTERM:
            os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notice, shared with the other processes

    def stop_at(self, step: int) -> bool:
        if self.multiprocess:
            from jax.experimental import multihost_utils

            if multihost_utils.reached_preemption_sync_point(step):
                if self.signum is None:  # another process was signalled
                    self.signum = signal.SIGTERM
                return True
            return False
        return self.signum is not None
