"""What every benchmark records about where it ran, and how it writes its results files."""

from __future__ import annotations

import json
import os
import platform
import re
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
DEFAULT_PACKAGES = ("jax", "jaxlib", "flax", "torch", "numpy")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def cpu_slug(cpu: str) -> str:
    """A CPU model as a results-file suffix: 'Intel(R) Xeon(R) Processor' -> 'intel-xeon', 'AMD EPYC 9B14' ->
    'amd-epyc'."""
    words = re.sub(r"\(r\)|\(tm\)|[^a-z0-9 ]", " ", cpu.lower()).split()
    return "-".join(words[:2]) or "cpu"


def training_goal(cpu: str, preset: str) -> float:
    """Issue 15's least CPU training-step ratio to torch_ref eager on this CPU model: on an AMD EPYC, where
    jaxllm led from the start, 1.2x (1.3x at SmolLM2-135M's shape); elsewhere (the Intel Xeon) 1.0x."""
    if _amd(cpu):
        return 1.3 if preset == "smollm2-135m" else 1.2
    return 1.0


def scaling_goal(cpu: str) -> float | None:
    """Issue 15's least 1-to-all-core scaling of jaxllm's step: 1.7x on the Intel Xeon, none on an AMD EPYC."""
    return None if _amd(cpu) else 1.7


def _amd(cpu: str) -> bool:
    return cpu_slug(cpu).startswith("amd")


# Instruction sets that decide which matmul paths a CPU has (AMX: Intel's bf16/int8 tiles).
ISA_FLAGS = ("avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def cpu_topology(cpuinfo: str | None = None) -> str:
    """'2 physical cores x 1 thread; avx512f avx512_bf16' from /proc/cpuinfo: whether the logical CPUs
    are cores of their own or hyper-threads sharing one core's units (2-core scaling hinges on it)."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text() if path.exists() else ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    if not fields.get("siblings") or not fields.get("cpu cores"):
        return "unknown"
    siblings, cores = int(fields["siblings"]), int(fields["cpu cores"])
    flags = [f for f in ISA_FLAGS if f in fields.get("flags", "").split()]
    return f"{cores} physical cores x {siblings // max(cores, 1)} thread(s); {' '.join(flags) or 'no AVX-512'}"


def machine_info(packages: Sequence[str] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """CPU model, cores, topology, GPU (if torch sees one), Python and package versions, load at start."""
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "cpu_topology": cpu_topology(),
        "python": platform.python_version(),
        "load_average_at_start": round(os.getloadavg()[0], 2),
    }
    try:
        import torch

        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["gpu"] = None
    for name in packages:
        try:
            info[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info[name] = None
    return info


def describe(info: dict[str, Any]) -> str:
    """One line for a markdown report."""
    skip = ("cpu", "cores", "cpu_topology", "gpu", "python", "load_average_at_start")
    versions = ", ".join(f"{k} {v}" for k, v in info.items() if k not in skip and v)
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ""
    topology = f" ({info['cpu_topology']})" if info.get("cpu_topology") else ""
    return (
        f"{info['cpu']}, {info['cores']} cores{topology}{gpu}; Python {info['python']}, {versions}; "
        f"load average {info['load_average_at_start']} at start"
    )


def write_results(name: str, data: dict[str, Any], markdown: str, out_dir: Path = RESULTS) -> tuple[Path, Path]:
    """`name.json` and `name.md` under `out_dir`, each written under a temporary name first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = (out_dir / f"{name}.json", out_dir / f"{name}.md")
    for path, text in zip(paths, (json.dumps(data, indent=2) + "\n", markdown), strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return paths
