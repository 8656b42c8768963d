"""The device's telemetry schedule: rollups and samples into the buffer, off the event loop.

``TelemetryPipeline`` owns the buffer for the daemon (``daemon.py`` builds it and the
rollup, and hands ``buffer`` to the uploader):

* ``open()`` opens (or starts) the SQLite file in a worker thread; it never raises: a
  corrupt file is moved aside by the buffer itself, and any other failure leaves
  telemetry off for this run with one warning, while the daemon goes on serving;
* ``run()`` every ``sample_every_s`` appends ``rollup.sample(now)`` and every
  ``interval_s`` ``rollup.collect(now)`` (the rollups and the drained events); before an
  interval's append it notes the buffer's last id, and hands it to ``on_interval``
  afterwards (the uploader's ``live_from``: that interval goes before the backlog). Every
  ``maintain_every_s`` it runs ``buffer.maintain()``. The collect, the append and the
  stats all run in one worker thread call per tick: inference never waits on SQLite;
* ``facts()`` is the buffer's stats as of the last tick (status reads it on the loop, so
  it must not touch SQLite);
* ``close()`` makes a final collect, appends it and closes the file.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from edgeserve.telemetry.buffer import TelemetryBuffer
from edgeserve.telemetry.rows import BufferStats, Row

log = logging.getLogger("edgeserve.telemetry")

MAINTAIN_EVERY_S = 60.0


class RowSource(Protocol):
    """What the pipeline asks every tick (``telemetry.rollup.Rollup`` has it)."""

    def collect(self, now: float) -> list[Row]:
        """The rollups of the interval ending ``now`` and the events drained."""
        ...

    def sample(self, now: float) -> list[Row]:
        """One system sample taken ``now``."""
        ...


class TelemetryPipeline:
    """Rollups and samples into the buffer on a schedule (see the module docstring)."""

    def __init__(
        self,
        *,
        db: Path,
        max_bytes: int,
        rollup: RowSource,
        interval_s: float,
        sample_every_s: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        maintain_every_s: float = MAINTAIN_EVERY_S,
    ) -> None:
        self._db = db
        self._max_bytes = max_bytes
        self._rollup = rollup
        self._interval_s = interval_s
        self._sample_every_s = sample_every_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._maintain_every_s = maintain_every_s
        self._buffer: TelemetryBuffer | None = None
        self._stats: BufferStats | None = None
        self.on_interval: Callable[[int], None] | None = None
        """Called on the loop after each interval's append with the last id before it."""

    @property
    def buffer(self) -> TelemetryBuffer | None:
        """The open buffer; None when it could not be opened (telemetry is off this run)."""
        return self._buffer

    @property
    def db(self) -> Path:
        return self._db

    def stats(self) -> BufferStats | None:
        """The buffer's stats as of the last tick; None before the first or without a file."""
        return self._stats

    async def open(self) -> TelemetryBuffer | None:
        """Open the buffer in a worker thread; None (and one warning) if it cannot be."""
        try:
            self._buffer = await asyncio.to_thread(self._open)
        except Exception as exc:  # noqa: BLE001 - telemetry never stops the daemon
            log.warning("telemetry is off for this run: %s: %s", type(exc).__name__, exc)
            return None
        return self._buffer

    def _open(self) -> TelemetryBuffer:
        self._db.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        buffer = TelemetryBuffer(self._db, max_bytes=self._max_bytes)
        self._stats = buffer.stats()
        return buffer

    async def run(self) -> None:
        """Tick until cancelled; a failing tick is logged and the next one goes ahead."""
        if self._buffer is None:
            return
        start = self._clock()
        next_sample = start + self._sample_every_s
        next_interval = start + self._interval_s
        next_maintain = start + self._maintain_every_s
        while True:
            due = min(next_sample, next_interval, next_maintain)
            await asyncio.sleep(max(0.0, due - self._clock()))
            now = self._clock()
            sample, interval, maintain = now >= next_sample, now >= next_interval, False
            if sample:
                next_sample = _next(next_sample, self._sample_every_s, now)
            if interval:
                next_interval = _next(next_interval, self._interval_s, now)
            if now >= next_maintain:
                maintain = True
                next_maintain = _next(next_maintain, self._maintain_every_s, now)
            before = await asyncio.to_thread(self._tick, sample, interval, maintain)
            if interval and before is not None and self.on_interval is not None:
                self.on_interval(before)

    def _tick(self, sample: bool, interval: bool, maintain: bool) -> int | None:
        """In a worker thread: collect, append, maintain, refresh the stats.

        Returns the buffer's last id before the append (None if nothing was appended)."""
        buffer = self._buffer
        if buffer is None:
            return None
        before = None
        try:
            now = self._wall_clock()
            rows = self._rollup.sample(now) if sample else []
            if interval:
                rows += self._rollup.collect(now)
            if rows:
                before = buffer.last_id
                buffer.append(rows)  # fails soft: counted by the buffer, retried next time
            if maintain:
                buffer.maintain()
            if interval or maintain:
                self._stats = buffer.stats()
        except Exception as exc:  # noqa: BLE001 - a bad row or a rollup bug; go on
            log.warning("telemetry tick failed: %s: %s", type(exc).__name__, exc)
        return before

    async def close(self) -> None:
        """A final collect into the buffer, then close it (in a worker thread)."""
        if self._buffer is not None:
            await asyncio.to_thread(self._close)

    def _close(self) -> None:
        buffer, self._buffer = self._buffer, None
        if buffer is None:
            return
        try:
            rows = self._rollup.collect(self._wall_clock())
            if rows:
                buffer.append(rows)
        except Exception as exc:  # noqa: BLE001 - closing goes on
            log.warning("telemetry: final collect failed: %s: %s", type(exc).__name__, exc)
        self._stats = buffer.stats()
        buffer.close()


def _next(due: float, every: float, now: float) -> float:
    """The next due time after ``now`` on the grid ``due + k * every`` (no catch-up burst)."""
    while due <= now:
        due += every
    return due
