"""Where the server's time goes: py-spy and per-thread CPU during chosen cases.

``python -m bench --profile [--profile-cases mlp-uds-c1,mlp-uds-c32,echo-uds-c32]``
runs, after the measured repeats, each chosen case once more (figures kept apart from
the medians) with the server profiled two ways:

* per-thread CPU (psutil, ``/proc``) over the run: which threads burn the cores (the
  event loop, the instance worker, OpenMP and grpc core threads);
* ``py-spy record --gil --native``: samples of the thread that holds the GIL, with C
  frames, so time inside grpc's Cython/C core, protobuf (upb), libc system calls and
  torch shows up instead of hiding under ``Handle._run``. The GIL is what the event
  loop and the instance threads share, so these shares say what serializes the server.
  (Native unwinding stops the process for each sample: throughput drops while
  profiled; shares are what matter.)

Raw stacks go to ``OUT/profile-<case>.txt`` (collapsed format, for any flamegraph tool).
The summary gives shares by *area* of the innermost frame (libc calls by name), by
*owner* (the innermost frame that is not libc or the interpreter: who caused the work),
owners in issue 12's *groups* (grpc's own work, asyncio's bookkeeping, protobuf, and
edgeserve's codec, servicer, batching and recorders: which lever a cut would pull), and
the top frames by self and inclusive samples.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil

from bench.cases import Case, CaseRunner, server_of
from bench.server import Server

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")
_THREAD = re.compile(r"^thread \((?P<tid>\d+)\)(?::\s*(?P<name>.*))?$")
_RUNTIME = ("libpython", "ceval", "object.h", "<frozen", ".c", ".h", "ld-linux")
_AREAS = (
    ("cygrpc", "grpc (Cython/C core)"),
    ("grpc", "grpc (Python)"),
    ("_asyncio", "asyncio (C)"),
    ("asyncio/", "asyncio"),
    ("_message", "protobuf (upb)"),
    ("google/protobuf", "protobuf"),
    ("libtorch", "torch"),
    ("torch/", "torch"),
    ("numpy", "numpy"),
    ("handlers/", "edgeserve.handlers"),
    ("bench/", "bench handler"),
    ("selectors.py", "selectors"),
    ("threading.py", "threading"),
    ("logging/", "logging"),
)


# Owner prefixes -> group, first match wins; "edgeserve (other)" and "other" catch the rest.
_GROUPS = (
    ("grpc", "grpc's own work"),
    ("asyncio", "asyncio bookkeeping"),
    ("selectors", "asyncio bookkeeping"),
    ("protobuf", "protobuf parse/serialize"),
    ("edgeserve.api.codec", "edgeserve codec"),
    ("edgeserve.api.tensor_contents", "edgeserve codec"),
    ("edgeserve.api.request_parameters", "edgeserve codec"),
    ("edgeserve.api.inference", "edgeserve servicer (inference, errors, bounds)"),
    ("edgeserve.api.errors", "edgeserve servicer (inference, errors, bounds)"),
    ("edgeserve.api.bounds", "edgeserve servicer (inference, errors, bounds)"),
    ("edgeserve.handlers", "model compute (torch, numpy, handlers)"),
    ("edgeserve.serving.worker", "edgeserve instance hand-off (worker)"),
    ("edgeserve.serving", "edgeserve batching (batcher, queue, policy, registry)"),
    ("edgeserve.telemetry", "edgeserve recorders and telemetry"),
    ("edgeserve", "edgeserve (other)"),
    ("torch", "model compute (torch, numpy, handlers)"),
    ("numpy", "model compute (torch, numpy, handlers)"),
    ("bench handler", "model compute (torch, numpy, handlers)"),
)


def group(owner: str) -> str:
    """Issue 12's group of an owner (``_owner``): which part of the server's work it is."""
    for prefix, name in _GROUPS:
        if owner.startswith(prefix):
            return name
    return "other"


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    return found if Path(found).exists() else None


def area(func: str, file: str) -> str:
    for root in ("agent/", "edgeserve/"):
        if file.startswith(root) or f"/{root}" in file:
            inside = (
                file[file.rindex(root) + len(root) :] if f"/{root}" in file else file[len(root) :]
            )
            return "edgeserve." + inside.removesuffix(".py").replace("/", ".")
    if file.startswith("libc.so"):
        return f"libc {func}" if not func.startswith("0x") else "libc"
    for needle, name in _AREAS:
        if needle in file:
            return name
    if any(marker in file for marker in _RUNTIME):
        return "python runtime"
    return "other"


def _parse(frame: str) -> tuple[str, str]:
    """(display key, area) of one collapsed frame."""
    match = _FRAME.match(frame)
    if not match:
        return frame, "other"
    file = match["file"]
    return f"{match['func']} ({Path(file).name})", area(match["func"], file)


def _owner(areas: list[str]) -> str:
    for name in reversed(areas):
        if not name.startswith("libc") and name != "python runtime":
            return name
    return areas[-1] if areas else "other"


def summarize_stacks(text: str, top: int = 15) -> dict[str, Any]:
    """Shares from py-spy's raw output: ``thread (tid): name;frame;frame... count``."""
    counters: dict[str, Counter[str]] = {
        k: Counter()
        for k in ("threads", "areas_self", "owners", "groups", "top_self", "top_inclusive")
    }
    names: dict[str, str] = {}
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        parts = stack.split(";")
        thread = _THREAD.match(parts[0])
        if thread:
            names[thread["tid"]] = thread["name"] or thread["tid"]
            parts = parts[1:]
        parsed = [_parse(f) for f in parts]
        if not parsed:
            continue
        total += count
        counters["threads"][names.get(thread["tid"], "?") if thread else "?"] += count
        counters["areas_self"][parsed[-1][1]] += count
        owner = _owner([a for _, a in parsed])
        counters["owners"][owner] += count
        counters["groups"][group(owner)] += count
        counters["top_self"][parsed[-1][0]] += count
        for key in {k for k, _ in parsed}:
            counters["top_inclusive"][key] += count

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 4)) for k, v in counter.most_common(top)] if total else []

    out: dict[str, Any] = {k: shares(c) for k, c in counters.items()}
    out["samples"] = total
    out["thread_names"] = names
    return out


def _thread_times(pid: int) -> dict[str, float]:
    return {str(t.id): t.user_time + t.system_time for t in psutil.Process(pid).threads()}


def thread_cpu(
    before: dict[str, float], after: dict[str, float], wall: float, names: dict[str, str]
) -> list[tuple[str, float]]:
    """Cores used per thread over ``wall`` seconds, busiest first; unnamed threads (never
    seen holding the GIL: OpenMP workers, grpc core threads) are summed together."""
    used: dict[str, float] = {}
    for tid, seconds in after.items():
        busy = (seconds - before.get(tid, 0.0)) / wall
        if busy > 0.005:
            name = names.get(tid, "native threads (OpenMP, grpc core)")
            used[name] = used.get(name, 0.0) + busy
    ranked = sorted(used.items(), key=lambda item: -item[1])
    return [(name, round(cores, 3)) for name, cores in ranked]


def profile_cases(
    runner: CaseRunner,
    servers: dict[str, Server],
    cases: list[Case],
    out: Path,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    """Run each case with the profilers on its server; summaries by case name."""
    binary = py_spy()
    if binary is None:
        return {"error": "py-spy not found (pip install py-spy)"}
    found: dict[str, Any] = {}
    for case in cases:
        server = servers.get(server_of(case))
        if server is None:
            continue
        found[case.name] = _profile_one(binary, runner, server, case, out, seconds, warmup_s)
        if "error" not in found[case.name]:
            print(render(case.name, found[case.name]), flush=True)
    return found


def _profile_one(
    binary: str,
    runner: CaseRunner,
    server: Server,
    case: Case,
    out: Path,
    seconds: float,
    warmup_s: float,
) -> dict[str, Any]:
    path = out / f"profile-{case.name}.txt"
    command = [
        binary, "record", "--pid", str(server.pid), "--duration", str(int(seconds + warmup_s) + 2),
        "--rate", "100", "--format", "raw", "--threads", "--gil", "--native",
        "--output", str(path),
    ]  # fmt: skip
    before, started = _thread_times(server.pid), time.monotonic()
    spy = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        figures = runner.run(case, duration_s=seconds, retries=0)
    finally:
        log, _ = spy.communicate(timeout=seconds + warmup_s + 60)
    after, wall = _thread_times(server.pid), time.monotonic() - started
    if spy.returncode != 0 or not path.exists():
        return {"error": log.decode(errors="replace")[-2000:]}
    summary = summarize_stacks(path.read_text())
    summary["thread_cpu_cores"] = thread_cpu(before, after, wall, summary["thread_names"])
    summary.update(
        throughput=figures["throughput"], p50_ms=figures["p50_ms"], stacks_file=str(path)
    )
    return summary


def render(name: str, summary: dict[str, Any]) -> str:
    def rows(items: list[tuple[str, float]], unit: str = "%") -> str:
        if unit == "%":
            return "\n".join(f"    {share * 100:5.1f} %  {key}" for key, share in items)
        return "\n".join(f"    {value:5.2f} {unit}  {key}" for key, value in items)

    return (
        f"profile {name} (while profiled: {summary['throughput']:.0f}/s, "
        f"{summary['samples']} GIL samples)\n"
        f"  CPU by thread (cores):\n{rows(summary['thread_cpu_cores'], 'cores')}\n"
        f"  GIL holder by thread:\n{rows(summary['threads'])}\n"
        f"  GIL time by group (issue 12):\n{rows(summary['groups'])}\n"
        f"  GIL time by owner (innermost non-libc frame):\n{rows(summary['owners'])}\n"
        f"  GIL time by area (innermost frame):\n{rows(summary['areas_self'])}\n"
        f"  top frames (self):\n{rows(summary['top_self'])}\n"
        f"  top frames (inclusive):\n{rows(summary['top_inclusive'])}"
    )
