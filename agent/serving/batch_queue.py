"""The queued requests of one batcher: one FIFO per key, bounded in total by the batcher.

A request's *key* is the name, dtype and non-batch shape of every input, so requests that
cannot be concatenated along dim 0 never share a queue. ``AdaptiveBatcher`` (``batching``)
owns one ``BatchQueue``, checks ``depth`` against ``max_queue_size`` before ``push``, asks
``oldest`` which queue to serve and ``take``s rows from it.

An entry leaves the queue in one of three ways:

- ``take``: it is about to run (state ``RUNNING``); or, when its deadline has passed, it
  is handed to the caller's ``on_expired`` instead and never runs;
- ``remove``: its caller went away, its deadline came (``Deadlines``), or the batcher is
  shutting down. Removal is in place: the entry is marked ``FINISHED`` (dead), skipped by
  ``oldest`` and ``take``, and the queue is compacted once the dead outnumber the live
  by ``_COMPACT_SLACK``, so memory stays bounded;
- ``remove_all``: everything still queued, for shutdown.

``Deadlines`` holds the deadlines of queued entries for the batcher's one timer: one
asyncio timer per request cost ~5 us to arm and cancel here, a heap entry ~1 us.

This module never touches tensor data: it reads shapes and dtypes only.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import weakref
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from edgeserve.types import InferRequest, TensorValue

Tensors = dict[str, TensorValue]
QUEUED, RUNNING, FINISHED = 0, 1, 2
"""``Entry.state``: waiting in its queue, in a running batch, done (or dead)."""
# Keep this many empty per-shape queues around before dropping them.
_KEEP_EMPTY_QUEUES = 16
# Compact a queue once its dead entries outnumber the live ones by this much.
_COMPACT_SLACK = 16
# Rebuild the deadline heap past twice the queue's depth plus this many (dead items are
# small: the entries are held weakly).
_DEADLINE_SLACK = 256


@dataclass(slots=True, eq=False)
class ShapeQueue:
    """The requests of one key, FIFO; dead entries are skipped and compacted away."""

    entries: deque[Entry] = field(default_factory=deque)
    rows: int = 0
    live: int = 0
    dead: int = 0


@dataclass(slots=True, eq=False, weakref_slot=True)
class Entry:
    """One queued request and the future its caller awaits."""

    request: InferRequest
    rows: int
    future: asyncio.Future[Tensors]
    enqueued_at: float
    queue: ShapeQueue
    state: int = QUEUED
    ran: tuple[float, float] = (0.0, 0.0)  # (dispatched at, batch service time)

    def fail(self, error: BaseException) -> None:
        """Finish with ``error`` (once: a future already resolved is left alone)."""
        self.state = FINISHED
        if not self.future.done():
            self.future.set_exception(error)


class BatchQueue:
    """All per-key queues of one batcher and their total ``depth``.

    It holds no reference back to its batcher (callbacks are passed per call), so a
    batcher that is let go is freed by reference counting, with the models it holds.
    """

    def __init__(self, batches: bool = True) -> None:
        self._batches = batches
        """False: the model has no batch dimension; every request is one row."""
        self._queues: dict[Hashable, ShapeQueue] = {}
        self.depth = 0
        """Requests queued and not yet taken or removed, across all keys."""

    def push(self, request: InferRequest, future: asyncio.Future[Tensors], now: float) -> Entry:
        """Append ``request`` to the queue of its key (the caller watches its deadline)."""
        key, rows = _key_and_rows(request.inputs)
        q = self._queues.get(key)
        if q is None:
            q = self._queues[key] = ShapeQueue()
        if not self._batches:
            rows = 1
        entry = Entry(request, rows, future, now, q)
        q.entries.append(entry)
        q.rows += rows
        q.live += 1
        self.depth += 1
        return entry

    def oldest(self) -> ShapeQueue | None:
        """The queue whose head waited longest (None if all are empty); drops dead heads
        and, past ``_KEEP_EMPTY_QUEUES``, the empty queues."""
        best: ShapeQueue | None = None
        empty: list[Hashable] = []
        for key, q in self._queues.items():
            entries = q.entries
            while entries and entries[0].state != QUEUED:
                entries.popleft()
                q.dead -= 1
            if not entries:
                empty.append(key)
            elif best is None or entries[0].enqueued_at < best.entries[0].enqueued_at:
                best = q
        if len(empty) > _KEEP_EMPTY_QUEUES:
            for key in empty:
                del self._queues[key]
        return best

    def take(
        self, q: ShapeQueue, size: int, now: float, on_expired: Callable[[Entry], None]
    ) -> list[Entry]:
        """Up to ``size`` rows from the head of ``q`` (at least one request), FIFO.

        The entries taken are ``RUNNING``. An entry whose deadline is at or before ``now``
        leaves the queue, goes to ``on_expired`` (which fails it) instead, and does not
        count toward ``size``."""
        entries = q.entries
        taken: list[Entry] = []
        rows = 0
        while entries:
            entry = entries[0]
            if entry.state != QUEUED:
                entries.popleft()
                q.dead -= 1
                continue
            if taken and rows + entry.rows > size:
                break
            entries.popleft()
            self._unqueue(entry)
            deadline = entry.request.deadline
            if deadline is not None and deadline <= now:
                on_expired(entry)
                continue
            entry.state = RUNNING
            taken.append(entry)
            rows += entry.rows
            if rows >= size:
                break
        return taken

    def remove(self, entry: Entry) -> None:
        """Take a queued entry out in place: mark it dead, compact when dead pile up."""
        self._unqueue(entry)
        entry.state = FINISHED
        q = entry.queue
        q.dead += 1
        if q.dead > q.live + _COMPACT_SLACK:
            q.entries = deque(e for e in q.entries if e.state == QUEUED)
            q.dead = 0

    def remove_all(self) -> list[Entry]:
        """Remove every queued entry; returns them, oldest first within each key."""
        removed: list[Entry] = []
        for q in self._queues.values():
            for entry in list(q.entries):
                if entry.state == QUEUED:
                    self.remove(entry)
                    removed.append(entry)
        return removed

    def _unqueue(self, entry: Entry) -> None:
        """Account for ``entry`` leaving the queue (the caller pops or marks it)."""
        q = entry.queue
        q.rows -= entry.rows
        q.live -= 1
        self.depth -= 1


def rows_of(inputs: Mapping[str, Any]) -> int:
    """A request's batch rows: dim 0 of its first input (a 0-d input counts as 1)."""
    for value in inputs.values():
        shape = value.shape
        return int(shape[0]) if len(shape) else 1
    return 0


def _key_and_rows(inputs: Mapping[str, Any]) -> tuple[Hashable, int]:
    """The queue key (requests with equal keys can be concatenated along dim 0: name,
    dtype and non-batch shape of every input) and the batch rows (dim 0 of the first
    input; 0-d inputs count as 1). One read of each shape: this runs per request."""
    parts: list[tuple[str, Any, tuple[int, ...]]] = []
    rows = 0
    for name, value in inputs.items():
        shape = value.shape
        if not parts:
            rows = int(shape[0]) if len(shape) else 1
        parts.append((name, getattr(value, "dtype", "BYTES"), tuple(shape)[1:]))
    return (parts[0] if len(parts) == 1 else tuple(sorted(parts))), rows


class Deadlines:
    """The deadlines of queued entries, earliest first, for one timer per batcher.

    Entries are held weakly, with an insertion counter as tie-break: an entry that ran,
    was removed or expired is skipped when met, and one that is gone frees its inputs at
    once. The heap is rebuilt from the live entries once it holds more than twice the
    queue's depth plus ``_DEADLINE_SLACK`` (many long deadlines on short-lived requests).
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, weakref.ref[Entry]]] = []
        self._order = itertools.count()

    def add(self, deadline: float, entry: Entry, depth: int) -> None:
        heap = self._heap
        heapq.heappush(heap, (deadline, next(self._order), weakref.ref(entry)))
        if len(heap) > 2 * depth + _DEADLINE_SLACK:
            self._heap = [item for item in heap if _queued(item[2])]
            heapq.heapify(self._heap)

    def earliest(self) -> float:
        """The earliest deadline of an entry still queued (``inf`` if none)."""
        heap = self._heap
        while heap and not _queued(heap[0][2]):
            heapq.heappop(heap)
        return heap[0][0] if heap else math.inf

    def due(self, now: float) -> list[Entry]:
        """The queued entries whose deadline is at or before ``now``, earliest first
        (taken out of the heap; the caller removes them from their queue)."""
        heap = self._heap
        found: list[Entry] = []
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)[2]()
            if entry is not None and entry.state == QUEUED:
                found.append(entry)
        return found

    def clear(self) -> None:
        self._heap.clear()


def _queued(ref: weakref.ref[Entry]) -> bool:
    entry = ref()
    return entry is not None and entry.state == QUEUED
