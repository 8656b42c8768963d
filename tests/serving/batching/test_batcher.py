"""The batcher over real instance threads: formation, routing, deadlines, cancellation,
backpressure, shapes, failure isolation, instances, close."""

from __future__ import annotations

import asyncio
import gc
import logging
import random
import threading
import time
import weakref

import pytest
import torch

from edgeserve.errors import (
    ConfigError,
    Expired,
    HandlerFailed,
    InvalidArgument,
    NotReady,
    Overloaded,
)
from edgeserve.serving.batch_policy import ArrivalRate, ServiceTimeFit
from edgeserve.serving.batching import AdaptiveBatcher
from edgeserve.serving.worker import InstanceWorker
from edgeserve.types import BatchingSettings, BytesTensor, InferRequest

from .conftest import Recorder, request, run, serving, until


async def occupy(batcher: AdaptiveBatcher, recorder: Recorder, marker: float = -1.0):
    """Hold the only instance with one running batch; returns its task."""
    recorder.hold()
    calls = recorder.calls
    task = asyncio.ensure_future(batcher.submit(request(marker)))
    await until(lambda: recorder.calls > calls)
    return task


def test_a_lone_request_runs_at_once_and_comes_back():
    async def main():
        recorder = Recorder()
        async with serving(recorder) as batcher:
            result = await batcher.submit(request(3.0))
        assert torch.equal(result.outputs["y"], torch.full((1, 4), 6.0))
        assert (result.model, result.version, result.request_id) == ("m", "1", "r3.0")
        assert recorder.sizes == [1]
        assert result.timings["queue_s"] >= 0.0 and result.timings["compute_s"] > 0.0

    run(main())


def test_concurrent_requests_share_a_batch_behind_a_slow_one():
    observed: list[tuple[int, float]] = []

    async def main():
        recorder = Recorder()
        async with serving(recorder, on_batch=lambda n, s: observed.append((n, s))) as batcher:
            first = await occupy(batcher, recorder, marker=0.0)
            rest = [asyncio.ensure_future(batcher.submit(request(float(i)))) for i in range(1, 6)]
            await until(lambda: batcher.queue_depth == 5)
            recorder.release()
            results = await asyncio.gather(first, *rest)
            assert batcher.queue_depth == 0
        assert recorder.sizes == [1, 5] and len(results) == 6
        assert [n for n, _ in observed] == [1, 5] and all(s > 0 for _, s in observed)

    run(main())


def test_a_failing_batch_observer_does_not_fail_requests(caplog):
    def broken(rows, seconds):
        raise RuntimeError("recorder bug")

    async def main():
        async with serving(Recorder(), on_batch=broken) as batcher:
            return await batcher.submit(request(2.0))

    with caplog.at_level(logging.ERROR, logger="edgeserve.serving"):
        result = run(main())
    assert torch.equal(result.outputs["y"], torch.full((1, 4), 4.0))
    assert any("batch observer failed" in r.getMessage() for r in caplog.records)


def test_each_caller_gets_its_own_rows_back():
    async def main():
        recorder = Recorder()
        async with serving(recorder) as batcher:
            first = await occupy(batcher, recorder)
            rows = {float(i): 1 + i % 3 for i in range(1, 9)}
            tasks = {
                m: asyncio.ensure_future(batcher.submit(request(m, rows=n)))
                for m, n in rows.items()
            }
            await until(lambda: batcher.queue_depth == len(rows))
            recorder.release()
            await first
            results = {m: await t for m, t in tasks.items()}
        assert recorder.sizes == [1, sum(rows.values())]
        for marker, result in results.items():
            assert torch.equal(result.outputs["y"], torch.full((rows[marker], 4), 2 * marker))

    run(main())


def test_a_request_expires_while_the_only_instance_is_busy_and_never_runs():
    async def main():
        recorder = Recorder()
        async with serving(recorder) as batcher:
            first = await occupy(batcher, recorder)
            started = time.monotonic()
            late = asyncio.ensure_future(batcher.submit(request(7.0, deadline=started + 0.05)))
            with pytest.raises(Expired):
                await late  # fails at its deadline, while the slow batch still holds the instance
            assert time.monotonic() - started < 2.0
            assert recorder.calls == 1
            assert batcher.queue_depth == 0
            recorder.release()
            await first
        assert 7.0 not in recorder.markers

    run(main())


def test_an_earlier_deadline_queued_behind_a_later_one_expires_on_time():
    async def main():
        recorder = Recorder()
        async with serving(recorder) as batcher:
            first = await occupy(batcher, recorder)
            started = time.monotonic()
            patient = asyncio.ensure_future(batcher.submit(request(3.0, deadline=started + 60)))
            hasty = asyncio.ensure_future(batcher.submit(request(4.0, deadline=started + 0.05)))
            with pytest.raises(Expired):
                await hasty
            assert time.monotonic() - started < 2.0
            assert batcher.queue_depth == 1 and not patient.done()
            recorder.release()
            await first
            await patient
        assert 3.0 in recorder.markers and 4.0 not in recorder.markers

    run(main())


def test_finished_requests_with_far_deadlines_leave_nothing_behind():
    """A request that ran is not held until its deadline (its inputs are freed at once)."""

    async def main():
        async with serving(Recorder()) as batcher:
            freed = []
            for i in range(300):
                sent = request(float(i), deadline=time.monotonic() + 3600)
                freed.append(weakref.ref(sent.inputs["x"]))
                await batcher.submit(sent)
                del sent
            gc.collect()  # the test's own frames only: nothing here is cyclic
            assert sum(ref() is not None for ref in freed) <= 1

    run(main())


def test_a_request_already_past_its_deadline_never_runs():
    async def main():
        recorder = Recorder()
        async with serving(recorder) as batcher:
            with pytest.raises(Expired):
                await batcher.submit(request(5.0, deadline=time.monotonic() - 1.0))
            ok = await batcher.submit(request(6.0, deadline=time.monotonic() + 60.0))
        assert torch.equal(ok.outputs["y"], torch.full((1, 4), 12.0))
        assert recorder.markers == [6.0]

    run(main())


def test_a_cancelled_caller_leaves_the_queue_and_never_runs():
    async def main():
        recorder = Recorder()
        async with serving(recorder) as batcher:
            first = await occupy(batcher, recorder)
            gone = asyncio.ensure_future(batcher.submit(request(9.0)))
            kept = asyncio.ensure_future(batcher.submit(request(10.0)))
            await until(lambda: batcher.queue_depth == 2)
            gone.cancel()
            with pytest.raises(asyncio.CancelledError):
                await gone
            assert batcher.queue_depth == 1
            recorder.release()
            await first
            await kept
        assert 9.0 not in recorder.markers and 10.0 in recorder.markers

    run(main())


def test_many_cancelled_callers_do_not_pile_up():
    async def main():
        recorder = Recorder()
        async with serving(recorder, max_queue_size=8) as batcher:
            first = await occupy(batcher, recorder)
            for i in range(200):  # far more than the queue holds, one at a time
                task = asyncio.ensure_future(batcher.submit(request(100.0 + i)))
                await until(lambda: batcher.queue_depth == 1)
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert batcher.queue_depth == 0
            last = asyncio.ensure_future(batcher.submit(request(1.0)))
            recorder.release()
            await first
            await last
        assert recorder.markers == [-1.0, 1.0]

    run(main())


def test_a_full_queue_refuses_at_once_and_does_no_work():
    async def main():
        recorder = Recorder()
        async with serving(recorder, max_queue_size=2) as batcher:
            first = await occupy(batcher, recorder)
            queued = [asyncio.ensure_future(batcher.submit(request(m))) for m in (1.0, 2.0)]
            await until(lambda: batcher.queue_depth == 2)
            with pytest.raises(Overloaded, match="queue is full"):
                await batcher.submit(request(3.0))
            recorder.release()
            await asyncio.gather(first, *queued)
        assert 3.0 not in recorder.markers

    run(main())


def test_different_shapes_are_batched_separately():
    async def main():
        recorder = Recorder()
        async with serving(recorder) as batcher:
            first = await occupy(batcher, recorder)
            narrow = [asyncio.ensure_future(batcher.submit(request(m, width=4))) for m in (1, 2, 3)]
            wide = [asyncio.ensure_future(batcher.submit(request(m, width=8))) for m in (4, 5)]
            await until(lambda: batcher.queue_depth == 5)
            recorder.release()
            await first
            narrow_results = await asyncio.gather(*narrow)
            wide_results = await asyncio.gather(*wide)
        assert sorted(recorder.shapes[1:]) == [(2, 8), (3, 4)]
        assert [tuple(r.outputs["y"].shape) for r in narrow_results] == [(1, 4)] * 3
        assert [tuple(r.outputs["y"].shape) for r in wide_results] == [(1, 8)] * 2

    run(main())


def raise_on_wide(inputs):
    x = inputs["x"]
    if x.shape[1] == 8:
        raise ZeroDivisionError("model blew up")
    if x.shape[1] == 6:
        raise InvalidArgument.for_input("m", "x", "six is not allowed")
    return {"y": x * 2}


def test_a_failing_batch_fails_only_its_own_requests(caplog):
    async def main():
        recorder = Recorder(raise_on_wide)
        async with serving(recorder) as batcher:
            first = await occupy(batcher, recorder)
            bad = [asyncio.ensure_future(batcher.submit(request(m, width=8))) for m in (1, 2)]
            good = [asyncio.ensure_future(batcher.submit(request(m, width=4))) for m in (3, 4)]
            await until(lambda: batcher.queue_depth == 4)
            recorder.release()
            await first
            errors = await asyncio.gather(*bad, return_exceptions=True)
            results = await asyncio.gather(*good)
            with pytest.raises(InvalidArgument, match="six"):
                await batcher.submit(request(5.0, width=6))
            ok = await batcher.submit(request(6.0, width=4))
        return errors, results, ok

    with caplog.at_level(logging.ERROR, logger="edgeserve.serving"):
        errors, results, ok = run(main())
    assert all(isinstance(e, HandlerFailed) for e in errors)
    assert all(isinstance(e.__cause__, ZeroDivisionError) for e in errors)
    assert errors[0].correlation_id == errors[1].correlation_id
    assert "model blew up" not in str(errors[0])
    logged = [r for r in caplog.records if errors[0].correlation_id in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert [float(r.outputs["y"][0, 0]) for r in results] == [6.0, 8.0]
    assert torch.equal(ok.outputs["y"], torch.full((1, 4), 12.0))


def test_a_request_larger_than_the_batch_limit_runs_alone_and_whole():
    async def main():
        recorder = Recorder()
        async with serving(recorder, max_batch_size=4) as batcher:
            first = await occupy(batcher, recorder)
            big = asyncio.ensure_future(batcher.submit(request(1.0, rows=6)))
            small = [asyncio.ensure_future(batcher.submit(request(m))) for m in (2.0, 3.0)]
            await until(lambda: batcher.queue_depth == 3)
            recorder.release()
            await first
            result = await big
            await asyncio.gather(*small)
        assert recorder.sizes == [1, 6, 2]
        assert tuple(result.outputs["y"].shape) == (6, 4)

    run(main())


def test_batches_are_cut_at_the_limit():
    async def main():
        recorder = Recorder()
        async with serving(recorder, max_batch_size=4) as batcher:
            first = await occupy(batcher, recorder)
            tasks = [asyncio.ensure_future(batcher.submit(request(float(m)))) for m in range(10)]
            await until(lambda: batcher.queue_depth == 10)
            recorder.release()
            await first
            await asyncio.gather(*tasks)
        assert recorder.sizes == [1, 4, 4, 2]
        assert recorder.markers == [-1.0, *map(float, range(10))]  # FIFO

    run(main())


def test_two_instances_run_at_the_same_time():
    barrier = threading.Barrier(2, timeout=5.0)

    def both_at_once(inputs):
        barrier.wait()  # raises BrokenBarrierError unless the other instance runs too
        return {"y": inputs["x"] * 2}

    async def main():
        async with serving(both_at_once, instances=2) as batcher:
            return await asyncio.gather(batcher.submit(request(1.0)), batcher.submit(request(2.0)))

    first, second = run(main())
    assert float(first.outputs["y"][0, 0]) == 2.0 and float(second.outputs["y"][0, 0]) == 4.0


def test_bytes_inputs_are_concatenated_and_split_back():
    def echo(inputs):
        return {"y": inputs["s"], "n": torch.tensor([[len(b)] for b in inputs["s"].items])}

    async def main():
        worker = InstanceWorker(echo, intra_op_threads=1)
        settings = BatchingSettings(max_batch_size=8, max_queue_delay_ms=0.0, max_queue_size=8)
        batcher = AdaptiveBatcher("m", "1", settings, [worker])
        try:
            reqs = [
                InferRequest("m", "1", {"s": BytesTensor([w.encode()] * k, (k, 1))})
                for w, k in (("a", 1), ("bb", 2), ("ccc", 1))
            ]
            return await asyncio.gather(*(batcher.submit(r) for r in reqs))
        finally:
            await batcher.close()

    results = run(main())
    assert [r.outputs["y"].items for r in results] == [[b"a"], [b"bb", b"bb"], [b"ccc"]]
    assert [r.outputs["n"].flatten().tolist() for r in results] == [[1], [2, 2], [3]]


def test_requested_outputs_are_the_only_ones_returned():
    def two(inputs):
        return {"y": inputs["x"] * 2, "z": inputs["x"] * 3}

    async def main():
        async with serving(two) as batcher:
            req = request(1.0)
            req.requested_outputs = ("z",)
            return await batcher.submit(req)

    assert list(run(main()).outputs) == ["z"]


def test_close_fails_queued_requests_and_stops_the_threads():
    async def main():
        recorder = Recorder()
        worker = InstanceWorker(recorder, intra_op_threads=1, name="closing-instance")
        settings = BatchingSettings(max_batch_size=4, max_queue_delay_ms=0.0, max_queue_size=4)
        batcher = AdaptiveBatcher("m", "1", settings, [worker])
        first = await occupy(batcher, recorder)
        queued = asyncio.ensure_future(batcher.submit(request(1.0)))
        await until(lambda: batcher.queue_depth == 1)
        closing = asyncio.ensure_future(batcher.close(timeout=10.0))
        with pytest.raises(NotReady):
            await queued
        recorder.release()
        await closing
        with pytest.raises(NotReady):
            await first
        with pytest.raises(NotReady):
            await batcher.submit(request(2.0))
        return worker

    worker = run(main())
    assert not any(t.name == "closing-instance" for t in threading.enumerate())
    assert worker.close() is True


def test_settings_errors_name_the_key():
    for bad, key in (
        (BatchingSettings(max_batch_size=0), "batching.max_batch_size"),
        (BatchingSettings(max_queue_delay_ms=-1.0), "batching.max_queue_delay_ms"),
        (
            BatchingSettings(max_batch_size=4, preferred_batch_sizes=(8,)),
            "batching.preferred_batch_sizes",
        ),
    ):
        with pytest.raises(ConfigError) as err:
            AdaptiveBatcher("m", "1", bad, [])
        assert err.value.key == key


def primed(rate_hz: float, count: int = 50) -> ArrivalRate:
    """An arrival estimate that has just seen ``count`` arrivals at ``rate_hz``."""
    arrivals = ArrivalRate()
    now = time.monotonic()
    for i in range(count):
        arrivals.record(now - (count - i) / rate_hz)
    return arrivals


def costly_batches() -> ServiceTimeFit:
    """A fit saying each batch costs 50 ms fixed plus 1 ms a row: batching pays."""
    fit = ServiceTimeFit()
    for n in range(1, 17):
        fit.record(n, 0.001 * n + 0.05)
    return fit


def test_the_batcher_waits_for_a_fuller_batch_when_the_policy_says_it_pays():
    async def main():
        recorder = Recorder()
        worker = InstanceWorker(recorder, intra_op_threads=1)
        settings = BatchingSettings(max_batch_size=4, max_queue_delay_ms=5000.0, max_queue_size=8)
        batcher = AdaptiveBatcher(
            "m", "1", settings, [worker], fit=costly_batches(), arrivals=primed(10_000.0)
        )
        try:
            tasks = [asyncio.ensure_future(batcher.submit(request(float(m)))) for m in range(4)]
            await asyncio.gather(*tasks)
        finally:
            await batcher.close()
        assert recorder.sizes == [4]  # a cold batcher runs [1, 3] here

    run(main())


def test_a_lone_request_does_not_wait_when_arrivals_have_gone_quiet():
    async def main():
        recorder = Recorder()
        worker = InstanceWorker(recorder, intra_op_threads=1)
        settings = BatchingSettings(max_batch_size=4, max_queue_delay_ms=200.0, max_queue_size=8)
        arrivals = ArrivalRate()
        for i in range(50):  # a burst that ended a second ago
            arrivals.record(time.monotonic() - 1.0 - (50 - i) * 1e-4)
        batcher = AdaptiveBatcher(
            "m", "1", settings, [worker], fit=costly_batches(), arrivals=arrivals
        )
        try:
            result = await batcher.submit(request(1.0))
        finally:
            await batcher.close()
        assert result.timings["queue_s"] < 0.1

    run(main())


def test_the_wait_never_runs_past_the_queue_delay():
    async def main():
        recorder = Recorder()
        worker = InstanceWorker(recorder, intra_op_threads=1)
        settings = BatchingSettings(max_batch_size=32, max_queue_delay_ms=50.0, max_queue_size=8)
        batcher = AdaptiveBatcher(
            "m", "1", settings, [worker], fit=costly_batches(), arrivals=primed(1e6, count=1000)
        )
        try:
            result = await batcher.submit(request(1.0))
        finally:
            await batcher.close()
        assert result.timings["queue_s"] <= 0.05 + 0.03  # timer lateness on a busy machine

    run(main())


def test_a_crowd_of_callers_each_resolve_exactly_once_with_their_own_values():
    rng = random.Random(7)  # noqa: S311 - a reproducible mix, not security

    recorder = Recorder()

    async def main():
        async with serving(recorder, instances=2, max_batch_size=8, max_queue_size=1000) as b:
            plans = [(float(i), rng.choice((4, 8)), rng.random()) for i in range(300)]
            recorder.hold()  # both instances block on their first batch; the rest queue
            tasks = []
            for marker, width, roll in plans:
                deadline = time.monotonic() - 1.0 if roll < 0.1 else None
                req = request(marker, width=width, deadline=deadline)
                tasks.append(asyncio.ensure_future(b.submit(req)))
                if roll < 0.5:
                    await asyncio.sleep(0)
            await asyncio.sleep(0)  # every submit has run up to its await
            for task, (_, _, roll) in zip(tasks, plans, strict=True):
                if roll > 0.9:
                    task.cancel()  # queued, or one of the two held batches
            recorder.release()
            outcomes = await asyncio.gather(*tasks, return_exceptions=True)
            assert b.queue_depth == 0
        # Closed: the batches of cancelled callers that were running have come back.
        return plans, outcomes

    plans, outcomes = run(main())
    ran = recorder.markers
    assert len(ran) == len(set(ran))  # every request ran at most once
    cancelled = 0
    for (marker, width, roll), outcome in zip(plans, outcomes, strict=True):
        if roll < 0.1:
            assert isinstance(outcome, Expired) and marker not in ran
        elif roll > 0.9:
            cancelled += isinstance(outcome, asyncio.CancelledError)
            assert isinstance(outcome, asyncio.CancelledError) or (
                torch.equal(outcome.outputs["y"], torch.full((1, width), 2 * marker))
            )
        else:
            assert torch.equal(outcome.outputs["y"], torch.full((1, width), 2 * marker))
            assert marker in ran
    assert cancelled > 0
