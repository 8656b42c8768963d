"""Batching mechanics for one live model version (the policy is ``batch_policy``).

``AdaptiveBatcher.submit`` is what ``LiveModel.submit`` calls. A request goes into the
queue of its *key* (name, dtype and non-batch shape of every input, so requests that
cannot be concatenated never meet; the queues are ``batch_queue``), the total across keys
bounded by ``max_queue_size``; the caller awaits a future that is resolved exactly once:

- with its outputs, split back from the batch (views, no copies);
- ``Overloaded`` at once when the queue is full (nothing queued, no work done);
- ``Expired`` when its deadline passes while queued (one timer per batcher, at the
  earliest deadline queued, fails it then, and dispatch re-checks; an expired request
  never runs);
- ``HandlerFailed`` (the original exception as ``__cause__``, logged with the same
  correlation id) or the ``EdgeserveError`` itself when its batch raised: a failing
  batch fails only its own requests;
- ``NotReady`` when the batcher is closed before the request ran.
A caller that goes away (its task cancelled) leaves the queue at once; its entry is
compacted away later, so memory stays bounded.

Dispatch is event driven rather than one asyncio task per instance: whenever something
changes (a request arrives, a batch finishes, a policy timer fires) ``_kick`` runs
synchronously on the loop and, for each idle instance, asks ``batch_policy.decide``
about the queue whose head is oldest, then hands up to ``n`` rows to that instance's
executor, or arms one timer for ``Wait.until``. At concurrency 1 a request therefore
costs one hop to the instance thread and one back, with no dispatcher task to wake in
between. A model run on the loop itself (``worker.InlineExecutor``) skips even that: a
request that finds it idle and nothing queued runs at once in its own coroutine, with no
future and no loop turn (``_run_now``); such a model never has anything queued, so it
runs one request at a time, which its size makes the cheapest way. The batcher feeds
the policy: arrival times are recorded at submit, and each batch's service time
(dispatch to results, as the loop sees it) goes into the fit.

A request whose own batch dimension is larger than ``max_batch_size`` runs alone, whole
(it is never split across batches). Stacking and splitting are the executor's job
(``worker``), on the instance thread; this module never touches tensor data.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Protocol, TypeVar

from edgeserve.errors import (
    EdgeserveError,
    Expired,
    HandlerFailed,
    NotReady,
    Overloaded,
)
from edgeserve.serving.batch_policy import ArrivalRate, ServiceTimeFit, Wait, decide
from edgeserve.serving.batch_queue import (
    FINISHED,
    QUEUED,
    BatchQueue,
    Deadlines,
    Entry,
    Tensors,
    rows_of,
)
from edgeserve.types import (
    BUILT_IN_BATCHING,
    BatchingSettings,
    InferRequest,
    InferResult,
    TensorValue,
)

log = logging.getLogger("edgeserve.serving")
_V = TypeVar("_V")


class BatchExecutor(Protocol):
    """Runs formed batches on one instance (``worker.InstanceWorker``)."""

    def submit_parts(
        self,
        parts: Sequence[Mapping[str, TensorValue]],
        sizes: Sequence[int],
        loop: asyncio.AbstractEventLoop,
        done: Callable[[list[Tensors | BaseException] | None, BaseException | None], None],
    ) -> None: ...

    def close(self, timeout: float | None = None) -> bool: ...


class ImmediateExecutor(BatchExecutor, Protocol):
    """An executor that runs on the loop's own thread (``worker.InlineExecutor``)."""

    def run_now(
        self, parts: Sequence[Mapping[str, TensorValue]], sizes: Sequence[int]
    ) -> list[Tensors | BaseException]: ...


@dataclass(slots=True, eq=False)
class _Batch:
    entries: list[Entry]
    executor: BatchExecutor
    started: float
    rows: int


class AdaptiveBatcher:
    """Queues, batches and dispatches the requests of one model version.

    ``executors``: one per instance; the batcher owns them and closes them in ``close``.
    ``clock``: the monotonic clock request deadlines are on. ``fit`` / ``arrivals``: the
    policy's estimates (fresh by default). ``on_batch(rows, service_s)``: called on the
    loop after each batch that ran (for recorders). Each result's ``timings`` holds
    ``queue_s`` (enqueue to dispatch) and ``compute_s`` (its batch's service time:
    dispatch to results, so the thread hops, stacking and splitting included).
    ``batches`` False: the model has no batch dimension; each request is one row (and
    ``max_batch_size`` 1 keeps requests apart).
    """

    def __init__(
        self,
        model: str,
        version: str,
        settings: BatchingSettings,
        executors: Sequence[BatchExecutor],
        *,
        clock: Callable[[], float] = time.monotonic,
        fit: ServiceTimeFit | None = None,
        arrivals: ArrivalRate | None = None,
        on_batch: Callable[[int, float], None] | None = None,
        batches: bool = True,
    ) -> None:
        settings = settings.over(BUILT_IN_BATCHING).validate("batching")
        if len(executors) != settings.instances:
            raise ValueError(
                f"model '{model}' version '{version}': {len(executors)} executors "
                f"for {settings.instances} instances"
            )
        if not batches and settings.max_batch_size != 1:
            raise ValueError(
                f"model '{model}' version '{version}' has no batch dimension: "
                f"max_batch_size must be 1, got {settings.max_batch_size}"
            )
        self.model = model
        self.version = version
        self._max_queue_size = _required(settings.max_queue_size)
        self._limits = (
            _required(settings.max_batch_size),
            _required(settings.max_queue_delay_ms) / 1000.0,
            _required(settings.preferred_batch_sizes),
        )
        self._executors = tuple(executors)
        self._idle = list(executors)
        # A model run on the loop itself: a request that finds nothing queued runs at
        # once in its own coroutine (no future, no loop turn to hand the result back).
        self._immediate: ImmediateExecutor | None = None
        if len(executors) == 1 and hasattr(executors[0], "run_now"):
            self._immediate = executors[0]  # type: ignore[assignment]
        self._batches = batches
        self._clock = clock
        self._fit = fit or ServiceTimeFit()
        self._arrivals = arrivals or ArrivalRate()
        self._on_batch = on_batch
        self._queue = BatchQueue(batches)
        self._active: set[_Batch] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._deadlines = Deadlines()
        self._expiry: asyncio.TimerHandle | None = None
        self._expiry_at = math.inf
        self._quiet: asyncio.Event | None = None
        self._state = "ready"
        self._running = 0

    # -- reads --------------------------------------------------------------------------

    @property
    def queue_depth(self) -> int:
        """Requests queued and not yet running."""
        return self._queue.depth

    # -- the hot path -------------------------------------------------------------------

    async def submit(self, request: InferRequest) -> InferResult:
        """Queue ``request``, wait for its batch, return its own outputs."""
        if self._state != "ready":
            raise NotReady.model(self.model, self.version, self._state)
        if self._immediate is not None and self._idle and not self._queue.depth:
            return self._run_now(request, self._immediate)
        if self._queue.depth >= self._max_queue_size:
            raise Overloaded.queue_full(self.model, self.version, self._max_queue_size)
        loop = self._loop = asyncio.get_running_loop()
        entry = self._enqueue(request, self._clock(), loop)
        self._kick()
        try:
            outputs = await entry.future
        except asyncio.CancelledError:
            if entry.state == QUEUED:
                self._queue.remove(entry)
                self._check_quiet()
            raise
        wanted = request.requested_outputs
        if wanted:
            outputs = {name: outputs[name] for name in wanted if name in outputs}
        dispatched_at, service = entry.ran
        return InferResult(
            self.model,
            self.version,
            outputs,
            request.request_id,
            {"queue_s": dispatched_at - entry.enqueued_at, "compute_s": service},
        )

    def _run_now(self, request: InferRequest, executor: ImmediateExecutor) -> InferResult:
        """Run ``request`` alone on the loop, now: what the queued path would do with it
        (a batch of one, dispatched at once), minus the future and the loop turn.
        Nothing can interleave: no other request sees the executor busy."""
        now = self._clock()
        rows = rows_of(request.inputs) if self._batches else 1
        self._arrivals.record(now, rows)
        if request.deadline is not None and request.deadline <= now:
            raise Expired.while_queued(self.model, self.version)
        try:
            outputs = executor.run_now((request.inputs,), (rows,))[0]
            if isinstance(outputs, BaseException):
                raise outputs
        except EdgeserveError:
            raise
        except Exception as exc:
            raise self._handler_failed(self._log_failed_batch(1, exc), exc) from exc
        elapsed = self._clock() - now
        self._fit.record(rows, elapsed)
        if self._on_batch is not None:
            self._observe(self._on_batch, rows, elapsed)
        wanted = request.requested_outputs
        if wanted:
            outputs = {name: outputs[name] for name in wanted if name in outputs}
        timings = {"queue_s": 0.0, "compute_s": elapsed}
        return InferResult(self.model, self.version, outputs, request.request_id, timings)

    def _enqueue(self, request: InferRequest, now: float, loop: asyncio.AbstractEventLoop) -> Entry:
        entry = self._queue.push(request, loop.create_future(), now)
        self._arrivals.record(now, entry.rows)
        deadline = request.deadline
        if deadline is not None:
            self._deadlines.add(deadline, entry, self._queue.depth)
            if deadline < self._expiry_at:
                self._arm_expiry(deadline, now, loop)
        return entry

    def _kick(self) -> None:
        """Give work to idle instances, or arm the policy's timer."""
        limits = self._limits
        queue = self._queue
        while self._idle and queue.depth:
            now = self._clock()
            q = queue.oldest()
            if q is None:
                return
            rate = self._arrivals.rate(now)
            oldest = q.entries[0].enqueued_at
            decision = decide(now, oldest, q.rows, *limits, rate, self._fit)
            if isinstance(decision, Wait):
                self._arm_timer(now, decision.until)
                return
            entries = queue.take(q, decision.size, now, self._expired_in_take)
            if entries:
                rows = sum(e.rows for e in entries)
                self._launch(_Batch(entries, self._idle.pop(), now, rows))

    def _launch(self, batch: _Batch) -> None:
        self._active.add(batch)
        self._running += len(batch.entries)
        parts = [e.request.inputs for e in batch.entries]
        sizes = [e.rows for e in batch.entries]
        try:
            if self._loop is None:
                raise RuntimeError("no event loop: launch before any submit")
            batch.executor.submit_parts(parts, sizes, self._loop, partial(self._finish, batch))
        except Exception as exc:
            self._finish(batch, None, exc)

    def _finish(
        self,
        batch: _Batch,
        results: list[Tensors | BaseException] | None,
        error: BaseException | None,
    ) -> None:
        """On the loop, once the executor is done with ``batch``."""
        elapsed = self._clock() - batch.started
        self._active.discard(batch)
        entries = batch.entries
        self._running -= len(entries)
        if results is not None and len(results) != len(entries):
            error = RuntimeError(f"executor returned {len(results)} results for {len(entries)}")
            results = None
        if results is not None:
            self._fit.record(batch.rows, elapsed)
            if self._on_batch is not None:
                self._observe(self._on_batch, batch.rows, elapsed)
            ran = (batch.started, elapsed)
            for entry, outputs in zip(entries, results, strict=False):
                if isinstance(outputs, BaseException):  # the batch was run apart
                    self._fail_batch([entry], outputs)
                    continue
                entry.state = FINISHED
                entry.ran = ran
                if not entry.future.done():
                    entry.future.set_result(outputs)
        else:
            self._fail_batch(entries, error or RuntimeError("executor returned nothing"))
        self._idle.append(batch.executor)
        self._kick()
        self._check_quiet()

    def _observe(self, observer: Callable[[int, float], None], rows: int, seconds: float) -> None:
        try:
            observer(rows, seconds)
        except Exception:
            log.exception(
                "model '%s' version '%s': batch observer failed", self.model, self.version
            )

    def _fail_batch(self, entries: list[Entry], error: BaseException) -> None:
        if isinstance(error, EdgeserveError):
            for entry in entries:
                entry.fail(error)
            return
        correlation_id = self._log_failed_batch(len(entries), error)
        for entry in entries:
            entry.fail(self._handler_failed(correlation_id, error))

    def _log_failed_batch(self, requests: int, error: BaseException) -> str:
        """Log a batch that raised, once; returns the correlation id its requests get."""
        correlation_id = uuid.uuid4().hex[:12]
        log.error(
            "model '%s' version '%s': batch of %d requests failed (correlation id %s)",
            self.model,
            self.version,
            requests,
            correlation_id,
            exc_info=error,
        )
        return correlation_id

    def _handler_failed(self, correlation_id: str, error: BaseException) -> HandlerFailed:
        wrapped = HandlerFailed(self.model, self.version, correlation_id)
        wrapped.__cause__ = error
        return wrapped

    # -- deadlines and timers -----------------------------------------------------------

    def _expired_in_take(self, entry: Entry) -> None:
        """``BatchQueue.take`` found ``entry`` past its deadline (it left the queue)."""
        entry.fail(Expired.while_queued(self.model, self.version))

    def _arm_expiry(self, at: float, now: float, loop: asyncio.AbstractEventLoop) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry_at = at
        self._expiry = loop.call_later(max(at - now, 0.0), self._on_expiry)

    def _on_expiry(self) -> None:
        """Fail the queued requests whose deadline has come; arm for the next one."""
        self._expiry = None
        self._expiry_at = math.inf
        now = self._clock()
        expired = self._deadlines.due(now)
        for entry in expired:
            self._queue.remove(entry)
            entry.fail(Expired.while_queued(self.model, self.version))
        following = self._deadlines.earliest()
        if following != math.inf and self._loop is not None:
            self._arm_expiry(following, now, self._loop)
        if expired:
            self._check_quiet()

    def _arm_timer(self, now: float, until: float) -> None:
        if until == math.inf or self._loop is None:
            return
        if self._timer is not None:
            if self._timer_at <= until:
                return
            self._timer.cancel()
        self._timer_at = until
        self._timer = self._loop.call_later(max(until - now, 0.0), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = math.inf
        self._kick()

    # -- shutdown -----------------------------------------------------------------------

    async def close(self, timeout: float = 5.0) -> None:
        """Fail whatever is queued or running with ``NotReady``, then stop the executors.

        Waits up to ``timeout`` s for running batches to come back, so the instance
        threads are idle when they are joined; a thread stuck in a batch is left behind
        (a daemon thread) with a warning rather than blocking the loop.
        """
        if self._state == "closed":
            return
        self._state = "closed"
        for timer in (self._timer, self._expiry):
            if timer is not None:
                timer.cancel()
        self._timer = self._expiry = None
        self._deadlines.clear()
        self._fail_all("closed")
        idle = await self._wait_quiet(timeout)
        for executor in self._executors:
            if not executor.close(timeout=1.0 if idle else 0.0):
                log.warning(
                    "model '%s' version '%s': an instance thread is still running a batch",
                    self.model,
                    self.version,
                )

    def _fail_all(self, state: str) -> None:
        for entry in self._queue.remove_all():
            entry.fail(NotReady.model(self.model, self.version, state))
        for batch in self._active:
            for entry in batch.entries:
                entry.fail(NotReady.model(self.model, self.version, state))

    async def _wait_quiet(self, timeout: float) -> bool:
        if self._queue.depth == 0 and self._running == 0:
            return True
        self._quiet = quiet = self._quiet or asyncio.Event()
        quiet.clear()
        try:
            await asyncio.wait_for(quiet.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def _check_quiet(self) -> None:
        if self._quiet is not None and self._queue.depth == 0 and self._running == 0:
            self._quiet.set()


def _required(value: _V | None) -> _V:
    if value is None:  # BUILT_IN_BATCHING sets every field the batcher reads
        raise ValueError("batching settings are incomplete")
    return value
