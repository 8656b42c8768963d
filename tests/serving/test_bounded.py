"""``serving.bounded.run_bounded``: model code outside a request, with a time bound.

Real threads and a real event loop; the "model code" waits on a ``threading.Event`` that
the test sets, so a hang ends when the test says so.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from edgeserve.errors import Expired, Kind
from edgeserve.serving.bounded import AbandonedThreads, run_bounded
from tests.waiting import eventually


def _hang(release: threading.Event, result: str = "loaded") -> str:
    release.wait(30)
    return result


def test_a_result_in_time_is_returned_and_nothing_is_abandoned() -> None:
    abandoned = AbandonedThreads()

    async def main() -> str:
        return await run_bounded(
            lambda: "ok", model="m", version="1", stage="load", timeout_s=5, abandoned=abandoned
        )

    assert asyncio.run(main()) == "ok"
    assert len(abandoned) == 0


def test_an_exception_of_the_work_propagates() -> None:
    def broken() -> None:
        raise ValueError("model code failed")

    async def main() -> None:
        await run_bounded(
            broken,
            model="m",
            version="1",
            stage="warm-up",
            timeout_s=5,
            abandoned=AbandonedThreads(),
        )

    with pytest.raises(ValueError, match="model code failed"):
        asyncio.run(main())


def test_a_hang_is_expired_abandoned_and_forgotten_when_it_returns() -> None:
    abandoned, release, late = AbandonedThreads(), threading.Event(), []

    async def main() -> None:
        await run_bounded(
            lambda: _hang(release),
            model="m",
            version="1",
            stage="warm-up",
            timeout_s=0.2,
            limit_s=120,
            abandoned=abandoned,
            on_late=late.append,
        )

    started = time.monotonic()
    with pytest.raises(Expired) as caught:
        asyncio.run(main())
    assert time.monotonic() - started < 5, "the caller waited for the hung thread"
    assert caught.value.kind is Kind.EXPIRED
    assert "warm-up did not finish within 120 s" in caught.value.message
    [stage] = abandoned.list()
    assert (stage.model, stage.version, stage.stage) == ("m", "1", "warm-up")
    release.set()
    eventually(lambda: len(abandoned) == 0 and late == ["loaded"], "the late thread")


def test_a_cancelled_caller_abandons_the_thread() -> None:
    abandoned, release = AbandonedThreads(), threading.Event()

    async def main() -> None:
        task = asyncio.create_task(
            run_bounded(
                lambda: _hang(release),
                model="m",
                version="2",
                stage="load",
                timeout_s=60,
                abandoned=abandoned,
            )
        )
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())  # returns at once: the thread is a daemon thread, never joined
    assert [s.stage for s in abandoned.list()] == ["load"]
    release.set()
    eventually(lambda: len(abandoned) == 0, "the late thread")
