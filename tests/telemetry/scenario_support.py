"""Helpers for the end-to-end telemetry scenarios (``test_scenarios.py``).

Everything here observes real things from the outside: ``edgeserve status --json`` and
``edgeserve fleet report --json`` run as a user runs them, the daemon's buffer file and the
collector's records file are opened read-only with ``sqlite3`` (the daemon's own writer is
never touched), the broker's socket queues are read from ``/proc/net/tcp``, and the load
is a real gRPC client in a thread. Waits are conditions with deadlines.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import textwrap
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.api.client import ClientError
from tests.cli.support import edgeserve
from tests.conftest import DaemonFactory, RunningDaemon, free_port, wait_ready
from tests.mqtt_broker import Mosquitto
from tests.telemetry.test_collector import CollectorProcess
from tests.waiting import eventually

WAIT_S = 60.0
"""Generous: two shared cores, and another engineer's benchmark may be running."""
FAST = "telemetry: {interval_s: 0.5, sample_every_s: 0.1%s}\n"


def telemetry_config(**extra: object) -> str:
    """The ``telemetry:`` section of the scenarios (0.5 s intervals, a sample per 0.1 s)."""
    more = "".join(f", {key}: {value}" for key, value in extra.items())
    return FAST % more


def fleet_config(broker: Mosquitto, device: str) -> str:
    return f"fleet: {{broker: 'mqtt://{broker.host}:{broker.port}', device_id: {device}}}\n"


def status(daemon: RunningDaemon, *, code: int = 0) -> dict[str, Any]:
    """``edgeserve status --json`` exiting with ``code``: 0 a healthy daemon, 1 a degraded
    one, 3 a stopped one (the buffer read from its file)."""
    done = edgeserve("status", "--config", str(daemon.config), "--json", "--timeout", "10")
    assert done.code == code and done.err == "", (done.code, done.err, done.out[-2000:])
    return dict(json.loads(done.out))


def report(db: Path, device: str) -> dict[str, Any]:
    """``edgeserve fleet report --json`` for one device (window: the last day)."""
    done = edgeserve("fleet", "report", "--db", str(db), "--device", device, "--json")
    assert done.code == 0, done.err
    (found,) = json.loads(done.out)["devices"]
    return dict(found)


def assert_clean_log(daemon: RunningDaemon) -> None:
    log = daemon.log()
    assert "Traceback" not in log, log[-4000:]


# -- the daemon's buffer, read-only ---------------------------------------------------------


@dataclass(frozen=True)
class BufferRow:
    id: int
    cls: str
    kind: str
    time: str
    body: str


@contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        yield conn
    finally:
        conn.close()


def buffer_rows(path: Path) -> dict[int, BufferRow]:
    """Every row of a buffer file as it is committed now."""
    with read_only(path) as conn:
        rows = conn.execute("SELECT id, class, kind, time, body FROM records ORDER BY id")
        return {r[0]: BufferRow(*r) for r in rows.fetchall()}


def buffer_top(path: Path) -> int:
    """The highest id the buffer file has issued (its AUTOINCREMENT sequence)."""
    with read_only(path) as conn:
        row = conn.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        return int(row[0]) if row else 0


def buffer_oldest(path: Path) -> int | None:
    with read_only(path) as conn:
        row = conn.execute("SELECT MIN(id) FROM records").fetchone()
        return None if row[0] is None else int(row[0])


# -- the collector's records, read-only -----------------------------------------------------


@dataclass(frozen=True)
class Collected:
    order: int
    """SQLite rowid: the order in which the collector inserted the record."""
    id: int
    cls: str
    kind: str
    time: str
    received: str
    body: str


def collected(db: Path, device: str) -> list[Collected]:
    """The device's records in arrival order."""
    if not db.exists():
        return []
    with read_only(db) as conn:
        sql = (
            "SELECT rowid, id, class, kind, time, received, body FROM records"
            " WHERE device = ? ORDER BY rowid"
        )
        return [Collected(*r) for r in conn.execute(sql, [device]).fetchall()]


def messages(records: list[Collected]) -> list[list[Collected]]:
    """Records grouped into the messages that carried them: the collector stores a message
    in one transaction with one ``received`` time, so a message is a run of consecutive
    rowids with the same ``received``."""
    out: list[list[Collected]] = []
    for record in records:
        if out and out[-1][-1].received == record.received:
            out[-1].append(record)
        else:
            out.append([record])
    return out


def start_collector(
    started: list[CollectorProcess], broker: Mosquitto, db: Path
) -> CollectorProcess:
    process = CollectorProcess(broker, db)
    started.append(process)
    process.wait_line("collecting", WAIT_S)
    return process


def stop_collector(process: CollectorProcess) -> tuple[int, int]:
    """SIGTERM; (records stored, duplicates) from its last line; it must exit 0 cleanly."""
    assert process.stop(signal.SIGTERM, WAIT_S) == 0
    err = process.stderr()
    assert "Traceback" not in err, err
    last = [line for line in err.splitlines() if line.startswith("stopped: ")][-1]
    words = last.split()
    return int(words[1]), int(words[4])


# -- load -----------------------------------------------------------------------------------


@dataclass
class Load:
    """A client thread calling the model at a steady pace until ``stop()``."""

    daemon: RunningDaemon
    model: str = "mlp"
    every_s: float = 0.01
    ok: int = 0
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Load:
        self._thread = threading.Thread(target=self._run, name="scenario-load", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        x = np.random.default_rng(1).standard_normal((2, 16)).astype(np.float32)
        with self.daemon.client() as client:
            while not self._stop.is_set():
                try:
                    client.infer(self.model, {"x": x}, timeout=30.0)
                    self.ok += 1
                except ClientError as exc:
                    self.failed.append(str(exc))
                self._stop.wait(self.every_s)  # the load's pace, not a wait for a condition

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(WAIT_S)
            assert not self._thread.is_alive(), "the load thread did not stop"

    def wait_ok(self, more: int, what: str) -> None:
        target = self.ok + more
        eventually(lambda: self.ok >= target or self.failed, what)
        assert self.failed == [], self.failed[:5]


# -- the broker's sockets -------------------------------------------------------------------


def _tcp_table() -> list[tuple[int, int, int, int]]:
    """(local port, remote port, unread bytes, inode) of each IPv4 TCP socket."""
    out = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, queues, inode = fields[1], fields[2], fields[4], int(fields[9])
        rx = int(queues.split(":")[1], 16)
        out.append((int(local.split(":")[1], 16), int(remote.split(":")[1], 16), rx, inode))
    return out


def unread_from(pid: int, broker: Mosquitto) -> int:
    """Bytes process ``pid`` sent to the broker that the broker has not read yet: the
    receive queue of the broker's end of that process's connection (``/proc/net/tcp``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    table = _tcp_table()
    ports = {
        local for local, remote, _, inode in table if inode in inodes and remote == broker.port
    }
    return sum(rx for local, remote, rx, _ in table if local == broker.port and remote in ports)


def broker_pid(broker: Mosquitto) -> int:
    """The pid of this broker's process, found by its own config file on its command line."""
    wanted = [broker.binary, "-c", str(broker.config_file)]
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")[:-1]
        except OSError:
            continue
        if [a.decode(errors="replace") for a in argv] == wanted:
            return int(entry.name)
    raise AssertionError(f"no process runs {' '.join(wanted)}")


# -- a daemon whose log lives outside its state dir -----------------------------------------


def start_daemon_with_log_elsewhere(
    factory: DaemonFactory,
    archive: Path,
    *,
    state_dir: Path,
    home: Path,
    extra_config: str,
) -> RunningDaemon:
    """``edgeserve serve`` with its state dir (model store, live set, telemetry buffer) at
    ``state_dir`` and its config and log in ``home``: a full state dir must not take the
    test's view of the log with it. Stopped at teardown with the factory's daemons."""
    run_dir = Path(tempfile.mkdtemp(prefix="es-"))
    uds = run_dir / "inference.sock"
    tcp = f"127.0.0.1:{free_port()}"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "config.yaml"
    text = factory.config_text(state_dir, run_dir, uds, tcp, textwrap.dedent(extra_config))
    config.write_text(text)
    command = [sys.executable, "-m", "edgeserve", "serve", "--config", str(config)]
    command += ["--model", str(archive)]
    log_path = home / "daemon.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with log_path.open("ab") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env)
    daemon = RunningDaemon(process, state_dir, run_dir, uds, tcp, config, log_path)
    factory.started.append(daemon)
    wait_ready(daemon)
    return daemon
