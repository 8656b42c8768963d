"""Rollups: interval deltas of the real recorders, drift sketches, system rows from the real
sampler, drained events, and rows the real buffer accepts. Time comes from ``FakeClock``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from edgeserve.telemetry.buffer import TelemetryBuffer
from edgeserve.telemetry.events import EventLog
from edgeserve.telemetry.recorders import BATCH_SIZE_BOUNDS, LATENCY_BOUNDS_S, Recorders
from edgeserve.telemetry.rollup import Rollup
from edgeserve.telemetry.rows import Row, iso_time
from edgeserve.telemetry.sampler import SystemSampler

from .conftest import FakeClock


@pytest.fixture
def events(clock: FakeClock) -> EventLog:
    return EventLog(wall_clock=clock.wall)


@pytest.fixture
def rollup(recorders: Recorders, events: EventLog, clock: FakeClock, tmp_path: Path) -> Rollup:
    return Rollup(recorders, SystemSampler(tmp_path), events, clock.wall)


def _models(rows: list[Row]) -> dict[tuple[str, str], dict]:
    return {
        (r.body["model"], r.body["version"]): dict(r.body)
        for r in rows
        if (r.cls, r.kind) == ("rollup", "model")
    }


def _bucket(seconds: float) -> int:
    return sum(bound < seconds for bound in LATENCY_BOUNDS_S)


def test_model_rows_hold_the_deltas_of_each_interval(
    recorders: Recorders, rollup: Rollup, clock: FakeClock
) -> None:
    rec = recorders.for_model("mlp", "1")
    depth = [4]
    rec.set_queue_depth_source(lambda: depth[0])
    first = [0.0012, 0.0030, 0.0030, 0.0450, 0.2]
    for total in first:
        rec.observe_request("OK", total, total / 4, total / 2)
    rec.observe_request("RESOURCE_EXHAUSTED", 0.00001, None, None)
    rec.observe_request("RESOURCE_EXHAUSTED", 0.00001, None, None)
    rec.observe_batch(3, 0.002)
    rec.observe_batch(2, 0.004)
    rows = rollup.collect(clock.wall())
    one = _models(rows)[("mlp", "1")]
    assert one["requests"] == {"OK": 5, "RESOURCE_EXHAUSTED": 2}
    assert one["interval_s"] is None  # nothing to measure the first interval from
    latency = one["latency_s"]
    assert latency["bounds"] == list(LATENCY_BOUNDS_S)
    for name in ("total", "queue", "compute"):
        assert len(latency[name]["counts"]) == len(LATENCY_BOUNDS_S) + 1
        assert sum(latency[name]["counts"]) == 5
    assert latency["total"]["sum"] == pytest.approx(sum(first))
    expected = [0] * (len(LATENCY_BOUNDS_S) + 1)
    for total in first:
        expected[_bucket(total)] += 1
    assert latency["total"]["counts"] == expected
    assert one["batch_size"]["bounds"] == list(BATCH_SIZE_BOUNDS)
    assert sum(one["batch_size"]["counts"]) == 2 and one["batch_size"]["sum"] == 5
    assert one["queue_depth"] == 4

    clock.advance(10.0)
    depth[0] = 0
    second = [0.0007, 0.0030, 9.0]
    for total in second:
        rec.observe_request("OK", total, None, total)
    rec.observe_request("INTERNAL", 0.01, None, None)
    rec.observe_batch(40, 0.5)
    two = _models(rollup.collect(clock.wall()))[("mlp", "1")]
    assert two["requests"] == {"OK": 3, "INTERNAL": 1}
    assert two["interval_s"] == pytest.approx(10.0)
    assert sum(two["latency_s"]["total"]["counts"]) == 3
    assert two["latency_s"]["total"]["sum"] == pytest.approx(sum(second))
    assert sum(two["latency_s"]["queue"]["counts"]) == 0  # no queue time given this time
    assert sum(two["latency_s"]["compute"]["counts"]) == 3
    expected = [0] * (len(LATENCY_BOUNDS_S) + 1)
    for total in second:
        expected[_bucket(total)] += 1
    assert two["latency_s"]["total"]["counts"] == expected
    assert two["batch_size"]["counts"] == [0, 0, 0, 0, 0, 0, 1, 0, 0]  # 40: (32, 64]
    assert two["queue_depth"] == 0
    # Interval deltas add up to the recorder's cumulative figures.
    cumulative = rec.snapshot()["latency_s"]["total"]["counts"]
    summed = [a + b for a, b in zip(one["latency_s"]["total"]["counts"], expected, strict=True)]
    assert summed == cumulative

    clock.advance(10.0)
    idle = _models(rollup.collect(clock.wall()))[("mlp", "1")]
    assert idle["requests"] == {}
    assert not any(idle["latency_s"]["total"]["counts"]) and idle["latency_s"]["total"]["sum"] == 0


def test_versions_that_come_go_or_are_replaced(
    recorders: Recorders, rollup: Rollup, clock: FakeClock
) -> None:
    old = recorders.for_model("mlp", "1")
    old.observe_request("OK", 0.002, None, None)
    assert set(_models(rollup.collect(clock.wall()))) == {("mlp", "1")}

    # v2 arrives; v1 serves its last requests, then is forgotten before the next collect.
    new = recorders.for_model("mlp", "2")
    for _ in range(3):
        new.observe_request("OK", 0.002, None, None)
    old.observe_request("OK", 0.002, None, None)
    old.observe_request("CANCELLED", 0.002, None, None)
    recorders.forget("mlp", "1")
    clock.advance(10.0)
    rows = _models(rollup.collect(clock.wall()))
    assert rows[("mlp", "2")]["requests"] == {"OK": 3}
    assert rows[("mlp", "1")]["requests"] == {"OK": 1, "CANCELLED": 1}  # its tail, once
    clock.advance(10.0)
    assert set(_models(rollup.collect(clock.wall()))) == {("mlp", "2")}

    # The same name and version loaded again: a fresh recorder counts from zero.
    recorders.forget("mlp", "2")
    again = recorders.for_model("mlp", "2")
    again.observe_request("OK", 0.002, None, None)
    clock.advance(10.0)
    assert _models(rollup.collect(clock.wall()))[("mlp", "2")]["requests"] == {"OK": 1}


def test_each_interval_carries_its_own_drift_sketch(
    recorders: Recorders, rollup: Rollup, clock: FakeClock
) -> None:
    rec = recorders.for_model("mlp", "1")
    rec.drift.observe_batch({"x": torch.ones(6, 16)}, {"y": torch.zeros(6, 4)})
    drift = _models(rollup.collect(clock.wall()))[("mlp", "1")]["drift"]
    assert drift["inputs"]["x"]["count"] == 6 and drift["inputs"]["x"]["mean"] == 1.0
    assert drift["outputs"]["y"]["argmax"] == {"0": 6}
    clock.advance(10.0)
    assert _models(rollup.collect(clock.wall()))[("mlp", "1")]["drift"]["inputs"] == {}


def test_system_rows_in_the_rollup_and_as_samples(rollup: Rollup, clock: FakeClock) -> None:
    samples = []
    for _ in range(3):
        clock.advance(1.0)
        samples.extend(rollup.sample(clock.wall()))
    assert [(r.cls, r.kind) for r in samples] == [("sample", "system")] * 3
    gauges = samples[-1].body
    assert samples[-1].time == iso_time(clock.wall())
    assert gauges["rss_bytes"] > 0 and gauges["disk_free_bytes"] > 0
    assert gauges["process_cpu_percent"] is not None and gauges["cpu_percent"] is not None
    assert isinstance(gauges["temperatures_celsius"], dict)
    assert gauges["gpu_memory"] == []  # torch is imported but CUDA never initialised here

    rows = rollup.collect(clock.wall())
    (system,) = [r for r in rows if (r.cls, r.kind) == ("rollup", "system")]
    body = system.body
    assert body["process"]["rss_bytes"] > 0 and body["disk"]["free_bytes"] > 0
    assert body["process"]["cpu_percent"] is not None
    assert body["interval"]["samples"] == 3
    assert body["interval"]["rss_bytes_max"] == max(r.body["rss_bytes"] for r in samples)
    assert body["interval"]["disk_free_bytes_min"] == min(
        r.body["disk_free_bytes"] for r in samples
    )
    cpus = [r.body["cpu_percent"] for r in samples]
    assert body["interval"]["cpu_percent_mean"] == pytest.approx(sum(cpus) / 3)
    assert body["interval"]["cpu_percent_max"] == max(cpus)
    # The next interval starts over.
    clock.advance(10.0)
    (system,) = [r for r in rollup.collect(clock.wall()) if r.kind == "system"]
    assert system.body["interval"]["samples"] == 0
    assert system.body["interval_s"] == pytest.approx(10.0)


def test_events_follow_the_rollup_rows(
    recorders: Recorders, rollup: Rollup, events: EventLog, clock: FakeClock
) -> None:
    recorders.for_model("mlp", "1")
    events.record("warmup_failure", model="mlp", version="1", sample=0)
    events.record("link", up=True)
    rows = rollup.collect(clock.wall())
    assert [(r.cls, r.kind) for r in rows] == [
        ("rollup", "model"),
        ("rollup", "system"),
        ("event", "warmup_failure"),
        ("event", "link"),
    ]
    assert all(r.time == iso_time(clock.wall()) for r in rows)
    assert [r.kind for r in rollup.collect(clock.wall()) if r.cls == "event"] == []


def test_every_row_goes_into_the_real_buffer(
    recorders: Recorders, rollup: Rollup, events: EventLog, clock: FakeClock, tmp_path: Path
) -> None:
    rec = recorders.for_model("mlp", "1")
    rec.observe_request("OK", 0.002, 0.001, 0.001)
    rec.drift.observe_batch({"x": torch.randn(3, 16)}, {"y": torch.randn(3, 4)})
    events.record("restart", reason="boot")
    rows = rollup.sample(clock.wall()) + rollup.collect(clock.wall())
    buffer = TelemetryBuffer(tmp_path / "telemetry.db", wall_clock=clock.wall)
    try:
        assert buffer.append(rows)
        stored = buffer.pending(1 << 20, 0)
    finally:
        buffer.close()
    assert sorted((r.cls, r.kind) for r in stored) == sorted((r.cls, r.kind) for r in rows)
    model = next(r for r in stored if r.kind == "model")
    assert json.loads(model.body)["drift"]["inputs"]["x"]["count"] == 3
