"""The one description of the machine: for benchmark output, evaluation reports and kernel selection."""

from __future__ import annotations

import functools
import os
import platform
from pathlib import Path

__all__ = ["cpu_flags", "cpu_model", "machine_info"]

#: The ISA features the kernels and reports care about, as /proc/cpuinfo names them.
_FEATURES = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile")


@functools.cache
def _cpuinfo() -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if ":" in line:
                key, value = line.split(":", 1)
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as the kernel reports them (empty where /proc/cpuinfo has none, e.g. macOS)."""
    return frozenset(_cpuinfo().get("flags", "").split())


def machine_info() -> dict:
    """CPU model and ISA features, cores (all and usable), torch version and threads, load average, platform."""
    import torch

    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = None
    flags = cpu_flags()
    return {
        "cpu": cpu_model(),
        "isa": [name for name in _FEATURES if name in flags],
        "cores": os.cpu_count(),
        "usable_cores": usable,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
