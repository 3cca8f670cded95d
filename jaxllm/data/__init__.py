"""Data pipeline: `preprocess` text into a DATA_DIR of token files, and load batches from it.

Importing this package needs only numpy and pydantic; `tokenizers`, `tiktoken`, `tqdm`, `grain`
and `jax` are imported by the functions that use them (torch_ref imports `index` and `meta`).
Preprocessing: `from jaxllm.data.preprocess import preprocess` (not re-exported here, so that the
module keeps its name).
"""

from jaxllm.data.index import BatchPlan, epoch_order, global_batch_windows, local_batch, process_rows
from jaxllm.data.loader import Loader, check_data_matches_model, make_loader, rows_for_sharding, to_global_array
from jaxllm.data.meta import DataMeta, open_tokens, read_meta

__all__ = [
    "BatchPlan",
    "DataMeta",
    "Loader",
    "check_data_matches_model",
    "epoch_order",
    "global_batch_windows",
    "local_batch",
    "make_loader",
    "open_tokens",
    "process_rows",
    "read_meta",
    "rows_for_sharding",
    "to_global_array",
]
