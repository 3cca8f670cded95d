"""torch_ref: the PyTorch twin of jaxllm, the reference its numbers must match."""

from torch_ref.generate import generate
from torch_ref.model import Transformer, build_model

__all__ = ["Transformer", "build_model", "generate"]
