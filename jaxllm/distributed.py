"""Multi-host start-up: `jax.distributed.initialize` from flags, environment variables or SLURM.

Sources, first match wins:
1. flags: `--coordinator HOST:PORT --num-processes N --process-id I`;
2. environment: `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID`;
3. a SLURM job step of more than one task (`SLURM_NTASKS` > 1): JAX reads SLURM's variables itself.
Otherwise this is a single-process run and nothing is initialized.
On CPU, cross-process collectives use gloo.
"""

from __future__ import annotations

import os

import jax

from jaxllm.errors import ConfigError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Join the multi-process run if one is configured; returns True when it did."""
    env = os.environ
    coordinator = coordinator or env.get("JAX_COORDINATOR_ADDRESS")
    num_processes = num_processes if num_processes is not None else _env_int("JAX_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAX_PROCESS_ID")
    slurm = int(env.get("SLURM_NTASKS", "1")) > 1
    if not coordinator and not slurm:
        if num_processes not in (None, 1):
            raise ConfigError("--num-processes > 1 needs --coordinator HOST:PORT (or JAX_COORDINATOR_ADDRESS)")
        return False
    if coordinator and (num_processes is None or process_id is None):
        raise ConfigError("--coordinator needs --num-processes and --process-id (or JAX_NUM_PROCESSES/JAX_PROCESS_ID)")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id {process_id} is outside [0, {num_processes})")
    # Only affects the CPU backend (GPUs use NCCL); must be set before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id)
    return True


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None
