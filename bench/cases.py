"""The cases the bench runs, and how one case becomes a row of figures.

A case name reads ``<target>-<transport>-<load>``: target ``echo`` (the echo ceiling) or
a model key (``mlp``, ``mlp-nobatch``, ``mlp-int8``, ``cnn`` and the thread-budget
variants ``mlp-t1``, ``cnn-2x1``: edgeserve serving it, see ``bench.catalog``);
transport ``uds`` or ``tcp``; load ``c<N>`` (closed loop, N unary calls in flight),
``stream<N>`` (one ModelStreamInfer stream, N messages in flight), ``open<P>`` (Poisson
at P % of the capacity measured for that model and transport in the same repeat) and a
``-p<K>`` suffix for a run with K load processes instead of the default.

Opt-in cases (``ModelSpec.opt_in``) run only when ``--only`` names them; ``--only
telemetry`` is the telemetry pair (``mlp-telon`` / ``mlp-teloff``: the tiny MLP on a
daemon with telemetry at a 1 s interval and 0.1 s samples, and on one with telemetry
off), in the order off, on, on, off over two load levels, so that a drift of the
machine's load during the run weighs on both sides alike. ``--only telemetry-upload`` is
the upload pair (``mlp-telup-uds-c8-idle`` / ``-upload``: the tiny MLP while the
telemetry backlog uploads to a local Mosquitto, and with the broker down; see
``bench/telemetry_upload.py``).

The machine is shared: when other processes used more than ``quiet_cores`` of CPU in a
case's window, the case is run again (up to ``retries`` more times) and the quietest
attempt is kept; every attempt's "other" load is recorded.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.catalog import MODELS, read_counters
from bench.drivers import INFER_METHOD
from bench.loadgen import LoadPool, LoadResult, LoadSpec
from bench.server import Server, metrics_batches

ECHO = "echo"
PYTHON, PERF_ANALYZER = "python", "perf_analyzer"
CLIENTS = (PYTHON, PERF_ANALYZER)
TRANSPORTS = ("uds", "tcp")
CLOSED_LEVELS = (1, 8, 32, 64)
STREAM_IN_FLIGHT = 32


def server_of(case: Case) -> str:
    """The name of the server a case drives."""
    return ECHO if case.target == ECHO else MODELS[case.target].daemon


@dataclass(frozen=True)
class Case:
    name: str
    target: str
    """``echo`` or a model key."""
    transport: str
    kind: str
    """``closed`` | ``stream`` | ``open``."""
    concurrency: int = 1
    load: float = 0.0
    """open: offered load as a fraction of the measured capacity."""
    procs: int = 0
    """Load processes; 0 = the bench's default."""
    phase: str = ""
    """The telemetry upload case's broker state: ``idle`` (down) or ``upload`` (up,
    the backlog draining); empty elsewhere."""
    cpus: int = 0
    """The scaling curve: the server's threads pinned to its first ``cpus`` CPUs for the
    window (``taskset -a``); 0: not pinned."""

    @property
    def model(self) -> str:
        """The model whose requests are sent (the echo server gets the tiny MLP's)."""
        return "mlp" if self.target == ECHO else self.target


def _closed(target: str, transport: str, level: int, procs: int = 0, phase: str = "") -> Case:
    suffix = (f"-p{procs}" if procs else "") + (f"-{phase}" if phase else "")
    name = f"{target}-{transport}-c{level}{suffix}"
    return Case(name, target, transport, "closed", level, procs=procs, phase=phase)


def _stream(target: str, transport: str) -> Case:
    name = f"{target}-{transport}-stream{STREAM_IN_FLIGHT}"
    return Case(name, target, transport, "stream", STREAM_IN_FLIGHT)


def _open(target: str, transport: str, percent: int) -> Case:
    name = f"{target}-{transport}-open{percent}"
    return Case(name, target, transport, "open", load=percent / 100)


def all_cases() -> list[Case]:
    """Every case, in run order: echo and edgeserve interleaved per load level, so that
    each pair is measured under similar machine conditions; open loops last (they need
    the closed-loop capacity)."""
    cases: list[Case] = []
    for transport in TRANSPORTS:
        for level in CLOSED_LEVELS:
            cases += [_closed(ECHO, transport, level), _closed("mlp", transport, level)]
            if level == 1:
                cases.append(_closed("mlp-nobatch", transport, 1))
        cases += [_stream(ECHO, transport), _stream("mlp", transport)]
        cases += [_closed("mlp-int8", transport, level) for level in (1, 32)]
        cases += [_closed("cnn", transport, level) for level in (1, 32)]
    cases += [_closed(ECHO, "uds", 32, procs=2), _closed("mlp", "uds", 32, procs=2)]
    cases += [_closed("cnn", "uds", level) for level in (8, 64)]
    cases += [_closed("mlp-t1", "uds", level) for level in (1, 32)]
    cases += [_closed("cnn-2x1", "uds", level) for level in (1, 32)]
    for transport in TRANSPORTS:
        cases += [_open("mlp", transport, percent) for percent in (50, 90)]
    cases += [_open("cnn", "uds", percent) for percent in (50, 90, 300)]
    cases += [
        _closed("mlp-teloff", "uds", 8),
        _closed("mlp-telon", "uds", 8),
        _closed("mlp-telon", "uds", 32),
        _closed("mlp-teloff", "uds", 32),
    ]
    cases += [_closed("mlp-telup", "uds", 8, phase=p) for p in ("idle", "upload")]
    cases += [c for c in peer_cases() if c.target != ECHO]  # the echo's run above
    cases += [Case(f"mlp-uds-c64-cpu{n}", "mlp", "uds", "closed", 64, cpus=n) for n in SCALING_CPUS]
    return cases


SCALING_CPUS = tuple(n for n in (1, 2, 4, 8) if n <= len(os.sched_getaffinity(0)))
"""The scaling curve's core counts (issue 12): 1, 2, 4, 8 where the machine has them."""


def peer_cases() -> list[Case]:
    """Issue 12's cells (``--peers torchserve``): each model at 1 and 32 in flight over
    TCP (TorchServe's gRPC has no Unix socket), edgeserve beside TorchServe's two
    configurations, level by level, with the echo ceiling at the same levels first."""
    cases: list[Case] = []
    for level in (1, 32):
        cases.append(_closed(ECHO, "tcp", level))
        for kind in ("mlp", "cnn"):
            targets = [f"{kind}-peer", f"ts-{kind}-b32", f"ts-{kind}-nb"]
            cases += [_closed(target, "tcp", level) for target in targets]
    return cases


GROUPS = {
    "telemetry": "mlp-telon-*,mlp-teloff-*",
    "telemetry-upload": "mlp-telup-*",
    "peers": ",".join(c.name for c in peer_cases()),
    "scaling": "mlp-uds-c64-cpu*",
}
"""Names ``--only`` accepts for a set of cases."""


QUICK = (
    "echo-uds-c1,mlp-uds-c1,mlp-nobatch-uds-c1,echo-uds-c32,mlp-uds-c32,"
    "echo-uds-stream32,mlp-uds-stream32,cnn-uds-c32,cnn-uds-open90,cnn-uds-open300,"
    "echo-tcp-c1,mlp-tcp-c1"
)


def select(cases: list[Case], only: str | None) -> list[Case]:
    """Cases whose name matches one of the comma-separated globs or group names (all but
    the opt-in ones when None)."""
    if not only:
        return [
            c for c in cases if (c.target == ECHO or not MODELS[c.target].opt_in) and not c.cpus
        ]
    named = [GROUPS.get(p.strip(), p.strip()) for p in only.split(",")]
    patterns = [p for group in named for p in group.split(",") if p]
    chosen = [c for c in cases if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    if not chosen:
        raise SystemExit(f"bench: --only {only!r} matches no case")
    return chosen


@dataclass
class Settings:
    warmup_s: float
    duration_s: float
    retries: int
    quiet_cores: float
    procs: int
    client: str = PYTHON
    """``python`` (bench/loadgen.py) or ``perf_analyzer`` (bench/perf_analyzer.py)."""


class CaseRunner:
    """Runs cases against the running servers with the load pools."""

    def __init__(self, servers: dict[str, Server], work: Path, settings: Settings) -> None:
        self._servers = servers
        self._work = work
        self._settings = settings
        self._pools: dict[int, LoadPool] = {}
        self._perf_analyzer: Any = None  # bench.perf_analyzer.Tool, located on first use
        self.requests: dict[str, tuple[bytes, str]] = {}
        """target -> (serialized request, method) where not a KServe ModelInferRequest
        (the TorchServe registrations: set by the caller once TorchServe runs)."""
        self.edge_hooks: dict[str, Callable[[], Any]] = {}
        """target -> a callable read at the window's edges too (the upload observer);
        its two values land in the figures as ``window_extra``."""

    def close(self) -> None:
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()

    def pool(self, procs: int) -> LoadPool:
        procs = procs or self._settings.procs
        if procs not in self._pools:
            self._pools[procs] = LoadPool(procs)
        return self._pools[procs]

    def run(
        self,
        case: Case,
        capacity: float | None = None,
        *,
        duration_s: float | None = None,
        retries: int | None = None,
        client: str | None = None,
    ) -> dict[str, Any]:
        """Run ``case`` (again while the machine is busy) with ``client`` (the settings'
        by default); the figures of the quietest try."""
        attempts: list[dict[str, Any]] = []
        tries = 1 + (self._settings.retries if retries is None else retries)
        attempt = self._attempt
        if (client or self._settings.client) == PERF_ANALYZER:
            attempt = self._attempt_perf_analyzer
        for _ in range(tries):
            attempts.append(attempt(case, capacity, duration_s or self._settings.duration_s))
            if attempts[-1]["cpu"]["other"] <= self._settings.quiet_cores:
                break
        best = min(attempts, key=lambda a: a["cpu"]["other"])
        best["attempts"] = len(attempts)
        best["other_cores_per_attempt"] = [round(a["cpu"]["other"], 3) for a in attempts]
        return best

    def _attempt(self, case: Case, capacity: float | None, duration_s: float) -> dict[str, Any]:
        server = self._servers[server_of(case)]
        payload, method = self.requests.get(case.model) or (MODELS[case.model].payload(), "")
        spec = LoadSpec(
            address=server.address(case.transport),
            kind=case.kind,
            payload=payload,
            method=method or INFER_METHOD,
            concurrency=case.concurrency,
            rate=(capacity or 0.0) * case.load,
            warmup_s=self._settings.warmup_s,
            duration_s=duration_s,
        )
        if case.kind == "open" and not spec.rate:
            raise ValueError(f"{case.name}: open loop without a measured capacity")
        paused = []
        if case.target != ECHO and MODELS[case.target].isolated:
            paused = [s for s in self._servers.values() if s is not server]
        for other in paused:
            other.pause()
        try:
            with pinned(server, case.cpus):
                pool = self.pool(case.procs)
                result = pool.run(spec, server.cpu_seconds, edges=self._probe(case, server))
        finally:
            for other in paused:
                other.resume()
        figures = summarize(result)
        first, last = result.extra["edges"]
        figures["rss_start_mb"], figures["rss_end_mb"] = first["rss_mb"], last["rss_mb"]
        if case.kind == "open":
            figures["capacity"] = capacity
        if case.target != ECHO:
            figures.update(_mean_batch(case.target, first, last))
        if "extra" in first:
            figures["window_extra"] = [first["extra"], last["extra"]]
        return figures

    def _attempt_perf_analyzer(
        self, case: Case, capacity: float | None, duration_s: float
    ) -> dict[str, Any]:
        """The same case driven by perf_analyzer (one process, NVIDIA's C++ client)."""
        from bench import perf_analyzer

        if self._perf_analyzer is None:
            self._perf_analyzer = perf_analyzer.locate()
        server = self._servers[server_of(case)]
        if case.target in self.requests or case.kind == "open" and not capacity:
            why = "not a KServe v2 server" if case.target in self.requests else "no capacity"
            return perf_analyzer_figures({"failed": why, "throughput": 0.0, "wall_s": 1.0})
        load = perf_analyzer.Load(
            url=server.address(case.transport),
            model=case.model,
            kind=case.kind,
            concurrency=case.concurrency,
            rate=(capacity or 0.0) * case.load,
            duration_s=duration_s,
        )
        probe = self._probe(case, server)
        first = probe()
        try:
            with pinned(server, case.cpus):
                found = perf_analyzer.run(self._perf_analyzer, load, server.cpu_seconds)
        except RuntimeError as error:  # one failed case is a row, not a lost run
            lines = [line for line in str(error).splitlines() if line.strip()]
            failed = lines[0] + (f" {lines[-1].strip()}" if len(lines) > 1 else "")
            found = {"failed": failed, "throughput": 0.0, "wall_s": 1.0}
        last = probe()
        figures = perf_analyzer_figures(found)
        figures["rss_start_mb"], figures["rss_end_mb"] = first["rss_mb"], last["rss_mb"]
        if case.target != ECHO:
            figures.update(_mean_batch(case.target, first, last))
        return figures

    def _probe(self, case: Case, server: Server) -> Callable[[], dict[str, Any]]:
        """What is read at the window's edges: the server's RSS and the model's batches
        (edgeserve: its Prometheus batch histogram; TorchServe: the counters its bench
        handler writes)."""
        spec = None if case.target == ECHO else MODELS[case.target]
        counter = spec.counter_file(self._work) if spec and spec.on_torchserve else None
        hook = self.edge_hooks.get(case.target)

        def probe() -> dict[str, Any]:
            found: dict[str, Any] = {"rss_mb": server.rss() / 2**20}
            if hook is not None:
                found["extra"] = hook()
            if counter is not None:
                found["counters"] = read_counters(counter)
            elif spec is not None:
                found["metrics"] = metrics_batches(server)
            return found

        return probe


@contextlib.contextmanager
def pinned(server: Server, cpus: int) -> Iterator[None]:
    """Every thread of the server's processes on its first ``cpus`` CPUs (``taskset -a``)
    for the block, then back on all of them; ``cpus`` 0: nothing changes."""
    if not cpus:
        yield
        return
    every = sorted(os.sched_getaffinity(0))
    if cpus > len(every):
        raise SystemExit(f"bench: {cpus} CPUs asked for, this machine lets us use {len(every)}")
    _set_affinity(server, set(every[:cpus]))
    try:
        yield
    finally:
        _set_affinity(server, set(every))


def _set_affinity(server: Server, cpus: set[int]) -> None:
    for process in server.processes():
        for thread in Path(f"/proc/{process.pid}/task").glob("*"):
            with contextlib.suppress(OSError):  # a thread that ended meanwhile
                os.sched_setaffinity(int(thread.name), cpus)


def _mean_batch(model: str, first: dict[str, Any], last: dict[str, Any]) -> dict[str, Any]:
    """Mean rows per batch in the window: edgeserve's ``edgeserve_batch_size`` histogram
    (Prometheus), or the counters TorchServe's bench handler writes."""
    if "counters" in first:
        (b0, r0), (b1, r1) = first["counters"], last["counters"]
        batches, rows = b1 - b0, r1 - r0
        return {"mean_batch": rows / batches if batches else None, "batches": batches}
    m0, m1 = first.get("metrics"), last.get("metrics")
    if not (m0 and m1 and model in m0 and model in m1):
        return {"mean_batch": None, "batches": None}
    rows, batches = m1[model][0] - m0[model][0], m1[model][1] - m0[model][1]
    return {"mean_batch": rows / batches if batches else None, "batches": batches}


def _ms(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q) * 1e3) if values.size else None


def summarize(result: LoadResult) -> dict[str, Any]:
    """The figures of one load run (latencies in ms, rates per second)."""
    lat = result.latency_ok
    errors = {code: n for code, n in result.codes.items() if code != "OK"}
    half = result.window_s / 2
    first, second = lat[result.issued_ok < half], lat[result.issued_ok >= half]
    return {
        "throughput": result.throughput,
        "ok": result.ok,
        "offered": result.offered,
        "p50_ms": _ms(lat, 50),
        "p95_ms": _ms(lat, 95),
        "p99_ms": _ms(lat, 99),
        "mean_ms": float(lat.mean() * 1e3) if lat.size else None,
        "max_ms": float(lat.max() * 1e3) if lat.size else None,
        "p99_first_half_ms": _ms(first, 99),
        "p99_second_half_ms": _ms(second, 99),
        "errors": errors,
        "rejected": result.codes.get("RESOURCE_EXHAUSTED", 0),
        "rejected_p50_ms": _ms(result.latency_rejected, 50),
        "rejected_p99_ms": _ms(result.latency_rejected, 99),
        "lag_p99_ms": _ms(result.lag, 99),
        "shed": result.shed,
        "processes": result.processes,
        "cpu": asdict(result.cpu),
        # CPU time per served request: a cost the other tenants of the machine hardly skew.
        "server_us_per_request": _per_request(result.cpu.server, result),
        "client_us_per_request": _per_request(result.cpu.client, result),
    }


def perf_analyzer_figures(found: dict[str, Any]) -> dict[str, Any]:
    """One perf_analyzer run's figures under the keys of ``summarize`` (its CPU figures
    span the whole run: three windows plus its start-up, a few percent more)."""
    wall = found["wall_s"]
    answered = found["throughput"] * wall
    cpu = {
        "client": found.get("client_cpu_s", 0.0) / wall,
        "server": found.get("server_cpu_s", 0.0) / wall,
        "machine": found.get("busy_cpu_s", 0.0) / wall,
    }
    cpu["other"] = max(0.0, cpu["machine"] - cpu["client"] - cpu["server"])
    per_request = {
        key: (found.get(f"{key}_cpu_s", 0.0) / answered * 1e6 if answered else None)
        for key in ("server", "client")
    }
    failed = found.get("failed")
    return {
        "client": PERF_ANALYZER,
        "throughput": found["throughput"],
        "ok": round(answered),
        "offered": found["throughput"],
        **{f"p{q}_ms": found.get(f"p{q}_ms") for q in (50, 90, 95, 99)},
        "errors": {"PERF_ANALYZER_FAILED": 1} if failed else {},
        "failed": failed,
        "rejected": 0,
        "processes": 1,
        "cpu": cpu,
        "server_us_per_request": per_request["server"],
        "client_us_per_request": per_request["client"],
        "command": found.get("command"),
    }


def _per_request(cores: float, result: LoadResult) -> float | None:
    answered = sum(result.codes.values()) / result.window_s
    return cores / answered * 1e6 if answered else None
