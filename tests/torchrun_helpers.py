"""Launching torch_ref on several CPU ranks with `torch.distributed.run`, for the DDP and DeepSpeed tests."""

import os
import re
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable

# The launcher's summary names each failed rank's exit code; a negative one is the signal that killed it.
_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)")
_ERROR_LINE = re.compile(r"error|abort|terminate|fatal|signal|killed", re.IGNORECASE)


def fresh(run_dir) -> Callable[[], None]:
    """A `prepare` for `torchrun`: the run directory starts empty."""
    return lambda: shutil.rmtree(run_dir, ignore_errors=True)


def crashed_by_signal(stderr: str) -> bool:
    """Whether a rank died of a signal of its own (abort, segfault, bus error), not only the SIGTERM the
    launcher sends the others once one rank has failed."""
    codes = [int(c) for c in _EXITCODE.findall(stderr)]
    return any(c < 0 and c != -15 for c in codes)


def failure_message(out: subprocess.CompletedProcess) -> str:
    """The output's tail, then the lines that look like errors last, where a truncated log still shows them."""
    errors = [line for line in (out.stdout + out.stderr).splitlines() if _ERROR_LINE.search(line)]
    return f"{out.stdout[-2000:]}\n{out.stderr[-4000:]}\n--- error lines ---\n" + "\n".join(errors[-25:])


def torchrun(
    args: list[str], *, nproc: int, prepare: Callable[[], None], timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run `python -m torch.distributed.run --standalone --nproc_per_node nproc ARGS` and assert it
    succeeded. `prepare()` sets up the run's starting state (an empty or a cut run directory) before
    each attempt. A rank killed by a signal of its own (seen once in CI: SIGABRT from native code, gloo
    or DeepSpeed's, under load, with no Python error) is retried once, with a warning; a failure with an
    exit status, or a second crash, fails the test with both runs' error lines."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *args]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    prepare()
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if first.returncode == 0:
        return first
    if not crashed_by_signal(first.stderr):
        raise AssertionError(failure_message(first))
    warnings.warn(f"a rank crashed by a signal; retrying once. First run:\n{failure_message(first)}", stacklevel=2)
    prepare()
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if second.returncode != 0:
        raise AssertionError(f"first run:\n{failure_message(first)}\n\nretry:\n{failure_message(second)}")
    return second
