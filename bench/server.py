"""Servers under test, each in a child process: ``edgeserve serve`` and the echo server.

``start_daemon`` writes a config (Unix socket + loopback TCP, the models with their
per-model batching, a Prometheus port, the bench's public key), starts
``python -m edgeserve serve`` and times it to READY (ServerReady true over the Unix
socket, polled every 10 ms). ``Server.stop`` sends SIGTERM and waits.

``metrics_batches`` reads the mean-batch figures from the Prometheus endpoint when the
daemon serves one (``edgeserve_batch_size`` histogram); None when it does not answer.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil

from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc

_READY_POLL_S = 0.01
_BATCH_LINE = re.compile(
    r'^edgeserve_batch_size_(sum|count)\{[^}]*model="([^"]+)"[^}]*\}\s+([0-9.eE+-]+)$'
)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Server:
    """A server child process and its two addresses."""

    name: str
    process: subprocess.Popen[bytes]
    uds: str
    tcp: str
    log_path: Path
    ready_s: float = 0.0
    metrics_port: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    root_pid: int | None = None
    """The server's own process when ``process`` is a launcher (TorchServe's Python
    launcher runs its Java front end as a child); None: ``process`` is the server."""

    @property
    def pid(self) -> int:
        return self.root_pid or self.process.pid

    def address(self, transport: str) -> str:
        return self.uds if transport == "uds" else self.tcp

    def processes(self) -> list[psutil.Process]:
        """The server's process and its descendants (TorchServe: the Java front end and
        its Python workers; a multi-process front end: every process), alive now."""
        root = psutil.Process(self.pid)
        try:
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return [root]

    def rss(self) -> int:
        """Resident memory of the whole process tree, bytes."""
        return sum(_quiet(lambda p: p.memory_info().rss, p, 0) for p in self.processes())

    def cpu_seconds(self) -> float:
        """CPU (user + system) the live process tree has used so far, seconds."""
        return sum(_quiet(_cpu_of, p, 0.0) for p in self.processes())

    def pause(self) -> None:
        """SIGSTOP the server (its threads stop where they are); ``resume`` undoes it."""
        for process in self.processes():
            _quiet(psutil.Process.suspend, process, None)

    def resume(self) -> None:
        for process in self.processes():
            _quiet(psutil.Process.resume, process, None)

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait (SIGKILL after ``timeout``), remove the socket folder. A launched
        server is signalled itself first (its launcher exits when it does)."""
        if self.root_pid is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.root_pid, signal.SIGTERM)
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        run_dir = self.extra.get("run_dir")
        if run_dir is not None:
            shutil.rmtree(run_dir, ignore_errors=True)
        return int(self.process.returncode)


def _cpu_of(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def _quiet(read: Callable[[psutil.Process], Any], process: psutil.Process, default: Any) -> Any:
    """``read(process)``, or ``default`` for a process that ended meanwhile."""
    try:
        return read(process)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return default


def _wait_ready(server: Server, started: float, timeout: float) -> float:
    channel = grpc.insecure_channel(server.uds)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    deadline = started + timeout
    try:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                raise RuntimeError(
                    f"{server.name} exited with {server.process.returncode}:\n{server.log_tail()}"
                )
            try:
                if stub.ServerReady(pb.ServerReadyRequest(), timeout=0.5).ready:
                    return time.monotonic() - started
            except grpc.RpcError:
                pass
            time.sleep(_READY_POLL_S)
    finally:
        channel.close()
    server.stop()
    raise RuntimeError(f"{server.name} not ready after {timeout:.0f}s:\n{server.log_tail()}")


def start_echo(work: Path, timeout: float = 60.0) -> Server:
    """Start the echo server (bench/echo.py) on its own Unix socket and a free port."""
    run_dir = Path(tempfile.mkdtemp(prefix="esb-"))
    uds = f"unix://{run_dir / 'inference.sock'}"
    tcp = f"127.0.0.1:{free_port()}"
    log_path = work / "echo.log"
    command = [sys.executable, "-m", "bench.echo", "--listen", uds, "--listen", tcp]
    started = time.monotonic()
    with log_path.open("ab") as sink:
        process = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
            command, stdout=sink, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
    server = Server("echo", process, uds, tcp, log_path)
    server.extra["run_dir"] = run_dir
    server.ready_s = _wait_ready(server, started, timeout)
    return server


@dataclass(frozen=True)
class DaemonSetup:
    """What the daemon serves and how."""

    models: list[tuple[Path, dict[str, Any]]]
    """(archive, per-model batching overrides); the first is the default of its name."""
    public_key: Path
    threads: int | None
    """intra_op_threads in the config; None leaves it to edgeserve (measured at load)."""
    instances: int = 1
    max_queue_size: int = 256
    metrics: bool = True
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment of the daemon process (``--daemon-env``, e.g. OMP_WAIT_POLICY)."""
    telemetry: dict[str, Any] | None = None
    """The config's ``telemetry`` section; None keeps edgeserve's defaults."""
    fleet: dict[str, Any] | None = None
    """The config's ``fleet`` section (broker, device_id); None: no broker."""


QUIET_WINDOW_S = 0.5


def wait_quiet(max_cores: float, timeout_s: float) -> tuple[float, float]:
    """Wait until the whole machine uses at most ``max_cores`` over a ``QUIET_WINDOW_S``
    window, or ``timeout_s`` has passed: (seconds waited, cores in the last window).

    The daemon times each model's intra-op thread counts while it loads
    (``serving.thread_budget``), once: work still running from what the bench did just
    before (another server's start or warm-up, another session's tests) would decide
    that for edgeserve by chance."""
    started = time.monotonic()
    cpus = psutil.cpu_count() or 1
    while True:
        busy = psutil.cpu_percent(interval=QUIET_WINDOW_S) / 100 * cpus
        waited = time.monotonic() - started
        if busy <= max_cores or waited >= timeout_s:
            return waited, busy


def _config_text(
    setup: DaemonSetup, state: Path, run_dir: Path, listen: tuple[str, str], port: int | None
) -> str:
    uds, tcp = listen
    models = ""
    for archive, batching in setup.models:
        models += f"  - archive: {archive}\n    default: true\n"
        if batching:
            inner = ", ".join(f"{k}: {v}" for k, v in batching.items())
            models += f"    batching: {{{inner}}}\n"
    telemetry = ""
    if setup.telemetry is not None:
        inner = ", ".join(f"{k}: {json.dumps(v)}" for k, v in setup.telemetry.items())
        telemetry = f"telemetry: {{{inner}}}\n"
    if setup.fleet is not None:
        inner = ", ".join(f"{k}: {json.dumps(v)}" for k, v in setup.fleet.items())
        telemetry += f"fleet: {{{inner}}}\n"
    metrics = ""
    if port is not None:
        metrics = f"metrics:\n  prometheus_listen: 127.0.0.1:{port}\n"
    return (
        textwrap.dedent(f"""\
        state_dir: {state}
        run_dir: {run_dir}
        server:
          listen: ["{uds}", "{tcp}"]
          grace_period_s: 5
        management:
          listen: "unix://{run_dir / "management.sock"}"
        trust:
          keys: ["{setup.public_key}"]
        logging:
          level: warning
          format: text
        batching:
          instances: {setup.instances}
          max_queue_size: {setup.max_queue_size}
        """)
        + (f"  intra_op_threads: {setup.threads}\n" if setup.threads is not None else "")
        + metrics
        + telemetry
        + "models:\n"
        + models
    )


def start_daemon(work: Path, name: str, setup: DaemonSetup, timeout: float = 180.0) -> Server:
    """Start ``edgeserve serve`` on a fresh state dir; returns once it is READY."""
    state = work / f"state-{name}"
    run_dir = Path(tempfile.mkdtemp(prefix="esb-"))  # short: sun_path is 108 bytes
    uds = f"unix://{run_dir / 'inference.sock'}"
    tcp = f"127.0.0.1:{free_port()}"
    port = free_port() if setup.metrics else None
    state.mkdir(parents=True, exist_ok=True)
    config = state / "config.yaml"
    config.write_text(_config_text(setup, state, run_dir, (uds, tcp), port))
    log_path = work / f"{name}.log"
    command = [sys.executable, "-m", "edgeserve", "serve", "--config", str(config)]
    started = time.monotonic()
    with log_path.open("ab") as sink:
        process = subprocess.Popen(  # noqa: S603 - our interpreter, our arguments
            command, stdout=sink, stderr=subprocess.STDOUT, env={**os.environ, **setup.env}
        )
    server = Server(name, process, uds, tcp, log_path, metrics_port=port)
    server.extra["run_dir"] = run_dir
    server.ready_s = _wait_ready(server, started, timeout)
    return server


def metrics_batches(server: Server) -> dict[str, tuple[float, float]] | None:
    """model -> (sum of batch sizes, number of batches) from the Prometheus endpoint;
    None when the daemon has no endpoint answering or exposes no batch histogram."""
    if server.metrics_port is None:
        return None
    url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    try:
        with urllib.request.urlopen(url, timeout=2.0) as reply:  # noqa: S310 - loopback http
            text = reply.read().decode("utf-8", "replace")
    except (urllib.error.URLError, OSError):
        return None
    found: dict[str, list[float]] = {}
    for line in text.splitlines():
        match = _BATCH_LINE.match(line)
        if match:
            kind, model, value = match.groups()
            found.setdefault(model, [0.0, 0.0])[0 if kind == "sum" else 1] += float(value)
    return {model: (v[0], v[1]) for model, v in found.items()} or None
