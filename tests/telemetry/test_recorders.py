"""Recorders: fixed buckets, windowed quantiles against numpy, expiry, codes, threads."""

from __future__ import annotations

import json
import logging
import threading

import numpy as np
import pytest

from edgeserve.telemetry.recorders import (
    BATCH_SIZE_BOUNDS,
    LATENCY_BOUNDS_S,
    Recorders,
    quantile,
)

from .conftest import FakeClock


def _bucket_of(value: float) -> int:
    return int(np.searchsorted(LATENCY_BOUNDS_S, value, side="left"))


def _edges(bucket: int) -> tuple[float, float]:
    lower = LATENCY_BOUNDS_S[bucket - 1] if bucket else 0.0
    upper = LATENCY_BOUNDS_S[bucket] if bucket < len(LATENCY_BOUNDS_S) else float("inf")
    return lower, upper


def test_latency_bounds_are_log_spaced_from_100us_to_10s() -> None:
    bounds = np.array(LATENCY_BOUNDS_S)
    assert bounds[0] == pytest.approx(1e-4) and bounds[-1] == pytest.approx(10.0)
    assert 18 <= len(bounds) <= 24
    ratios = bounds[1:] / bounds[:-1]
    assert np.all(ratios > 1.5) and np.all(ratios < 2.0)


def test_bucket_boundaries_follow_le(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    edge = LATENCY_BOUNDS_S[5]
    for value in (0.0, edge, np.nextafter(edge, 1.0), 10.0, 11.0):
        rec.observe_request("OK", float(value), float(value), None)
    total = rec.snapshot()["latency_s"]["total"]
    counts = total["counts"]
    assert len(counts) == len(LATENCY_BOUNDS_S) + 1
    assert counts[0] == 1  # 0 s
    assert counts[5] == 1  # exactly on a bound: that bound's bucket
    assert counts[6] == 1  # just above it: the next one
    assert counts[len(LATENCY_BOUNDS_S) - 1] == 1  # 10 s
    assert counts[-1] == 1  # above 10 s: +Inf
    assert total["count"] == 5 and total["sum"] == pytest.approx(sum((0, edge, edge, 10, 11)))


def test_batch_size_buckets(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    for size in (1, 2, 3, 8, 9, 128, 129, 500):
        rec.observe_batch(size, 0.001)
    hist = rec.snapshot()["batch_size"]
    assert hist["bounds"] == list(BATCH_SIZE_BOUNDS)
    # buckets: <=1 <=2 <=4 <=8 <=16 <=32 <=64 <=128 +Inf
    assert hist["counts"] == [1, 1, 1, 1, 1, 0, 0, 1, 2]
    assert hist["sum"] == 1 + 2 + 3 + 8 + 9 + 128 + 129 + 500
    assert rec.snapshot()["batch_compute_s"]["count"] == 8


def test_cumulative_histograms_match_numpy(recorders: Recorders) -> None:
    rng = np.random.default_rng(7)
    total = rng.lognormal(mean=np.log(0.004), sigma=1.2, size=5000)
    queue = total * rng.uniform(0, 0.5, size=total.size)
    compute = total - queue
    rec = recorders.for_model("m", "1")
    for t, q, c in zip(total, queue, compute, strict=True):
        rec.observe_request("OK", float(t), float(q), float(c))
    latency = rec.snapshot()["latency_s"]
    for name, data in (("total", total), ("queue", queue), ("compute", compute)):
        expected = np.bincount(
            np.searchsorted(LATENCY_BOUNDS_S, data, side="left"),
            minlength=len(LATENCY_BOUNDS_S) + 1,
        )
        assert latency[name]["counts"] == expected.tolist(), name
        assert latency[name]["sum"] == pytest.approx(float(data.sum()))


def _assert_within_bucket_resolution(data: np.ndarray, q: float, estimate: float) -> None:
    """The estimate lies in the bucket(s) holding numpy's percentile (its two neighbours)."""
    low = _edges(_bucket_of(np.percentile(data, q * 100, method="lower")))[0]
    high = _edges(_bucket_of(np.percentile(data, q * 100, method="higher")))[1]
    assert low <= estimate <= high, (q, estimate, np.percentile(data, q * 100))


@pytest.mark.parametrize("sigma", [0.3, 0.9, 2.0])
def test_window_p50_p99_against_numpy(recorders: Recorders, clock: FakeClock, sigma: float) -> None:
    rng = np.random.default_rng(11)
    data = rng.lognormal(mean=np.log(0.002), sigma=sigma, size=3000)
    rec = recorders.for_model("m", "1")
    for i, value in enumerate(data):
        clock.advance(50.0 / data.size)  # spread over several 10-second slots
        rec.observe_request("OK", float(value), None, None)
        if i == 1000:
            rec.observe_request("INTERNAL", 99.0, None, None)  # errors stay out of latency
    window = rec.snapshot()["window"]
    _assert_within_bucket_resolution(data, 0.50, window["p50_s"])
    _assert_within_bucket_resolution(data, 0.99, window["p99_s"])
    assert window["requests"] == data.size + 1
    assert window["errors"] == {"INTERNAL": 1}
    counts = rec.snapshot()["latency_s"]["total"]["counts"]
    for q in (0.1, 0.9, 0.999):
        estimate = quantile(LATENCY_BOUNDS_S, counts, q)
        assert estimate is not None
        _assert_within_bucket_resolution(data, q, estimate)


def test_quantile_interpolates_inside_the_bucket() -> None:
    bounds = (1.0, 2.0, 4.0)
    assert quantile(bounds, [0, 0, 0, 0], 0.5) is None
    assert quantile(bounds, [0, 10, 0, 0], 0.5) == pytest.approx(1.5)
    assert quantile(bounds, [10, 0, 10, 0], 0.75) == pytest.approx(3.0)
    assert quantile(bounds, [0, 0, 0, 5], 0.99) == 4.0  # +Inf: the highest finite bound


def test_window_expires_slot_by_slot(recorders: Recorders, clock: FakeClock) -> None:
    clock.now = 10_000.0  # a slot boundary
    rec = recorders.for_model("m", "1")
    for _ in range(30):
        rec.observe_request("OK", 0.001, None, None)
    clock.advance(25.0)
    for _ in range(10):
        rec.observe_request("RESOURCE_EXHAUSTED", 0.0001, None, None)
    window = rec.snapshot()["window"]
    assert window["requests"] == 40
    assert window["requests_per_s"] == pytest.approx(40 / 25.0)  # recorder is 25 s old
    assert window["errors"] == {"RESOURCE_EXHAUSTED": 10}
    clock.advance(40.0)  # t=65: the first slot [0, 10) left the window [10, 70)
    window = rec.snapshot()["window"]
    assert window["requests"] == 10 and window["p50_s"] is None
    assert window["seconds"] == pytest.approx(55.0)
    clock.advance(60.0)
    window = rec.snapshot()["window"]
    assert window["requests"] == 0 and window["errors"] == {} and window["requests_per_s"] == 0
    # cumulative figures never expire
    assert rec.snapshot()["requests"] == {"OK": 30, "RESOURCE_EXHAUSTED": 10}


def test_a_reused_slot_starts_from_zero(recorders: Recorders, clock: FakeClock) -> None:
    clock.now = 20_000.0
    rec = recorders.for_model("m", "1")
    rec.observe_request("OK", 5.0, None, None)
    clock.advance(60.0)  # same ring position, next lap
    rec.observe_request("OK", 0.0002, None, None)
    window = rec.snapshot()["window"]
    assert window["requests"] == 1
    assert LATENCY_BOUNDS_S[1] < window["p99_s"] <= LATENCY_BOUNDS_S[2]


def test_status_codes_counted_and_only_ok_timed(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    codes = {"OK": 5, "INVALID_ARGUMENT": 2, "RESOURCE_EXHAUSTED": 3, "DEADLINE_EXCEEDED": 1}
    for code, n in codes.items():
        for _ in range(n):
            rec.observe_request(code, 0.01, 0.004, 0.006 if code == "OK" else None)
    snap = rec.snapshot()
    assert snap["requests"] == codes
    assert snap["latency_s"]["total"]["count"] == 5
    assert snap["latency_s"]["queue"]["count"] == 5
    assert snap["latency_s"]["compute"]["count"] == 5
    assert snap["window"]["errors"] == {k: v for k, v in codes.items() if k != "OK"}


def test_ok_without_queue_or_compute_times(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    rec.observe_request("OK", 0.01, None, None)
    latency = rec.snapshot()["latency_s"]
    assert latency["total"]["count"] == 1
    assert latency["queue"]["count"] == 0 and latency["compute"]["count"] == 0


def test_threads_hammering_keep_exact_totals(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    threads, per_thread = 4, 20_000
    start = threading.Barrier(threads)

    def hammer(index: int) -> None:
        start.wait()
        code = "OK" if index % 2 == 0 else "UNAVAILABLE"
        for _ in range(per_thread):
            rec.observe_request(code, 0.002, 0.001, 0.001)
            rec.observe_batch(4, 0.001)

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    snap = rec.snapshot()
    half = threads // 2 * per_thread
    assert snap["requests"] == {"OK": half, "UNAVAILABLE": half}
    assert snap["latency_s"]["total"]["count"] == half
    assert sum(snap["latency_s"]["total"]["counts"]) == half
    assert snap["batch_size"]["count"] == threads * per_thread
    assert snap["batch_size"]["sum"] == 4 * threads * per_thread
    assert snap["window"]["requests"] == threads * per_thread


def test_queue_depth_load_and_warmup(recorders: Recorders, clock: FakeClock) -> None:
    rec = recorders.for_model("m", "1")
    assert rec.snapshot()["queue_depth"] is None
    depth = [3]
    rec.set_queue_depth_source(lambda: depth[0])
    assert rec.snapshot()["queue_depth"] == 3
    depth[0] = 7
    assert rec.snapshot()["queue_depth"] == 7
    rec.observe_load(2.5)
    rec.observe_warmup_failure()
    rec.observe_warmup_failure()
    snap = rec.snapshot()
    assert snap["load_s"] == 2.5 and snap["last_load_at"] == clock.wall()
    assert snap["warmup_failures"] == 2


def test_a_failing_queue_depth_source_does_not_break_snapshot(
    recorders: Recorders, caplog: pytest.LogCaptureFixture
) -> None:
    rec = recorders.for_model("m", "1")

    def gone() -> int:
        raise RuntimeError("batcher closed")

    rec.set_queue_depth_source(gone)
    with caplog.at_level(logging.WARNING, logger="edgeserve.telemetry"):
        assert rec.snapshot()["queue_depth"] is None
    assert "model m version 1" in caplog.text


def test_for_model_caches_and_forget_drops(recorders: Recorders) -> None:
    a1 = recorders.for_model("a", "1")
    assert recorders.for_model("a", "1") is a1
    a1.observe_request("OK", 0.001, None, None)
    recorders.for_model("a", "2").observe_request("NOT_FOUND", 0.001, None, None)
    snap = recorders.snapshot()
    assert [(m["model"], m["version"]) for m in snap["models"]] == [("a", "1"), ("a", "2")]
    assert snap["window_s"] == 60.0
    recorders.forget("a", "1")
    recorders.forget("a", "9")  # unknown: ignored
    assert [m["version"] for m in recorders.snapshot()["models"]] == ["2"]
    fresh = recorders.for_model("a", "1")
    assert fresh is not a1 and fresh.snapshot()["requests"] == {}


def test_snapshot_is_plain_json(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    rec.observe_request("OK", 0.003, 0.001, 0.002)
    rec.observe_batch(2, 0.002)
    rec.observe_load(1.0)
    rec.set_queue_depth_source(lambda: 0)
    snap = recorders.snapshot()
    assert json.loads(json.dumps(snap)) == snap
