"""Raw in-process torch: the physical limit the daemon is compared with.

    python -m bench.raw --archive A.esar --threads 2 [--seconds 3] [--batches 1,2,4,...]

Loads the archive's own TorchScript file (``model.pt``; the quantized engine its
manifest names), sets ``torch.set_num_threads(threads)`` (the daemon's per-instance
intra-op budget) and, under ``torch.inference_mode()``, measures:

* batch 1: the latency of single calls (p50/p99) and their rate, back to back;
* batch 1 after an idle gap (``batch1_after_idle``: ``IDLE_GAP_S`` of sleep before each
  call, about one echo round trip): what a model costs at one request in flight, where
  every call follows a pause. On this machine a pause alone made the issue-12 MLP's
  forward 2-3x slower (its caches and the core's state are not kept warm), so the c=1
  cells are read against this figure, not the back-to-back one;
* every batch size of the sweep: the time of one call (median of short chunks), hence
  samples/s, its CPU time with the intra-op threads (``cpu_ms_threads``) and with one
  thread (``cpu_ms``: the model's own compute, which the bench subtracts from a server's
  CPU per request); the best batch is the one with the most samples/s.

Prints one JSON line. Runs in its own process so that its OpenMP threads are gone
before the load cases start.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from edgeserve.archive.format import read_manifest

_CHUNK_S = 0.05
IDLE_GAP_S = 1e-3


def load_module(archive: Path) -> tuple[torch.jit.ScriptModule, list[int]]:
    manifest = read_manifest(archive, trust=None)
    engine = (manifest.quantization or {}).get("engine")
    if engine and engine in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = engine
    with zipfile.ZipFile(archive) as zf:
        module = torch.jit.load(io.BytesIO(zf.read(manifest.model_file)), map_location="cpu")
    return module.eval(), list(manifest.inputs[0].shape[1:])


def _batch_one(
    module: torch.jit.ScriptModule, x: torch.Tensor, seconds: float, gap_s: float = 0.0
) -> dict[str, Any]:
    """Single calls for ``seconds``, each after ``gap_s`` of sleep (0: back to back)."""
    times = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or not times:
        if gap_s:
            time.sleep(gap_s)
        started = time.perf_counter()
        module(x)
        times.append(time.perf_counter() - started)
    arr = np.asarray(times)
    return {
        "gap_ms": gap_s * 1e3,
        "p50_ms": float(np.percentile(arr, 50) * 1e3),
        "p99_ms": float(np.percentile(arr, 99) * 1e3),
        "throughput": float(1.0 / np.median(arr)),
        "calls": len(times),
    }


def _per_call_s(
    module: torch.jit.ScriptModule, x: torch.Tensor, seconds: float
) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the whole process, i.e. every intra-op thread) of
    one call: medians over short chunks."""
    chunks: list[float] = []
    cpu: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(chunks) < 3:
        calls = 0
        started, cpu_started = time.perf_counter(), time.process_time()
        while (elapsed := time.perf_counter() - started) < _CHUNK_S or calls == 0:
            module(x)
            calls += 1
        chunks.append(elapsed / calls)
        cpu.append((time.process_time() - cpu_started) / calls)
    return statistics.median(chunks), statistics.median(cpu)


def _busy() -> tuple[float, float, float]:
    """(monotonic time, this process's CPU seconds, the machine's busy CPU seconds)."""
    own = psutil.Process().cpu_times()
    total = psutil.cpu_times()
    busy = sum(total) - total.idle - getattr(total, "iowait", 0.0)
    return time.monotonic(), own.user + own.system, busy


def measure(archive: Path, threads: int, batches: list[int], seconds: float) -> dict[str, Any]:
    torch.set_num_threads(threads)
    module, sample_shape = load_module(archive)
    per_batch_s = seconds / (len(batches) + 1)
    sweep: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        for size in [1, *batches]:  # warm-up (and TorchScript profiling runs)
            for _ in range(3):
                module(torch.randn(size, *sample_shape))
        start = _busy()
        single = _batch_one(module, torch.randn(1, *sample_shape), per_batch_s)
        after_idle = _batch_one(module, torch.randn(1, *sample_shape), per_batch_s, IDLE_GAP_S)
        for size in batches:
            call_s, cpu_s = _per_call_s(module, torch.randn(size, *sample_shape), per_batch_s)
            sweep[str(size)] = {
                "call_ms": call_s * 1e3,
                "cpu_ms_threads": cpu_s * 1e3,
                "samples_per_s": size / call_s,
            }
        end = _busy()
        # The model's own compute, as the bench subtracts it from a server's CPU: one
        # thread's CPU time per call, which neither OpenMP's spinning at its barriers nor
        # other tenants of the cores inflate (measured last: it leaves one thread set).
        torch.set_num_threads(1)
        for size in batches:
            x = torch.randn(size, *sample_shape)
            sweep[str(size)]["cpu_ms"] = _per_call_s(module, x, per_batch_s / 2)[1] * 1e3
    wall = end[0] - start[0]
    best = max(sweep, key=lambda size: sweep[size]["samples_per_s"])
    return {
        "threads": threads,
        "batch1": single,
        "batch1_after_idle": after_idle,
        "sweep": sweep,
        "best_batch": int(best),
        "best_throughput": sweep[best]["samples_per_s"],
        "own_cores": (end[1] - start[1]) / wall,
        "other_cores": max(0.0, (end[2] - start[2]) - (end[1] - start[1])) / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.raw", description=__doc__)
    parser.add_argument("--archive", type=Path, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    batches = [int(b) for b in args.batches.split(",")]
    print(json.dumps(measure(args.archive, args.threads, batches, args.seconds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
