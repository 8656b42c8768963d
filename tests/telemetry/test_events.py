"""The event log: rows of class ``event``, bounded, an overflow reported as one drop event."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import pytest

from edgeserve.telemetry.buffer import TelemetryBuffer
from edgeserve.telemetry.events import EventLog
from edgeserve.telemetry.rows import iso_time

from .conftest import FakeClock

ISO_MS_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def test_iso_time_is_utc_with_milliseconds_and_z() -> None:
    assert iso_time(0.0) == "1970-01-01T00:00:00.000Z"
    assert iso_time(1_700_000_000.1234) == "2023-11-14T22:13:20.123Z"


def test_recorded_events_drain_in_order_as_event_rows(clock: FakeClock) -> None:
    events = EventLog(wall_clock=clock.wall)
    events.record("deployment", model="mlp", version="2", step="warm", ok=True)
    clock.advance(0.25)
    events.record("error", code="INTERNAL", correlation_id="3f2a9c0d11e4")
    assert len(events) == 2
    rows = events.drain()
    assert [(r.cls, r.kind) for r in rows] == [("event", "deployment"), ("event", "error")]
    assert rows[0].body == {"model": "mlp", "version": "2", "step": "warm", "ok": True}
    assert rows[0].time == iso_time(clock.wall() - 0.25)
    assert rows[1].time == iso_time(clock.wall())
    assert all(r.time is not None and ISO_MS_Z.match(r.time) for r in rows)
    assert events.drain() == [] and len(events) == 0


def test_overflow_keeps_the_oldest_and_reports_one_drop_event(clock: FakeClock) -> None:
    events = EventLog(max_pending=3, wall_clock=clock.wall)
    kinds = ["link", "link", "error", "restart", "error", "link", "error"]
    for index, kind in enumerate(kinds):
        events.record(kind, n=index)
        clock.advance(1.0)
    rows = events.drain()
    assert [r.body.get("n") for r in rows[:3]] == [0, 1, 2]
    drop = rows[3]
    assert len(rows) == 4 and (drop.cls, drop.kind) == ("event", "drop")
    assert drop.body == {
        "class": "event",
        "where": "memory",
        "count": 4,
        "kinds": {"error": 2, "link": 1, "restart": 1},
        "first_time": iso_time(1_700_000_000.0 + 1_003.0),
        "last_time": iso_time(1_700_000_000.0 + 1_006.0),
    }
    # The loss is told once; the log has room again.
    events.record("link", up=True)
    assert [(r.kind, r.body) for r in events.drain()] == [("link", {"up": True})]


def test_bodies_stay_json_and_never_carry_an_objects_text(clock: FakeClock) -> None:
    class Secret:
        def __str__(self) -> str:
            return "payload-bytes"

        __repr__ = __str__

    events = EventLog(wall_clock=clock.wall)
    events.record("error", code="INTERNAL", detail=Secret(), raw=b"\x00\x01", n=3)
    (row,) = events.drain()
    assert row.body == {"code": "INTERNAL", "detail": "<Secret>", "raw": "<bytes>", "n": 3}
    assert "payload" not in json.dumps(row.body)


def test_record_never_raises_even_when_the_clock_does() -> None:
    def broken() -> float:
        raise OSError("no clock")

    events = EventLog(wall_clock=broken)
    events.record("restart", reason="boot")  # logged, not raised
    assert events.drain() == []


def test_concurrent_records_are_all_kept_or_counted(clock: FakeClock) -> None:
    events = EventLog(max_pending=500, wall_clock=clock.wall)
    start = threading.Barrier(4)

    def spam(kind: str) -> None:
        start.wait()
        for i in range(300):
            events.record(kind, i=i)

    threads = [threading.Thread(target=spam, args=(f"k{t}",)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    rows = events.drain()
    kept = [r for r in rows if r.kind != "drop"]
    (drop,) = [r for r in rows if r.kind == "drop"]
    assert len(kept) == 500
    assert len(kept) + drop.body["count"] == 1200
    for kind in ("k0", "k1", "k2", "k3"):
        assert sum(r.kind == kind for r in kept) + drop.body["kinds"].get(kind, 0) == 300


def test_max_pending_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        EventLog(max_pending=0)


def test_drained_rows_go_into_the_real_buffer(tmp_path: Path, clock: FakeClock) -> None:
    events = EventLog(max_pending=1, wall_clock=clock.wall)
    events.record("buffer_reset", reason="corrupt")
    events.record("link", up=False)
    buffer = TelemetryBuffer(tmp_path / "telemetry.db", wall_clock=clock.wall)
    try:
        assert buffer.append(events.drain())
        stored = buffer.pending(1 << 20, 0)
    finally:
        buffer.close()
    assert [(r.cls, r.kind) for r in stored] == [("event", "buffer_reset"), ("event", "drop")]
    assert stored[0].time == iso_time(clock.wall())
    assert json.loads(stored[1].body)["kinds"] == {"link": 1}
