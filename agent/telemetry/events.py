"""Events in memory until the next rollup: ``EventLog``.

Anyone that sees something worth telling the fleet calls ``record(kind, **body)``; the
rollup ``drain()``s the log every interval into rows of class ``event`` for the buffer::

    events = EventLog()                                    # built by daemon.py
    events.record("deployment", model="resnet", version="2", step="warm", ok=True)
    events.record("error", code="INTERNAL", correlation_id="3f2a9c0d11e4")
    rows = events.drain()                                  # telemetry/rollup.py

Kinds used across the project: ``deployment``, ``error``, ``restart``, ``link``,
``buffer_reset``, ``drop``, ``warmup_failure``; any other name is kept as given.

``record`` never blocks on I/O and never raises: the body is made JSON-able at once
(a value JSON cannot hold becomes ``"<TypeName>"``, never its text, so a payload
cannot slip in through ``str()``), and the time is stamped then. The log is bounded by
``max_pending``: when it is full the newest event is not kept but counted by kind,
and the next ``drain()`` ends with one ``drop`` event
``{class: "event", where: "memory", count, kinds: {kind: n}, first_time, last_time}``
saying what was lost before it reached the buffer. Thread-safe: one lock around a deque.

Times are ISO 8601 UTC with millisecond precision and ``Z`` (``rows.iso_time``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from edgeserve.telemetry.rows import Row, iso_time

log = logging.getLogger("edgeserve.telemetry")

DEFAULT_MAX_PENDING = 1000


def _opaque(value: object) -> str:
    return f"<{type(value).__name__}>"


class EventLog:
    """A bounded, thread-safe queue of event rows; see the module docstring."""

    def __init__(
        self,
        max_pending: int = DEFAULT_MAX_PENDING,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"EventLog max_pending: must be >= 1, got {max_pending}")
        self._max_pending = max_pending
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._pending: deque[Row] = deque()
        self._lost: dict[str, int] = {}
        self._lost_first: float | None = None
        self._lost_last: float | None = None

    def __len__(self) -> int:
        """Events waiting for the next ``drain()``."""
        return len(self._pending)

    def record(self, kind: str, **body: Any) -> None:
        """Queue one event of ``kind`` with ``body`` (a JSON object); never raises."""
        try:
            now = self._wall_clock()
            clean = json.loads(json.dumps(body, default=_opaque))
            row = Row(cls="event", kind=str(kind), body=clean, time=iso_time(now))
            with self._lock:
                if len(self._pending) < self._max_pending:
                    self._pending.append(row)
                    return
                self._lost[kind] = self._lost.get(kind, 0) + 1
                if self._lost_first is None:
                    self._lost_first = now
                self._lost_last = now
        except Exception:  # telemetry never breaks its caller
            log.warning("event of kind %r could not be recorded", kind, exc_info=True)

    def drain(self) -> list[Row]:
        """All queued events, oldest first, then a ``drop`` event if any were lost."""
        with self._lock:
            rows = list(self._pending)
            self._pending.clear()
            lost, first, last = self._lost, self._lost_first, self._lost_last
            self._lost, self._lost_first, self._lost_last = {}, None, None
        if lost and first is not None and last is not None:
            body = {
                "class": "event",
                "where": "memory",
                "count": sum(lost.values()),
                "kinds": dict(sorted(lost.items())),
                "first_time": iso_time(first),
                "last_time": iso_time(last),
            }
            rows.append(Row(cls="event", kind="drop", body=body, time=iso_time(first)))
        return rows
