"""What machine a measurement ran on: CPU, cores, memory, load and library versions, for the record."""

from __future__ import annotations

import os
import platform
from typing import Any

import torch


def _read_first(path: str, key: str) -> str | None:
    try:
        with open(path) as f:
            for line in f:
                if line.lower().startswith(key.lower()):
                    return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def machine_info() -> dict[str, Any]:
    """CPU model, cores, memory, load and library versions of this machine."""
    import timm
    import transformers

    import hf_sp

    mem = _read_first("/proc/meminfo", "MemTotal")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count()
    return {
        "cpu_model": _read_first("/proc/cpuinfo", "model name") or platform.processor() or "unknown",
        "cpu_count": os.cpu_count(),
        "cpus_available": affinity,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "memory_total": mem,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "hf_sp": hf_sp.__version__,
    }
