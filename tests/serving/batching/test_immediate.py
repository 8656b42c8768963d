"""The batcher's immediate path for a model run on the loop (``InlineExecutor.run_now``):
a request that finds the model idle and nothing queued runs at once, in its own
coroutine, and gets what the queued path would have given it."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest
import torch

from edgeserve.errors import Expired, HandlerFailed, InvalidArgument
from edgeserve.serving.batching import AdaptiveBatcher
from edgeserve.serving.worker import InlineExecutor
from edgeserve.types import BatchingSettings, InferRequest

SETTINGS = BatchingSettings(max_batch_size=8, max_queue_delay_ms=1.0, max_queue_size=16)


def double(inputs):
    x = inputs["x"]
    if bool((x < 0).any()):
        raise ValueError("negative input")
    if bool((x > 1000).any()):
        raise InvalidArgument("x too large")
    return {"y": x * 2, "z": x + 1}


def request(value: float, rows: int = 1, **kwargs) -> InferRequest:
    return InferRequest("m", "1", {"x": torch.full((rows, 2), value)}, **kwargs)


def test_an_idle_inline_model_answers_without_a_loop_turn():
    batches = []

    async def scenario():
        batcher = AdaptiveBatcher(
            "m", "1", SETTINGS, [InlineExecutor(double)], on_batch=lambda n, s: batches.append(n)
        )
        submitted = batcher.submit(request(3.0, rows=2))
        # The coroutine finishes on its first step: nothing it awaits is pending.
        try:
            submitted.send(None)
        except StopIteration as done:
            result = done.value
        else:
            raise AssertionError("the immediate path suspended")
        await batcher.close()
        return result

    result = asyncio.run(scenario())
    assert result.outputs["y"].tolist() == [[6.0, 6.0], [6.0, 6.0]]
    assert batches == [2]  # observed as a batch of its rows
    assert result.timings["queue_s"] == 0.0 and result.timings["compute_s"] > 0


def test_requested_outputs_and_the_request_id_are_kept():
    async def scenario():
        batcher = AdaptiveBatcher("m", "1", SETTINGS, [InlineExecutor(double)])
        result = await batcher.submit(request(1.0, request_id="abc", requested_outputs=("z",)))
        await batcher.close()
        return result

    result = asyncio.run(scenario())
    assert list(result.outputs) == ["z"] and result.request_id == "abc"


def test_a_failing_model_gives_handler_failed_with_one_logged_correlation_id(caplog):
    async def scenario():
        batcher = AdaptiveBatcher("m", "1", SETTINGS, [InlineExecutor(double)])
        with pytest.raises(HandlerFailed) as failed:
            await batcher.submit(request(-1.0))
        with pytest.raises(InvalidArgument, match="x too large"):
            await batcher.submit(request(5000.0))
        after = await batcher.submit(request(1.0))  # the model still serves
        await batcher.close()
        return failed.value, after

    with caplog.at_level(logging.ERROR, logger="edgeserve.serving"):
        failed, after = asyncio.run(scenario())
    assert isinstance(failed.__cause__, ValueError)
    logged = [r for r in caplog.records if "failed (correlation id" in r.getMessage()]
    assert len(logged) == 1 and failed.correlation_id in logged[0].getMessage()
    assert after.outputs["y"].tolist() == [[2.0, 2.0]]


def test_a_request_past_its_deadline_never_runs():
    ran = []

    def counting(inputs):
        ran.append(1)
        return double(inputs)

    async def scenario():
        batcher = AdaptiveBatcher("m", "1", SETTINGS, [InlineExecutor(counting)])
        with pytest.raises(Expired):
            await batcher.submit(request(1.0, deadline=time.monotonic() - 0.001))
        await batcher.close()

    asyncio.run(scenario())
    assert ran == []


def test_under_concurrency_every_request_gets_its_own_outputs():
    async def scenario():
        batcher = AdaptiveBatcher("m", "1", SETTINGS, [InlineExecutor(double)])
        results = await asyncio.gather(*(batcher.submit(request(float(i))) for i in range(12)))
        await batcher.close()
        return results

    results = asyncio.run(scenario())
    assert [r.outputs["y"][0, 0].item() for r in results] == [2.0 * i for i in range(12)]


def test_a_closed_batcher_refuses_before_running():
    from edgeserve.errors import NotReady

    async def scenario():
        batcher = AdaptiveBatcher("m", "1", SETTINGS, [InlineExecutor(double)])
        await batcher.close()
        with pytest.raises(NotReady):
            await batcher.submit(request(1.0))

    asyncio.run(scenario())
