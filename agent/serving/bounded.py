"""Model code run outside a request (load, warm-up, thread probe), with a time bound.

Such code can hang: a handler that sleeps, a deadlock in a custom module. It runs on a
daemon thread of its own, never on the loop's default executor (``asyncio.run`` and the
interpreter join those threads at exit, so one stuck thread would keep the process
alive), and the caller waits at most ``timeout_s``. When the time is up, or the caller is
cancelled (shutdown), the thread is left running: Python cannot stop a thread, and what
it holds (a half-loaded module, its tensors) cannot be freed while it runs. It is counted
in ``AbandonedThreads`` so that status can say so; should it return after all, it is
forgotten again and ``on_late`` gets its result, None when it raised (to close a model
nobody will serve).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from edgeserve.errors import Expired

log = logging.getLogger("edgeserve.serving")

_T = TypeVar("_T")


@dataclass(frozen=True)
class AbandonedStage:
    """A thread left running model code."""

    model: str
    version: str
    stage: str
    since: float
    """Wall-clock time it was abandoned."""


class AbandonedThreads:
    """The threads left running model code; thread-safe (a late thread removes itself)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stages: dict[int, AbandonedStage] = {}

    def list(self) -> list[AbandonedStage]:
        with self._lock:
            return sorted(self._stages.values(), key=lambda s: s.since)

    def __len__(self) -> int:
        with self._lock:
            return len(self._stages)

    def _add(self, key: int, stage: AbandonedStage) -> None:
        with self._lock:
            self._stages[key] = stage

    def _remove(self, key: int) -> None:
        with self._lock:
            self._stages.pop(key, None)


class _Run(Generic[_T]):
    """One bounded call: the thread's outcome and whether its caller gave up on it."""

    def __init__(self, key: int, stage: AbandonedStage) -> None:
        self.key = key
        self.stage = stage
        self.lock = threading.Lock()
        self.finished = False
        self.abandoned = False


async def run_bounded(
    work: Callable[[], _T],
    *,
    model: str,
    version: str,
    stage: str,
    timeout_s: float,
    abandoned: AbandonedThreads,
    limit_s: float | None = None,
    on_late: Callable[[_T | None], Any] | None = None,
) -> _T:
    """``work()`` on a daemon thread; its result, or ``Expired.stage`` after ``timeout_s``.

    Exceptions of ``work`` propagate. On timeout or cancellation the thread is recorded
    in ``abandoned`` until it returns (then ``on_late`` runs on that thread). ``limit_s``
    is the figure the error quotes (the whole budget when ``timeout_s`` is what is left).
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()
    run: _Run[_T] = _Run(id(future), AbandonedStage(model, version, stage, 0.0))

    def settle(result: Any, failure: BaseException | None) -> None:
        if future.done():
            return
        if failure is not None:
            future.set_exception(failure)
        else:
            future.set_result(result)

    def target() -> None:
        result: Any = None
        failure: BaseException | None = None
        try:
            result = work()
        except BaseException as exc:  # handed to the waiting coroutine
            failure = exc
        with run.lock:
            run.finished = True
            late = run.abandoned
        if late:
            _returned_late(run, abandoned, result, failure, on_late)
            return
        try:
            loop.call_soon_threadsafe(settle, result, failure)
        except RuntimeError:  # the loop is closed: nobody waits any more
            pass

    thread = threading.Thread(target=target, name=f"edgeserve-{stage} {model}/{version}")
    thread.daemon = True  # never joined at exit: a hung model must not keep the process
    thread.start()
    try:
        return await asyncio.wait_for(asyncio.shield(future), timeout_s)
    except TimeoutError:
        _abandon(run, abandoned)
        limit = timeout_s if limit_s is None else limit_s
        raise Expired.stage(model, version, stage, limit) from None
    except asyncio.CancelledError:
        _abandon(run, abandoned)
        raise


def _abandon(run: _Run[Any], abandoned: AbandonedThreads) -> None:
    with run.lock:
        if run.finished:
            return  # it returned just now; its result is simply dropped
        run.abandoned = True
        stage = AbandonedStage(run.stage.model, run.stage.version, run.stage.stage, time.time())
        abandoned._add(run.key, stage)
    log.error(
        "%s/%s: %s still running; its thread is abandoned and its memory is not "
        "reclaimable until the daemon restarts",
        stage.model,
        stage.version,
        stage.stage,
    )


def _returned_late(
    run: _Run[Any],
    abandoned: AbandonedThreads,
    result: Any,
    failure: BaseException | None,
    on_late: Callable[[Any], Any] | None,
) -> None:
    abandoned._remove(run.key)
    stage = run.stage
    log.warning("%s/%s: the abandoned %s returned", *_names(stage))
    if on_late is not None:
        try:
            on_late(None if failure is not None else result)
        except Exception:
            log.exception("%s/%s: closing after a late %s", *_names(stage))


def _names(stage: AbandonedStage) -> tuple[str, str, str]:
    return stage.model, stage.version, stage.stage
