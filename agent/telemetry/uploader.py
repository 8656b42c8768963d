"""The uploader: buffer rows to the broker, live data first, rate-capped, deleted on PUBACK.

One task (``run``) loops: while the publisher is connected it takes a batch from the
buffer (``TelemetryBuffer.pending``: the rows of the newest interval first, the backlog
after them, each part by class and oldest first; at most ``batch_bytes``), publishes it as
one QoS 1 message and, once the broker acknowledged it, deletes exactly those rows
(``acknowledge``). A crash or a lost connection between publish and PUBACK leaves the
rows in the buffer, so they go again: delivery is at least once, and the collector keeps
each ``(device, id)`` once. Message body (compact JSON, UTF-8)::

    {"device": "<id>", "boot_id": "<uuid of this daemon run>",
     "records": [{"id": 17, "class": "rollup", "kind": "...", "time": "...Z", "body": {...}}]}

"Live" is what the owner appended since it last called ``live_from(last_id)``: the daemon
passes the buffer's last id before each interval's append, so the newest interval goes
ahead of a week of backlog.

A token bucket (``bytes_per_s``, burst ``batch_bytes``) paces the messages, so a long
backlog never saturates a cellular link or takes CPU from inference. While disconnected
the task waits to be woken (``wake()``, which the owner calls on connection changes and
new rows), with a slow poll as a safety net: no busy loop. A failed publish (refused by
the broker, too large, queue full) backs off exponentially (capped) and halves the batch
for the next try; the rows stay. Every buffer call runs in a worker thread
(``asyncio.to_thread``), never on the event loop. Payloads are never logged.

The publisher is injected (``fleet/link.FleetLink`` in the daemon): telemetry never
imports ``fleet``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from edgeserve.telemetry.buffer import TelemetryBuffer
from edgeserve.telemetry.rows import StoredRow

log = logging.getLogger("edgeserve.telemetry")

IDLE_POLL_S = 5.0
"""Longest wait without a wake-up before the uploader looks again (a safety net)."""
BACKOFF_INITIAL_S = 1.0
BACKOFF_MAX_S = 60.0
MIN_BATCH_BYTES = 1024


class Publisher(Protocol):
    """What the uploader needs from a link; ``FleetLink`` has it."""

    @property
    def connected(self) -> bool: ...

    async def publish(self, topic: str, payload: bytes, qos: int = 1) -> None:
        """Return once the broker acknowledged the message (QoS 1); raise if refused."""
        ...


class TokenBucket:
    """``rate`` bytes per second with a burst of ``capacity``; ``take`` waits for tokens."""

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float]) -> None:
        if rate <= 0 or capacity <= 0:
            raise ValueError("token bucket: rate and capacity must be > 0")
        self._rate = rate
        self._capacity = capacity
        self._clock = clock
        self._tokens = capacity
        self._stamp = clock()

    def delay(self, amount: int) -> float:
        """Seconds until ``amount`` may go (0 when it may go now)."""
        self._refill()
        return 0.0 if self._tokens >= amount else (amount - self._tokens) / self._rate

    def take(self, amount: int) -> None:
        """Spend ``amount`` (the balance may go below zero for a message above the burst)."""
        self._refill()
        self._tokens -= amount

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self._capacity, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now


@dataclass(frozen=True)
class UploadStats:
    """What the uploader did since it started (for status and logs)."""

    messages: int
    records: int
    bytes: int
    failures: int
    last_upload: float | None
    """Wall time of the last acknowledged message; None before the first."""
    last_error: str | None


class Uploader:
    """Sends the buffer's rows to ``topic`` through ``publisher`` (see the module docstring)."""

    def __init__(
        self,
        buffer: TelemetryBuffer,
        publisher: Publisher,
        *,
        topic: str,
        device_id: str,
        boot_id: str,
        batch_bytes: int,
        bytes_per_s: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        idle_poll_s: float = IDLE_POLL_S,
    ) -> None:
        if batch_bytes < MIN_BATCH_BYTES or bytes_per_s < 1:
            raise ValueError(f"uploader: batch_bytes >= {MIN_BATCH_BYTES}, bytes_per_s >= 1")
        self._buffer = buffer
        self._publisher = publisher
        self._topic = topic
        self._device_id = device_id
        self._boot_id = boot_id
        self._batch_bytes = batch_bytes
        self._limit = batch_bytes  # halved after a failed publish, restored after a success
        self._bucket = TokenBucket(bytes_per_s, batch_bytes, clock)
        self._wall_clock = wall_clock
        self._idle_poll_s = idle_poll_s
        self._live_after_id = 0
        self._wake = asyncio.Event()
        self._messages = self._records = self._bytes = self._failures = 0
        self._last_upload: float | None = None
        self._last_error: str | None = None

    def live_from(self, after_id: int) -> None:
        """Rows with ids above ``after_id`` are live: they go before the backlog."""
        self._live_after_id = after_id
        self._wake.set()

    def wake(self) -> None:
        """Look again now (the connection came up, or new rows are in the buffer)."""
        self._wake.set()

    def stats(self) -> UploadStats:
        return UploadStats(
            self._messages,
            self._records,
            self._bytes,
            self._failures,
            self._last_upload,
            self._last_error,
        )

    async def run(self) -> None:
        """Upload until cancelled; never raises otherwise."""
        failures = 0
        while True:
            self._wake.clear()  # before looking: a wake-up from here on is not lost
            if not self._publisher.connected:
                await self._wait(self._idle_poll_s)
                continue
            try:
                sent = await self._send_one()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the rows stay; the loop must go on
                failures += 1
                self._failed(exc, failures)
                await asyncio.sleep(_backoff(failures))
                continue
            failures = 0
            if not sent:
                await self._wait(self._idle_poll_s)

    async def _send_one(self) -> bool:
        """Publish one batch and delete it after the PUBACK; False when nothing waits."""
        rows, payload = await asyncio.to_thread(self._next_batch)
        if not rows:
            return False
        delay = self._bucket.delay(len(payload))
        if delay > 0:
            await asyncio.sleep(delay)
        self._bucket.take(len(payload))
        await self._publisher.publish(self._topic, payload, qos=1)
        self._limit = self._batch_bytes
        acknowledged = await asyncio.to_thread(self._buffer.acknowledge, [r.id for r in rows])
        if not acknowledged:  # they stay and go again: the collector keeps each id once
            log.warning("telemetry: %d uploaded records could not be deleted yet", len(rows))
        self._messages += 1
        self._records += len(rows)
        self._bytes += len(payload)
        self._last_upload = self._wall_clock()
        return True

    def _next_batch(self) -> tuple[list[StoredRow], bytes]:
        """In a worker thread: the rows to send next and the message that carries them."""
        rows = self._buffer.pending(self._limit, self._live_after_id)
        return rows, encode_batch(self._device_id, self._boot_id, rows) if rows else b""

    def _failed(self, exc: Exception, failures: int) -> None:
        self._failures += 1
        self._last_error = f"{type(exc).__name__}: {exc}"
        self._limit = max(MIN_BATCH_BYTES, self._limit // 2)
        log.warning(
            "telemetry: upload failed (%s); the records stay, next try in %.0f s",
            self._last_error,
            _backoff(failures),
        )

    async def _wait(self, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(self._wake.wait(), timeout_s)
        except TimeoutError:
            pass


def encode_batch(device_id: str, boot_id: str, rows: Sequence[StoredRow]) -> bytes:
    """The upload message for ``rows`` (compact JSON, UTF-8)."""
    message = {"device": device_id, "boot_id": boot_id, "records": [r.record() for r in rows]}
    return json.dumps(message, separators=(",", ":"), ensure_ascii=False).encode()


def _backoff(failures: int) -> float:
    return min(BACKOFF_MAX_S, BACKOFF_INITIAL_S * 2 ** min(failures - 1, 16))
