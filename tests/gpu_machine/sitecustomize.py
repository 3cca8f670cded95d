"""On PYTHONPATH, makes this Python look like the lent GPU machine's: no grain, deepspeed or flask."""

import importlib.abc
import sys

MISSING = ("grain", "array_record", "deepspeed", "flask", "waitress")


class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in MISSING:
            raise ImportError(f"{name} is not installed on the GPU machine (simulated by tests/gpu_machine)")


sys.meta_path.insert(0, _Missing())
