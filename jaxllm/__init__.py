"""jaxllm: GPT-style language models in JAX/Flax, with a PyTorch twin (torch_ref) as reference.

Importing the package imports nothing heavy: each name below is loaded from its module the first
time it is used (PEP 562), so `import jaxllm.config`, `import jaxllm.data` or `import torch_ref`
never start JAX. The first use of a JAX-backed name imports `jaxllm.model`, which applies
`keep_freed_host_memory()` (see jaxllm/host_memory.py), as the CLI's JAX commands do first.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

# The `jaxllm train` command line only (`python -m jaxllm.cli train …` or the `jaxllm` script): SIGINT and
# SIGTERM exit 130/143 from the first moment, before even this package's imports (jaxllm/interrupt.py).
if sys.argv[1:2] == ["train"] and (sys.argv[0] == "-m" or os.path.basename(sys.argv[0]) == "jaxllm"):
    from jaxllm.interrupt import exit_on_signal

    exit_on_signal()

from jaxllm.config import ModelConfig, flops_per_token
from jaxllm.errors import ConfigError, InputError, JaxllmError
from jaxllm.host_memory import keep_freed_host_memory
from jaxllm.request import Sampling

if TYPE_CHECKING:
    from jaxllm.checkpoint import load_params, save_params
    from jaxllm.convert import from_torch_state_dict, to_torch_state_dict
    from jaxllm.generation import generate, generate_text
    from jaxllm.model import abstract_params, count_params, forward, init_params, logical_axes

# JAX-backed names -> the module that defines them.
_LAZY = {
    "load_params": "jaxllm.checkpoint",
    "save_params": "jaxllm.checkpoint",
    "from_torch_state_dict": "jaxllm.convert",
    "to_torch_state_dict": "jaxllm.convert",
    "generate": "jaxllm.generation",
    "generate_text": "jaxllm.generation",
    "abstract_params": "jaxllm.model",
    "count_params": "jaxllm.model",
    "forward": "jaxllm.model",
    "init_params": "jaxllm.model",
    "logical_axes": "jaxllm.model",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jaxllm' has no attribute {name!r}")
    keep_freed_host_memory()  # before this process's first JAX work (a no-op when already applied)
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "ConfigError",
    "InputError",
    "JaxllmError",
    "ModelConfig",
    "Sampling",
    "abstract_params",
    "count_params",
    "flops_per_token",
    "forward",
    "from_torch_state_dict",
    "generate",
    "generate_text",
    "init_params",
    "keep_freed_host_memory",
    "load_params",
    "logical_axes",
    "save_params",
    "to_torch_state_dict",
]
