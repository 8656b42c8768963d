"""System samples: this process's CPU and memory, the machine's memory, disk, load, heat, GPU.

``SystemSampler(state_dir)`` primes the CPU counters when built, so each ``sample()``
gives the CPU use since the previous one (or since construction). ``sample(state_dir)``
is a one-shot for callers without a previous reading (``edgeserve status`` with the
daemon down): its CPU figures are None, as there is no interval to measure over.

GPU memory is read only when torch is already imported by someone else and CUDA is
already initialised: this module never imports torch and never creates a CUDA context
just to look (creating one costs hundreds of MB of device memory).

Every figure is plain data; a figure the platform cannot give is None (or empty).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger("edgeserve.telemetry")


class SystemSampler:
    """Samples the system on demand; cheap (a few psutil calls), no thread of its own."""

    def __init__(self, state_dir: Path, process: psutil.Process | None = None) -> None:
        self._state_dir = state_dir
        self._process = process if process is not None else psutil.Process()
        self._process.cpu_percent(interval=None)
        psutil.cpu_percent(interval=None)

    def sample(self) -> dict[str, Any]:
        """Plain data; CPU percents cover the time since the previous call."""
        data = _sample_common(self._process, self._state_dir)
        data["process"]["cpu_percent"] = self._process.cpu_percent(interval=None)
        data["system"]["cpu_percent"] = psutil.cpu_percent(interval=None)
        return data


def sample(state_dir: Path) -> dict[str, Any]:
    """One sample without a previous reading: the same keys, CPU percents None."""
    data = _sample_common(psutil.Process(), state_dir)
    data["process"]["cpu_percent"] = None
    data["system"]["cpu_percent"] = None
    return data


def _sample_common(process: psutil.Process, state_dir: Path) -> dict[str, Any]:
    with process.oneshot():
        memory = process.memory_info()
        threads = process.num_threads()
    virtual = psutil.virtual_memory()
    return {
        "process": {"pid": process.pid, "rss_bytes": memory.rss, "threads": threads},
        "system": {
            "cpu_count": psutil.cpu_count(),
            "memory_total_bytes": virtual.total,
            "memory_available_bytes": virtual.available,
            "memory_percent": virtual.percent,
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "disk": _disk(state_dir),
        "temperatures": _temperatures(),
        "gpus": _gpus(),
    }


def _disk(path: Path) -> dict[str, Any] | None:
    try:
        usage = psutil.disk_usage(str(path))
    except OSError as exc:
        log.debug("disk usage of %s unavailable: %s", path, exc)
        return None
    return {
        "path": str(path),
        "total_bytes": usage.total,
        "free_bytes": usage.free,
        "percent": usage.percent,
    }


def _temperatures() -> list[dict[str, Any]]:
    """One entry per sensor reading; empty where the platform has none."""
    read = getattr(psutil, "sensors_temperatures", None)
    if read is None:
        return []
    try:
        chips = read()
    except (OSError, RuntimeError) as exc:
        log.debug("temperatures unavailable: %s", exc)
        return []
    return [
        {
            "sensor": chip,
            "label": reading.label or chip,
            "celsius": reading.current,
            "high_celsius": reading.high,
            "critical_celsius": reading.critical,
        }
        for chip, readings in sorted(chips.items())
        for reading in readings
    ]


def _gpus() -> list[dict[str, Any]]:
    """CUDA memory per device, only where torch is imported and CUDA already initialised.

    Free/total come from the driver only for devices this process already uses (the
    current one or one with reserved memory): asking about another would create a
    context on it. Elsewhere they are None.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return []
    try:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return []
        current = torch.cuda.current_device()
        return [_gpu(torch, index, current) for index in range(torch.cuda.device_count())]
    except RuntimeError as exc:  # a lost device must not break status or a scrape
        log.warning("GPU memory could not be read: %s", exc)
        return []


def _gpu(torch: Any, index: int, current: int) -> dict[str, Any]:
    reserved = torch.cuda.memory_reserved(index)
    free: int | None = None
    total: int | None = None
    if index == current or reserved > 0:
        free, total = torch.cuda.mem_get_info(index)
    return {
        "index": index,
        "name": torch.cuda.get_device_name(index),
        "memory_total_bytes": total,
        "memory_free_bytes": free,
        "memory_allocated_bytes": torch.cuda.memory_allocated(index),
        "memory_reserved_bytes": reserved,
    }
