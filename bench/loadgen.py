"""The load generator: persistent worker processes, one gRPC channel per target each.

``LoadPool(procs)`` spawns the processes once (``spawn``: no grpc state is forked) and
keeps them, with their channels, for the whole bench. ``pool.run(spec, server_pid)``
splits the load (in-flight calls or the Poisson rate) across the processes, starts
them on one shared ``time.monotonic`` schedule (warm-up, then the measured window),
samples CPU (psutil) of the load processes, of the server and of the whole machine
at the window's edges, and merges what the processes recorded into a ``LoadResult``.
"""

from __future__ import annotations

import multiprocessing
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
import psutil

from bench.drivers import INFER_METHOD, OK, Job, Recording, drive

_SETUP_S = 0.3  # time the processes get to receive the job before the warm-up starts


@dataclass(frozen=True)
class LoadSpec:
    """What to offer a target."""

    address: str
    kind: str
    """``closed`` | ``open`` | ``stream`` (see ``bench.drivers.Job``)."""
    payload: bytes
    concurrency: int = 1
    """closed/stream: requests in flight in total."""
    rate: float = 0.0
    """open: offered requests per second in total."""
    warmup_s: float = 0.5
    duration_s: float = 3.0
    timeout_s: float = 10.0
    method: str = INFER_METHOD


@dataclass
class CpuShare:
    """CPU used during the window, in cores (1.0 = one core busy the whole window)."""

    client: float
    server: float
    machine: float
    other: float
    """Busy cores of the machine not spent by the client or the server (other tenants)."""


@dataclass
class LoadResult:
    window_s: float
    latency_ok: np.ndarray
    """Seconds, OK requests recorded in the window (closed/stream: completed in it; open:
    issued in it)."""
    issued_ok: np.ndarray
    """Issue time of each OK request relative to the window start, seconds."""
    codes: dict[str, int]
    latency_rejected: np.ndarray
    """Seconds, RESOURCE_EXHAUSTED replies."""
    lag: np.ndarray
    shed: int
    cpu: CpuShare
    processes: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> int:
        return int(self.latency_ok.size)

    @property
    def throughput(self) -> float:
        return self.ok / self.window_s

    @property
    def offered(self) -> float:
        return (sum(self.codes.values()) + self.shed) / self.window_s


def _worker_main(conn: Connection) -> None:
    import grpc

    channels: dict[str, grpc.Channel] = {}

    def channel_for(address: str) -> grpc.Channel:
        channel = channels.get(address)
        if channel is None:
            channel = grpc.insecure_channel(address)
            grpc.channel_ready_future(channel).result(timeout=30)
            channels[address] = channel
        return channel

    conn.send(("ok", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        command, argument = message
        try:
            if command == "connect":
                channel_for(argument)
                conn.send(("ok", None))
            else:
                conn.send(("ok", drive(channel_for(argument.address), argument)))
        except Exception:
            conn.send(("error", traceback.format_exc()))
    for channel in channels.values():
        channel.close()


class LoadPool:
    """``procs`` load processes, started once; ``close()`` stops them."""

    def __init__(self, procs: int) -> None:
        if procs < 1:
            raise ValueError(f"load processes must be >= 1, got {procs}")
        context = multiprocessing.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        for index in range(procs):
            parent, child = context.Pipe()
            process = context.Process(
                target=_worker_main, args=(child,), name=f"bench-load-{index}", daemon=True
            )
            process.start()
            child.close()
            self._conns.append(parent)
            self._procs.append(process)
        self._ps = [psutil.Process(p.pid) for p in self._procs]
        for conn in self._conns:
            self._reply(conn, "start")

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send(None)
            except (BrokenPipeError, OSError):
                pass
        for process in self._procs:
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()

    def __enter__(self) -> LoadPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def run(
        self,
        spec: LoadSpec,
        server_cpu: Callable[[], float] | None,
        *,
        edges: Callable[[], Any] | None = None,
    ) -> LoadResult:
        """Offer ``spec`` and return the merged records of the measured window;
        ``server_cpu()`` gives the server's CPU seconds so far (all its processes).

        ``edges`` is called at the window's start and end; the two values land in
        ``result.extra["edges"]`` (the bench reads the daemon's batch counters there)."""
        wanted = len(self._conns) if spec.kind == "open" else spec.concurrency
        used = self._conns[: max(1, wanted)]
        for conn in used:
            conn.send(("connect", spec.address))
        for conn in used:
            self._reply(conn, spec.address)
        start_at = time.monotonic() + _SETUP_S + spec.warmup_s
        end_at = start_at + spec.duration_s
        jobs = _split(spec, len(self._conns), start_at, end_at)
        used = self._conns[: len(jobs)]
        for conn, job in zip(used, jobs, strict=True):
            conn.send(("job", job))
        _sleep_until(start_at)
        before = self._cpu(server_cpu, len(jobs))
        first = edges() if edges is not None else None
        _sleep_until(end_at)
        after = self._cpu(server_cpu, len(jobs))
        last = edges() if edges is not None else None
        records = [self._reply(conn, spec.address) for conn in used]
        result = _merge(records, spec, start_at, _cpu_share(before, after), len(jobs))
        result.extra["edges"] = (first, last)
        return result

    @staticmethod
    def _reply(conn: Connection, what: str) -> Any:
        if not conn.poll(120):
            raise TimeoutError(f"load process did not answer ({what})")
        status, value = conn.recv()
        if status != "ok":
            raise RuntimeError(f"load process failed ({what}):\n{value}")
        return value

    def _cpu(
        self, server_cpu: Callable[[], float] | None, used: int
    ) -> tuple[float, float, float, float]:
        wall = time.monotonic()
        client = sum(_proc_cpu(p) for p in self._ps[:used])
        served = server_cpu() if server_cpu is not None else 0.0
        total = psutil.cpu_times()
        busy = sum(total) - total.idle - getattr(total, "iowait", 0.0)
        return wall, client, served, busy


def _proc_cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _cpu_share(before: tuple[float, ...], after: tuple[float, ...]) -> CpuShare:
    wall = max(1e-9, after[0] - before[0])
    client = (after[1] - before[1]) / wall
    server = (after[2] - before[2]) / wall
    machine = (after[3] - before[3]) / wall
    return CpuShare(client, server, machine, max(0.0, machine - client - server))


def _sleep_until(deadline: float) -> None:
    while (left := deadline - time.monotonic()) > 0:
        time.sleep(left)


def _split(spec: LoadSpec, procs: int, start_at: float, end_at: float) -> list[Job]:
    common = dict(
        address=spec.address,
        kind=spec.kind,
        payload=spec.payload,
        start_at=start_at,
        end_at=end_at,
        timeout_s=spec.timeout_s,
        method=spec.method,
    )
    if spec.kind == "open":
        return [
            Job(**common, rate=spec.rate / procs, seed=index + 1)  # type: ignore[arg-type]
            for index in range(procs)
        ]
    used = min(procs, spec.concurrency)
    shares = [spec.concurrency // used + (i < spec.concurrency % used) for i in range(used)]
    return [Job(**common, share=share) for share in shares]  # type: ignore[arg-type]


def _merge(
    records: list[Recording], spec: LoadSpec, start_at: float, cpu: CpuShare, used: int
) -> LoadResult:
    issued = np.concatenate([np.asarray(r.issued, dtype=np.float64) for r in records])
    latency = np.concatenate([np.asarray(r.latency, dtype=np.float64) for r in records])
    codes_list = [code for r in records for code in r.codes]
    codes_arr = np.asarray(codes_list, dtype=object)
    counts: dict[str, int] = {}
    for code in codes_list:
        counts[code] = counts.get(code, 0) + 1
    ok = codes_arr == OK if codes_list else np.zeros(0, dtype=bool)
    rejected = codes_arr == "RESOURCE_EXHAUSTED" if codes_list else np.zeros(0, dtype=bool)
    return LoadResult(
        window_s=spec.duration_s,
        latency_ok=latency[ok],
        issued_ok=issued[ok] - start_at,
        codes=counts,
        latency_rejected=latency[rejected],
        lag=np.concatenate([np.asarray(r.lag, dtype=np.float64) for r in records]),
        shed=sum(r.shed for r in records),
        cpu=cpu,
        processes=used,
    )
