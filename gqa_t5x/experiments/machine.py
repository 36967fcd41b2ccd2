"""The one description of the machine a measurement ran on (every report names it).

`describe()` is what the benchmark, the study and the scripts record: the
CPU model, cores, memory, load, the JAX backend and its devices, and the
library versions; the roofline's measured ceilings are added by
`roofline.measure_machine`.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from typing import Any

_GB = 1e9


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available_memory_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            return next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), None)
    except OSError:
        return None


def total_memory_gib() -> float | None:
    """Physical memory in GiB (None where the OS does not say)."""
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages (other processes share the CPU)."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def describe() -> dict[str, Any]:
    """CPU, cores, memory, load, JAX backend/devices and library versions.

    Returns:
      {'cpu', 'cores', 'memory_gib', 'memory_available_gb', 'load_average',
      'platform', 'jax', 'backend', 'jax_devices'} and, where importable,
      'torch', 'transformers' (installed versions) and 'torch_threads' (where torch
      is loaded).
    """
    import jax

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": total_memory_gib(),
        "memory_available_gb": round((available_memory_bytes() or 0) / _GB, 2),
        "load_average": load_average(),
        "platform": platform.platform(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "jax_devices": [str(d) for d in jax.devices()],
    }
    # Versions from the installed distributions: importing torch and
    # transformers only to name them costs seconds. The thread count is read
    # where torch is already loaded (the runs that used it).
    for name in ("torch", "transformers"):
        try:
            info[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
    return info
