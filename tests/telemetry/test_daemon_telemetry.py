"""Telemetry in a real daemon: records on the broker, presence (``online``, the Will), and
``edgeserve status`` with and without a broker, with the daemon up and down.

Real ``edgeserve serve`` processes (``tests/conftest.py``), a real Mosquitto, the real
SQLite buffer in the daemon's state dir. ``telemetry.interval_s`` is 0.5 s (the smallest
accepted) so records come quickly.
"""

from __future__ import annotations

import json
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from edgeserve.telemetry.buffer import read_stats
from tests import waiting
from tests.cli.support import edgeserve
from tests.conftest import DaemonFactory, RunningDaemon
from tests.mqtt_broker import Mosquitto, Observer, Received

WAIT_S = 30.0
FAST = "telemetry: {interval_s: 0.5, sample_every_s: 0.5}\n"


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path / "mosquitto")
    try:
        mosquitto.start()
        yield mosquitto
    finally:
        mosquitto.close()


def fleet_config(broker: Mosquitto, device: str, prefix: str) -> str:
    return (
        FAST + f"fleet: {{broker: 'mqtt://{broker.host}:{broker.port}', device_id: {device},"
        f" topic_prefix: {prefix}}}\n"
    )


def status(daemon: RunningDaemon) -> tuple[int, dict[str, Any]]:
    done = edgeserve("status", "--config", str(daemon.config), "--json", "--timeout", "10")
    assert done.err == "", done.err
    return done.code, json.loads(done.out)


def eventually(condition: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    return waiting.eventually(condition, what, timeout_s)


def next_matching(observer: Observer, accept: Callable[[Received], bool], what: str) -> Received:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        got = observer.get(max(0.1, deadline - time.monotonic()))
        if accept(got):
            return got
    raise AssertionError(f"timed out waiting for {what}")


def test_records_reach_the_broker_and_presence_follows_the_daemon(
    daemons: DaemonFactory, broker: Mosquitto
) -> None:
    device, prefix = "dev-t1", f"t{uuid.uuid4().hex[:6]}/v1"
    telemetry = Observer(broker, f"{prefix}/devices/{device}/telemetry")
    try:
        daemon = daemons.start(extra_config=fleet_config(broker, device, prefix))
        kinds: set[tuple[str, str]] = set()
        boot_ids = set()

        def seen_enough(got: Received) -> bool:
            message = json.loads(got.payload)
            assert message["device"] == device
            boot_ids.add(message["boot_id"])
            kinds.update((r["class"], r["kind"]) for r in message["records"])
            return {("event", "restart"), ("rollup", "system"), ("sample", "system")} <= kinds

        next_matching(telemetry, seen_enough, "restart event, rollup and sample records")
        assert ("event", "link") in kinds
        assert len(boot_ids) == 1

        presence = Observer(broker, f"{prefix}/devices/{device}/online")
        try:
            got = presence.get()  # retained: what a controller that comes later sees
            assert (got.payload, got.retain) == (b"online", True)
            code, doc = status(daemon)
            assert code == 0
            fleet = doc["fleet"]
            assert (fleet["device_id"], fleet["connected"]) == (device, True)
            assert fleet["broker"] == f"mqtt://{broker.host}:{broker.port}"
            assert doc["telemetry"]["enabled"] is True

            daemon.process.send_signal(signal.SIGKILL)  # no goodbye: the broker sends the Will
            daemon.process.wait(WAIT_S)
            will = next_matching(presence, lambda m: m.payload == b"offline", "the Will")
            assert will.topic == f"{prefix}/devices/{device}/online"
        finally:
            presence.close()
        retained = Observer(broker, f"{prefix}/devices/{device}/online")
        try:
            got = retained.get()
            assert (got.payload, got.retain) == (b"offline", True)
        finally:
            retained.close()
    finally:
        telemetry.close()


def test_a_clean_stop_says_offline_itself(daemons: DaemonFactory, broker: Mosquitto) -> None:
    device, prefix = "dev-t2", f"t{uuid.uuid4().hex[:6]}/v1"
    daemon = daemons.start(extra_config=fleet_config(broker, device, prefix))
    presence = Observer(broker, f"{prefix}/devices/{device}/online")
    try:
        assert next_matching(presence, lambda m: m.payload == b"online", "online").retain
        assert daemon.terminate() == 0
        next_matching(presence, lambda m: m.payload == b"offline", "offline on a clean stop")
    finally:
        presence.close()
    log = daemon.log()
    assert "Traceback" not in log
    assert (
        '"level":"error"' not in log and '"level":"warning","logger":"edgeserve.fleet"' not in log
    ), log


def test_without_a_broker_the_buffer_fills_and_status_shows_it(daemons: DaemonFactory) -> None:
    daemon = daemons.start(extra_config=FAST)

    def backlog() -> dict[str, Any] | None:
        code, doc = status(daemon)
        assert code == 0
        return doc if (doc["telemetry"]["backlog_rows"] or 0) > 0 else None

    doc = eventually(backlog, "a telemetry backlog in status")
    telemetry = doc["telemetry"]
    assert telemetry["db"] == str(daemon.state_dir / "telemetry.db")
    assert telemetry["backlog_bytes"] > 0
    assert telemetry["oldest_unsent_age_s"] >= 0
    assert set(telemetry["dropped"]) == {"event", "rollup", "sample"}
    assert (telemetry["last_upload"], telemetry["write_failures"]) == (None, 0)
    assert doc["fleet"]["broker"] is None and doc["fleet"]["connected"] is False

    table = edgeserve("status", "--config", str(daemon.config))
    assert "telemetry: backlog " in table.out and "oldest unsent" in table.out
    assert "mqtt: no broker configured" in table.out

    assert daemon.terminate() == 0
    rows = read_stats(daemon.state_dir / "telemetry.db")
    assert rows is not None and rows.backlog_rows >= telemetry["backlog_rows"]

    code, down = status(daemon)  # the daemon is down: read-only from the file
    assert code == 3 and down["daemon"]["up"] is False
    assert down["telemetry"]["backlog_rows"] == rows.backlog_rows
    assert down["telemetry"]["oldest_unsent_age_s"] >= telemetry["oldest_unsent_age_s"]
    assert down["fleet"]["connected"] is False
    table = edgeserve("status", "--config", str(daemon.config))
    assert table.code == 3
    assert f"telemetry: backlog {rows.backlog_rows} rows" in table.out


def test_a_broker_that_is_down_never_stops_serving(daemons: DaemonFactory, tmp_path: Path) -> None:
    broker = Mosquitto(tmp_path / "later")  # its port is chosen; it is not running yet
    device, prefix = "dev-t3", f"t{uuid.uuid4().hex[:6]}/v1"
    try:
        daemon = daemons.start(extra_config=fleet_config(broker, device, prefix))
        code, doc = status(daemon)
        assert code == 0 and doc["daemon"]["ready"] is True
        assert doc["fleet"]["connected"] is False and doc["fleet"]["last_error"]
        table = edgeserve("status", "--config", str(daemon.config))
        assert "mqtt: NOT connected to mqtt://" in table.out

        broker.start()
        telemetry = Observer(broker, f"{prefix}/devices/{device}/telemetry")
        try:
            eventually(lambda: status(daemon)[1]["fleet"]["connected"], "the link", 60.0)
            got = telemetry.get(WAIT_S)
            assert json.loads(got.payload)["device"] == device
        finally:
            telemetry.close()
        assert daemon.terminate() == 0
    finally:
        broker.close()
