"""NVIDIA's perf_analyzer as the bench's load generator (``--client perf_analyzer``).

perf_analyzer is Triton's C++ load generator; the ``tritonclient`` wheel ships it as
``<venv>/bin/perf_analyzer``. It needs two shared libraries the wheel does not bring:
Debian's ``libb64-0d`` (``libb64.so.0d``) and ``libcudart.so.12``, which PyPI's
``nvidia-cuda-runtime-cu12`` installs under ``site-packages/nvidia/cuda_runtime/lib``
(put on ``LD_LIBRARY_PATH`` here; no GPU is used). ``locate()`` finds all three and says
what is missing.

One measurement = one perf_analyzer run: closed loops (``--concurrency-range N``,
synchronous calls on N threads), streams (``--streaming``, N in flight) and open loops
(``--request-rate-range R --request-distribution poisson``). It measures in three
windows of ``duration / 3`` with the stability check switched off (``-s 1000 -r 3``:
the bench handles noise itself, by re-running in a quieter moment), then writes a CSV
(``-f``) whose throughput and p50/p90/p95/p99 (microseconds) become the case's figures;
its stdout's ``Throughput:`` line is the fallback. Before connecting it reads the
model's metadata and configuration (ModelMetadata, ModelConfig).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

BINARY = "perf_analyzer"
_WINDOWS = 3
_THROUGHPUT = re.compile(r"Throughput:\s*([0-9.]+)\s*infer/sec")
_PERCENTILE = re.compile(r"p(50|90|95|99) latency:\s*([0-9]+)\s*usec")


class Unavailable(RuntimeError):
    """perf_analyzer or one of its libraries is not installed; the text says which."""


@dataclass(frozen=True)
class Tool:
    binary: Path
    env: dict[str, str]
    """The environment it runs with (``LD_LIBRARY_PATH`` holding libcudart)."""


def _cudart_dir() -> Path | None:
    try:
        spec = importlib.util.find_spec("nvidia.cuda_runtime")
    except ModuleNotFoundError:
        return None
    for root in (spec.submodule_search_locations or []) if spec else []:
        lib = Path(root) / "lib"
        if (lib / "libcudart.so.12").exists():
            return lib
    return None


def locate() -> Tool:
    """The binary and its environment; ``Unavailable`` naming what is missing."""
    beside = Path(sys.executable).parent / BINARY
    found = str(beside) if beside.exists() else shutil.which(BINARY)
    if found is None:
        raise Unavailable(f"{BINARY} not found (pip install tritonclient[grpc] puts it in bin/)")
    env = dict(os.environ)
    cudart = _cudart_dir()
    if cudart is not None:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            p for p in (str(cudart), env.get("LD_LIBRARY_PATH", "")) if p
        )
    ldd = shutil.which("ldd")
    if ldd is not None:
        listing = subprocess.run(
            [ldd, found], capture_output=True, text=True, env=env, timeout=30, check=False
        ).stdout
        missing = [line.split()[0] for line in listing.splitlines() if "not found" in line]
        if missing:
            raise Unavailable(
                f"{BINARY} needs {', '.join(missing)} (apt-get install libb64-0d; "
                "pip install nvidia-cuda-runtime-cu12)"
            )
    return Tool(Path(found), env)


@dataclass(frozen=True)
class Load:
    """What one perf_analyzer run offers."""

    url: str
    """``host:port`` or ``unix:///path`` (grpc's own target syntax)."""
    model: str
    kind: str
    """``closed`` | ``stream`` | ``open``."""
    concurrency: int = 1
    rate: float = 0.0
    duration_s: float = 3.0


def command(tool: Tool, load: Load, csv_path: Path) -> list[str]:
    window_ms = max(100, round(load.duration_s * 1000 / _WINDOWS))
    args = [str(tool.binary), "-m", load.model, "-i", "grpc", "-u", load.url]
    args += ["-p", str(window_ms), "-s", "1000", "-r", str(_WINDOWS), "-f", str(csv_path)]
    if load.kind == "open":
        if load.rate <= 0:
            raise ValueError("an open loop needs a rate")
        args += [
            "--request-rate-range",
            f"{load.rate:.1f}",
            "--request-distribution",
            "poisson",
            "--max-threads",
            "16",
        ]
    else:
        args += ["--concurrency-range", str(load.concurrency)]
        if load.kind == "stream":
            args += ["--streaming"]
    return args


def parse(csv_text: str, stdout: str) -> dict[str, Any]:
    """Throughput (per second) and latency percentiles (ms) of one run: the CSV's first
    row, or the stdout's client block when the CSV is missing."""
    rows = list(csv.DictReader(csv_text.splitlines())) if csv_text.strip() else []
    if rows:
        row = rows[0]
        found: dict[str, Any] = {"throughput": float(row["Inferences/Second"])}
        for q in (50, 90, 95, 99):
            found[f"p{q}_ms"] = float(row[f"p{q} latency"]) / 1e3
        return found
    match = _THROUGHPUT.search(stdout)
    if match is None:
        raise ValueError(f"no throughput in perf_analyzer's output:\n{stdout[-1500:]}")
    found = {"throughput": float(match.group(1))}
    for q, usec in _PERCENTILE.findall(stdout):
        found[f"p{q}_ms"] = float(usec) / 1e3
    return found


def _busy_seconds() -> float:
    total = psutil.cpu_times()
    return float(sum(total) - total.idle - getattr(total, "iowait", 0.0))


def _children_cpu_seconds() -> float:
    """CPU of this process's finished children (perf_analyzer, once waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run(
    tool: Tool,
    load: Load,
    server_cpu: Callable[[], float] | None = None,
    *,
    timeout_s: float = 120.0,
) -> dict[str, Any]:
    """One perf_analyzer run: its figures and the CPU seconds of perf_analyzer
    (``client_cpu_s``), of the server (``server_cpu()``: its CPU seconds so far) and of
    the whole machine over the run (``wall_s``). ``RuntimeError`` with perf_analyzer's
    last lines when it fails or runs past ``timeout_s``."""
    with tempfile.TemporaryDirectory(prefix="esb-pa-") as scratch:
        csv_path = Path(scratch) / "pa.csv"
        args = command(tool, load, csv_path)
        before = (time.monotonic(), _children_cpu_seconds(), _served(server_cpu), _busy_seconds())
        process = subprocess.Popen(  # noqa: S603 - the located binary, our arguments
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=tool.env, text=True
        )
        try:
            stdout, _ = process.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, _ = process.communicate()
            raise RuntimeError(
                f"perf_analyzer ran past {timeout_s:.0f} s:\n{stdout[-1500:]}"
            ) from None
        after = (time.monotonic(), _children_cpu_seconds(), _served(server_cpu), _busy_seconds())
        if process.returncode != 0:
            raise RuntimeError(f"perf_analyzer exited with {process.returncode}:\n{stdout[-1500:]}")
        csv_text = csv_path.read_text() if csv_path.exists() else ""
    found = parse(csv_text, stdout)
    wall, client, server, busy = (b - a for a, b in zip(before, after, strict=True))
    found.update(wall_s=wall, client_cpu_s=client, server_cpu_s=server, busy_cpu_s=busy)
    found["command"] = " ".join("pa.csv" if a == str(csv_path) else a for a in args)
    return found


def _served(server_cpu: Callable[[], float] | None) -> float:
    return server_cpu() if server_cpu is not None else 0.0
