"""A pretrained checkpoint in memory, whatever file format it came from (Hugging Face or GGUF).

Framework-free (numpy only). Readers (`jaxllm.hf.read_hf_dir`, `jaxllm.gguf.read_gguf`) produce an
`HFCheckpoint` in Hugging Face's naming: `config` as transformers writes `config.json`, `tensors`
under transformers' parameter names, and the tokenizer/generation files as transformers writes them.
One writer (`jaxllm.hf.import_checkpoint`) turns it into a jaxllm params directory.

A params directory keeps these files beside `config.yaml` and `params/`, verbatim
(`KEPT_FILES`), plus `source.json` (`SOURCE_FILE`: the source format, path and `model_type`, so
that export writes the same `model_type` back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Files of a Hugging Face model directory that inference needs and a params directory keeps.
KEPT_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",  # transformers 5 writes the chat template here instead of tokenizer_config.json
    "chat_template.json",
)
SOURCE_FILE = "source.json"


@dataclass
class HFCheckpoint:
    """A model in Hugging Face's naming, read from disk by one of the format readers."""

    config: dict[str, Any]  # config.json as transformers writes it (`model_type`, sizes, rope settings…)
    tensors: dict[str, np.ndarray]  # transformers parameter names -> arrays (any float dtype)
    files: dict[str, bytes] = field(default_factory=dict)  # KEPT_FILES present, name -> content
    source: str = ""  # where it was read from (a path), for messages and source.json
    source_format: str = "hf"  # "hf" or "gguf"
