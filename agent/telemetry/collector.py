"""The controller's collector: device telemetry from the broker into the records file.

The MQTT side is injected (a ``Subscriber``: ``fleet/link.FleetLink`` in the CLI, wired
by ``cli/fleet.py``), as the device's uploader gets its publisher; this module never
imports ``fleet/``. The link PUBACKs a QoS 1 message only after its handler returned, and
the handler returns only after the batch is committed (``RecordStore.store`` in a
thread): a collector that dies before the commit gets the message again from its
persistent session, and the ``(device, id)`` key makes the second copy a no-op.

A message that is not a telemetry batch is counted and skipped (acked: it would never
get better), logged by topic and size only, never with its payload. When another writer
holds the database lock the handler retries until it can write or the collector stops;
any other storage failure stops the collector with the message unacked. Once stopping, a
handler neither stores nor returns: ``close()`` of the link cancels it, so the message
stays with the broker for the next run.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

from edgeserve.errors import InvalidArgument
from edgeserve.telemetry.collection import (
    Batch,
    MalformedTelemetry,
    RecordStore,
    StoreBusy,
    decode_batch,
    iso,
)

log = logging.getLogger("edgeserve.telemetry")

Handler = Callable[[str, bytes, bool], Awaitable[None] | None]
BUSY_RETRY_S = (0.05, 1.0)  # first and longest wait between tries while the file is locked


class Subscriber(Protocol):
    async def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None: ...


@dataclass
class CollectorCounts:
    messages: int = 0
    stored: int = 0
    """Rows inserted (duplicates not counted)."""
    duplicates: int = 0
    malformed: int = 0
    """Messages that were not telemetry batches, or held records that were not records."""


def telemetry_filters(prefix: str, devices: Sequence[str]) -> list[str]:
    """``P/devices/+/telemetry``, or one filter per named device."""
    if not prefix or any(c in prefix for c in "+#") or prefix.startswith("/"):
        raise InvalidArgument(f"topic prefix: must be a plain topic, got {prefix!r}")
    for device in devices:
        if not device or any(c in device for c in "+#/"):
            raise InvalidArgument(f"device id: must be a plain name, got {device!r}")
    names = sorted(set(devices)) or ["+"]
    return [f"{prefix}/devices/{name}/telemetry" for name in names]


class Collector:
    """Subscribes to device telemetry and stores each record once (module docstring)."""

    def __init__(
        self,
        subscriber: Subscriber,
        store: RecordStore,
        *,
        topic_prefix: str,
        devices: Sequence[str] = (),
        wall_clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._subscriber = subscriber
        self._store = store
        self._prefix = topic_prefix
        self._filters = telemetry_filters(topic_prefix, devices)
        self._clock = wall_clock
        self._stopping = asyncio.Event()
        self._idle = asyncio.Lock()  # held while a batch is being stored
        self._failure: Exception | None = None
        self.counts = CollectorCounts()

    @property
    def failure(self) -> Exception | None:
        """The storage error that stopped the collector, if one did."""
        return self._failure

    async def subscribe(self) -> None:
        """Subscribe to every filter (waits for each SUBACK while connected)."""
        for topic_filter in self._filters:
            await self._subscriber.subscribe(topic_filter, self._handle, 1)

    async def wait_stopping(self) -> None:
        await self._stopping.wait()

    def stop(self) -> None:
        """Ask to stop (a signal handler may call it); the current batch still finishes."""
        self._stopping.set()

    async def finish(self) -> None:
        """Wait for the batch being stored, if any; later messages stay unacked."""
        self._stopping.set()
        async with self._idle:
            pass

    async def _handle(self, topic: str, payload: bytes, _retained: bool) -> None:
        if self._stopping.is_set():
            await _forever()  # cancelled by the link's close(): no ack
        self.counts.messages += 1
        device = self._device(topic)
        try:
            if device is None:
                raise MalformedTelemetry("topic is not <prefix>/devices/<id>/telemetry")
            batch = decode_batch(device, payload)
        except MalformedTelemetry as exc:
            self.counts.malformed += 1
            log.warning(
                "collector: skipped a message on %s (%d bytes): %s", topic, len(payload), exc
            )
            return
        if batch.bad_records:
            self.counts.malformed += 1
            log.warning("collector: %d malformed records skipped on %s", batch.bad_records, topic)
        async with self._idle:
            stored = await self._store_batch(batch)
        if stored is None:
            await _forever()
            return
        self.counts.stored += stored
        self.counts.duplicates += len(batch.records) - stored

    async def _store_batch(self, batch: Batch) -> int | None:
        """Rows stored; None when stopping or after a storage failure (the message stays)."""
        delay, longest = BUSY_RETRY_S
        warned = False
        while True:
            try:
                return await asyncio.to_thread(self._store.store, batch, iso(self._clock()))
            except StoreBusy:
                if not warned:
                    log.warning("collector: the records file is locked by another writer; waiting")
                    warned = True
            except Exception as exc:  # noqa: BLE001 - any storage failure ends collecting
                self._failure = exc
                log.error("collector: cannot store telemetry: %s", exc)
                self._stopping.set()
                return None
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return None
            except TimeoutError:
                delay = min(delay * 2, longest)

    def _device(self, topic: str) -> str | None:
        head = f"{self._prefix}/devices/"
        if not topic.startswith(head) or not topic.endswith("/telemetry"):
            return None
        device = topic[len(head) : -len("/telemetry")]
        return device if device and "/" not in device else None


async def _forever() -> None:
    await asyncio.get_running_loop().create_future()
