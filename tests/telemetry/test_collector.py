"""``edgeserve fleet collect`` as a real process against a real Mosquitto and a real SQLite file.

Test messages are published with a plain paho client (``tests.mqtt_broker.Observer``);
the collector runs as ``python -m edgeserve fleet collect`` and is waited on through its
stderr (``collecting``) and through the records file, never with fixed sleeps.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.cli import main
from edgeserve.telemetry.collection import RecordStore
from tests.mqtt_broker import Mosquitto, Observer, free_port

PREFIX = "edgeserve/v1"
MARKER = "payload-must-never-be-logged"


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path_factory.mktemp("collector-broker"))
    try:
        mosquitto.start()
        yield mosquitto
    finally:
        mosquitto.close()


@pytest.fixture
def publisher(broker: Mosquitto) -> Iterator[Observer]:
    observer = Observer(broker, "nothing/#")
    try:
        yield observer
    finally:
        observer.close()


def batch(device: str, ids: range | list[int], kind: str = "model") -> bytes:
    records = [
        {
            "id": i,
            "class": "rollup",
            "kind": kind,
            "time": f"2024-05-01T00:00:{i % 60:02d}.000Z",
            "body": {"n": i},
        }
        for i in ids
    ]
    return json.dumps({"device": device, "boot_id": "b1", "records": records}).encode()


def topic(device: str) -> str:
    return f"{PREFIX}/devices/{device}/telemetry"


class CollectorProcess:
    """``edgeserve fleet collect`` in a subprocess, its stderr read line by line."""

    def __init__(self, broker: Mosquitto, db: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "edgeserve", "fleet", "collect"]
            + ["--broker", f"mqtt://{broker.host}:{broker.port}", "--db", str(db), *extra],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, text: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(line)
            if text in line:
                return
        raise AssertionError(f"collector never printed {text!r}; stderr so far: {self.seen}")

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout_s: float = 20.0) -> int:
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout_s)
        return code

    def stderr(self) -> str:
        self.proc.wait(20)
        while not self.lines.empty():
            self.seen.append(self.lines.get())
        return "\n".join(self.seen)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(10)
        assert self.proc.stderr is not None
        self.proc.stderr.close()


@pytest.fixture
def collectors() -> Iterator[list[CollectorProcess]]:
    started: list[CollectorProcess] = []
    try:
        yield started
    finally:
        for c in started:
            c.close()


def start(collectors: list[CollectorProcess], broker: Mosquitto, db: Path) -> CollectorProcess:
    process = CollectorProcess(broker, db)
    collectors.append(process)
    process.wait_line("collecting")
    return process


def stored(db: Path) -> list[tuple[str, int, str]]:
    store = RecordStore(db, create=False)
    try:
        return [(r.device, r.id, r.body) for d in store.devices() for r in store.records(d)]
    finally:
        store.close()


def wait_rows(db: Path, count: int, timeout_s: float = 20.0) -> list[tuple[str, int, str]]:
    deadline = time.monotonic() + timeout_s
    rows = stored(db)
    while len(rows) < count and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval of a condition wait
        rows = stored(db)
    assert len(rows) == count, f"expected {count} rows, have {len(rows)}"
    return rows


def test_each_record_is_stored_once_and_sigterm_exits_0(
    broker: Mosquitto, publisher: Observer, collectors: list[CollectorProcess], tmp_path: Path
) -> None:
    db = tmp_path / "fleet.db"
    collector = start(collectors, broker, db)
    publisher.publish(topic("dev-a"), batch("dev-a", range(1, 4)))
    publisher.publish(topic("dev-a"), batch("dev-a", range(1, 4)))  # a redelivered batch
    publisher.publish(topic("dev-a"), batch("dev-a", range(3, 6)))  # overlaps by one
    publisher.publish(topic("dev-b"), batch("dev-b", range(1, 3)))  # same ids, other device
    rows = wait_rows(db, 7)
    assert sorted((d, i) for d, i, _ in rows) == [("dev-a", i) for i in range(1, 6)] + [
        ("dev-b", 1),
        ("dev-b", 2),
    ]
    assert collector.stop(signal.SIGTERM) == 0
    assert "stopped: 7 records stored, 4 duplicates, 0 malformed" in collector.stderr()
    assert "Traceback" not in collector.stderr()


def test_records_published_while_stopped_arrive_on_restart(
    broker: Mosquitto, publisher: Observer, collectors: list[CollectorProcess], tmp_path: Path
) -> None:
    db = tmp_path / "fleet.db"
    assert start(collectors, broker, db).stop(signal.SIGINT) == 0
    publisher.publish(topic("dev-c"), batch("dev-c", range(10, 14)))  # nobody is collecting
    start(collectors, broker, db)
    assert [i for _, i, _ in wait_rows(db, 4)] == [10, 11, 12, 13]


def test_a_collector_killed_before_its_commit_gets_the_batch_again(
    broker: Mosquitto, publisher: Observer, collectors: list[CollectorProcess], tmp_path: Path
) -> None:
    db = tmp_path / "fleet.db"
    first = start(collectors, broker, db)
    blocker = sqlite3.connect(db, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # hold the write lock: the collector cannot commit
        publisher.publish(topic("dev-d"), batch("dev-d", range(1, 6)))
        first.wait_line("locked by another writer")  # received, not committed, not acked
        assert first.stop(signal.SIGKILL) == -signal.SIGKILL
        blocker.execute("ROLLBACK")
    finally:
        blocker.close()
    assert stored(db) == []
    start(collectors, broker, db)
    assert [i for _, i, _ in wait_rows(db, 5)] == [1, 2, 3, 4, 5]


def test_malformed_messages_are_skipped_counted_and_not_logged(
    broker: Mosquitto, publisher: Observer, collectors: list[CollectorProcess], tmp_path: Path
) -> None:
    db = tmp_path / "fleet.db"
    collector = start(collectors, broker, db)
    publisher.publish(topic("dev-e"), f"not json {MARKER}".encode())
    publisher.publish(topic("dev-e"), json.dumps({"device": "dev-e", "x": MARKER}).encode())
    publisher.publish(topic("dev-e"), batch("someone-else", range(1, 3)))
    bad_record = json.loads(batch("dev-e", [7]))
    bad_record["records"].append({"id": "eight", "class": "event", "body": {"s": MARKER}})
    publisher.publish(topic("dev-e"), json.dumps(bad_record).encode())
    # Nested past the parser's recursion limit: refused by depth, not a RecursionError.
    publisher.publish(topic("dev-e"), b"[" * 100_000 + b"]" * 100_000)
    publisher.publish(topic("dev-e"), batch("dev-e", range(1, 3)))
    rows = wait_rows(db, 3)
    assert sorted(i for _, i, _ in rows) == [1, 2, 7]
    assert collector.stop() == 0
    err = collector.stderr()
    assert "stopped: 3 records stored, 0 duplicates, 5 malformed messages skipped" in err
    assert MARKER not in err and "Traceback" not in err


def test_bad_broker_url_exits_2_and_unreachable_broker_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "fleet.db")
    assert main(["fleet", "collect", "--broker", "http://127.0.0.1:1883", "--db", db]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mqtt://HOST[:PORT]" in err
    assert not os.path.exists(db)
    port = free_port()  # nothing listens there
    argv = ["fleet", "collect", "--broker", f"mqtt://127.0.0.1:{port}", "--db", db]
    assert main([*argv, "--connect-timeout", "0.5"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("edgeserve: error: fleet link: not connected to 127.0.0.1:")
    assert "Traceback" not in err and "collecting" not in err
