"""Figures that are not load cases: raw torch, start-up, idle cost, memory baselines."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from bench.catalog import MAX_BATCH_SIZE, MODELS
from bench.server import DaemonSetup, start_daemon

RAW_BATCHES = ",".join(str(1 << i) for i in range(MAX_BATCH_SIZE.bit_length()))


def raw_torch(
    work: Path, model: str, threads: int, seconds: float, retries: int, quiet_cores: float
) -> dict[str, Any]:
    """Raw in-process torch on the model's archive (bench/raw.py, in a child process),
    run again while other processes load the machine; the quietest attempt is kept."""
    attempts: list[dict[str, Any]] = []
    for _ in range(1 + retries):
        attempts.append(_raw_once(work, model, threads, seconds))
        if attempts[-1]["other_cores"] <= quiet_cores:
            break
    best = min(attempts, key=lambda a: a["other_cores"])
    best["attempts"] = len(attempts)
    best["other_cores_per_attempt"] = [round(a["other_cores"], 3) for a in attempts]
    return best


def _raw_once(work: Path, model: str, threads: int, seconds: float) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "bench.raw",
        "--archive",
        str(MODELS[model].archive(work)),
        "--threads",
        str(threads),
        "--seconds",
        str(seconds),
        "--batches",
        RAW_BATCHES,
    ]
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=300)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def _child_rss(code: str) -> float:
    """RSS in MiB of a fresh interpreter after running ``code``."""
    probe = f"{code}\nimport psutil\nprint(psutil.Process().memory_info().rss)"
    done = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True, timeout=120
    )
    return int(done.stdout.strip().splitlines()[-1]) / 2**20


def baselines() -> dict[str, float]:
    """RSS of a bare interpreter and of one that imported torch (psutil included)."""
    return {"python_rss_mb": _child_rss("pass"), "import_torch_rss_mb": _child_rss("import torch")}


def idle_daemon(work: Path, public_key: Path, threads: int | None, idle_s: float) -> dict[str, Any]:
    """Start a daemon with the tiny MLP alone: time to READY, then RSS and CPU at idle."""
    setup = DaemonSetup(
        models=[(MODELS["mlp"].archive(work), {})],
        public_key=public_key,
        threads=threads,
        metrics=False,
    )
    daemon = start_daemon(work, "idle", setup)
    try:
        process = psutil.Process(daemon.pid)
        time.sleep(min(1.0, idle_s))  # let start-up work (GC, first ticks) settle
        before = process.cpu_times()
        started = time.monotonic()
        time.sleep(idle_s)
        after = process.cpu_times()
        wall = time.monotonic() - started
        busy = (after.user + after.system) - (before.user + before.system)
        return {
            "ready_s": daemon.ready_s,
            "idle_rss_mb": process.memory_info().rss / 2**20,
            "idle_cpu_percent": 100.0 * busy / wall,
            "idle_window_s": wall,
            "threads": process.num_threads(),
        }
    finally:
        daemon.stop()


def telemetry_cost(intervals: int) -> dict[str, Any]:
    """The buffer's write cost per interval (bench/telemetry_cost.py, in a child process:
    it imports torch for the drift sketches)."""
    command = [sys.executable, "-m", "bench.telemetry_cost", "--intervals", str(intervals)]
    done = subprocess.run(command, check=True, capture_output=True, text=True, timeout=600)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))
