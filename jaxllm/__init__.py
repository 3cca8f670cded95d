"""jaxllm: GPT-style language models in JAX/Flax, with a PyTorch twin (torch_ref) as reference."""

from jaxllm.host_memory import keep_freed_host_memory

keep_freed_host_memory()  # before JAX starts its threads: see jaxllm/host_memory.py

# ruff: noqa: E402  (the imports below start JAX)

from jaxllm.checkpoint import load_params, save_params
from jaxllm.config import ModelConfig, flops_per_token
from jaxllm.convert import from_torch_state_dict, to_torch_state_dict
from jaxllm.errors import ConfigError, InputError, JaxllmError
from jaxllm.generate import generate, generate_text
from jaxllm.model import abstract_params, count_params, forward, init_params, logical_axes

__all__ = [
    "ConfigError",
    "InputError",
    "JaxllmError",
    "ModelConfig",
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
