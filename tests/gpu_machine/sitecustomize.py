"""On PYTHONPATH, makes this Python look like the lent GPU machine's: no grain, deepspeed or flask."""

import importlib.abc
import importlib.util
import sys

MISSING = ("grain", "array_record", "deepspeed", "flask", "waitress")


class _Missing(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in MISSING:
            raise ModuleNotFoundError(f"{name} is not installed on the GPU machine (simulated by tests/gpu_machine)")


_find_spec = importlib.util.find_spec


def _find_spec_of_installed(name, package=None):
    """As for a package that is not installed: None (what libraries probing for optional packages expect)."""
    return None if name.split(".")[0] in MISSING else _find_spec(name, package)


importlib.util.find_spec = _find_spec_of_installed
sys.meta_path.insert(0, _Missing())
