"""What machine a benchmark ran on, so that a results file can be read on its own.

Everything here is best effort: a field that cannot be read is ``None``.
"""

from __future__ import annotations

import os
import platform
import socket
import sys


def _cpu_model() -> str | None:
    """The CPU model string from /proc/cpuinfo (x86 "model name", or the ARM equivalents)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            fields = {}
            for line in f:
                key, sep, value = line.partition(":")
                if sep:
                    fields.setdefault(key.strip(), value.strip())
    except OSError:
        fields = {}
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if fields.get(key):
            return fields[key]
    return platform.processor() or None


def _ram_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _usable_cores() -> int | None:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read().strip()
    except OSError:
        return None


def _parse_size(text: str | None) -> int | None:
    if not text:
        return None
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text)
    except ValueError:
        return None


def _cpu_caches() -> dict[str, int]:
    """Data/unified cache sizes of CPU 0 by level, e.g. {"L1d": 49152, "L2": 2097152, "L3": 272629760}."""
    caches = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return caches
    for entry in entries:
        if not entry.startswith("index"):
            continue
        level, kind = _read(f"{root}/{entry}/level"), _read(f"{root}/{entry}/type")
        size = _parse_size(_read(f"{root}/{entry}/size"))
        if level and size and kind in ("Data", "Unified"):
            caches[f"L{level}" + ("d" if kind == "Data" else "")] = size
    return caches


def machine_info() -> dict:
    """CPU, cores, RAM, OS, Python, library versions, torch threads and CUDA device, as a JSON-able dict."""
    import numpy as np
    import torch

    try:
        load = list(os.getloadavg())
    except (AttributeError, OSError):
        load = None
    cuda = None
    if torch.cuda.is_available():
        index = torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        cuda = {
            "name": torch.cuda.get_device_name(index),
            "memory_bytes": int(props.total_memory),
            "capability": f"{props.major}.{props.minor}",
            "cuda_version": torch.version.cuda,
            "device_count": torch.cuda.device_count(),
        }
    return {
        "hostname": socket.gethostname(),
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "usable_cores": _usable_cores(),
        "cpu_caches_bytes": _cpu_caches(),
        "ram_bytes": _ram_bytes(),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "numba": _numba_version(),  # None: taskarith's compiled CPU kernels are off (torch path)
        "torch_threads": torch.get_num_threads(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "transparent_hugepage": _read("/sys/kernel/mm/transparent_hugepage/enabled"),
        "load_average": load,
        "cuda": cuda,
    }


def _numba_version() -> str | None:
    """Numba's version when taskarith uses its kernels (installed, allowed by ``TASKARITH_BACKEND``), else None."""
    try:
        from taskarith import _numba
    except ImportError:  # a peer's environment, without taskarith
        return None
    if not _numba.enabled():
        return None
    import numba

    return numba.__version__


def describe(info: dict) -> str:
    """One line for a console header."""
    ram = info.get("ram_bytes")
    ram_text = f"{ram / 2**30:.0f} GiB RAM" if ram else "RAM unknown"
    cuda = info.get("cuda")
    gpu = f", GPU {cuda['name']}" if cuda else ""
    numba = f", numba kernels {info['numba'] or 'off'}" if "numba" in info else ""  # absent: recorded before
    return (
        f"{info.get('cpu_model') or 'unknown CPU'}, {info.get('usable_cores')} usable cores "
        f"({info.get('torch_threads')} torch threads), {ram_text}{gpu}; "
        f"Python {info.get('python')}, torch {info.get('torch')}, numpy {info.get('numpy')}"
        f"{numba}; {info.get('os')}"
    )


if __name__ == "__main__":
    import json

    print(json.dumps(machine_info(), indent=2))
