"""ModelRecorder.totals(): the cumulative figures Triton's statistics extension reports."""

from __future__ import annotations

import pytest

from edgeserve.telemetry.recorders import MAX_BATCH_SIZES_ITEMIZED, Duration, Recorders

from .conftest import FakeClock


def test_a_fresh_recorder_has_nothing(recorders: Recorders) -> None:
    totals = recorders.for_model("m", "1").totals()
    assert totals.served == Duration(0, 0.0)
    assert totals.failed == Duration(0, 0.0)
    assert (totals.executions, totals.rows, totals.by_batch_size) == (0, 0, {})
    assert totals.last_served_at is None


def test_requests_sum_per_phase_and_failures_apart(recorders: Recorders, clock: FakeClock) -> None:
    rec = recorders.for_model("m", "1")
    rec.observe_request("OK", 0.010, 0.002, 0.006, 0.001, 0.0005)
    clock.advance(3.0)
    rec.observe_request("OK", 0.020, 0.004, 0.012, 0.002, 0.0015)
    served_at = clock.wall()
    clock.advance(5.0)
    rec.observe_request("RESOURCE_EXHAUSTED", 0.0001, None, None)
    rec.observe_request("INTERNAL", 0.003, None, None)
    totals = rec.totals()
    assert totals.served.count == 2 and totals.served.seconds == pytest.approx(0.030)
    assert totals.queue.count == 2 and totals.queue.seconds == pytest.approx(0.006)
    assert totals.compute.count == 2 and totals.compute.seconds == pytest.approx(0.018)
    assert totals.decode.count == 2 and totals.decode.seconds == pytest.approx(0.003)
    assert totals.encode.count == 2 and totals.encode.seconds == pytest.approx(0.002)
    assert totals.failed.count == 2 and totals.failed.seconds == pytest.approx(0.0031)
    # The last *served* request, on the wall clock (failures do not move it).
    assert totals.last_served_at == pytest.approx(served_at)


def test_batches_count_rows_and_each_size(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    for size, seconds in [(1, 0.001), (4, 0.003), (4, 0.005), (7, 0.004)]:
        rec.observe_batch(size, seconds)
    totals = rec.totals()
    assert (totals.executions, totals.rows) == (4, 16)
    assert sorted(totals.by_batch_size) == [1, 4, 7]
    assert totals.by_batch_size[4].count == 2
    assert totals.by_batch_size[4].seconds == pytest.approx(0.008)


def test_distinct_batch_sizes_are_bounded(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    for size in range(1, MAX_BATCH_SIZES_ITEMIZED + 50):
        rec.observe_batch(size, 0.001)
    rec.observe_batch(1, 0.001)  # a size already itemized still counts
    totals = rec.totals()
    assert len(totals.by_batch_size) == MAX_BATCH_SIZES_ITEMIZED
    assert totals.by_batch_size[1].count == 2
    assert totals.executions == MAX_BATCH_SIZES_ITEMIZED + 50
