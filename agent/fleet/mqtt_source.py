"""One MQTT attempt of an artifact fetch: retained chunks written at their offsets.

The receiver first subscribes to the index one past the last chunk (a retained message
there means the broker holds a longer artifact under this hash: refused), then to the
missing chunks' topics, ``window`` at a time, each unsubscribed once its chunk is on disk.
Retained messages arrive on subscribe; the link resubscribes after a reconnect, so an
outage only pauses the attempt. Chunks may arrive in any order and more than once (written
once). A chunk of the wrong size or beyond the last raises ``TransferRejected``; no chunk
within ``stall_timeout_s`` while connected raises ``TransferFailed``. Handlers never raise
(the link would log a traceback): they record the failure and wake the attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from edgeserve.fleet.artifacts import (
    CHUNK_BYTES,
    ChunkMap,
    Progress,
    TransferFailed,
    TransferRejected,
    chunk_size,
    chunk_topic,
)
from edgeserve.fleet.link_types import LinkError
from edgeserve.types import NetworkCounters

if TYPE_CHECKING:
    from edgeserve.fleet.link import FleetLink

CHECKPOINT = 16
"""MQTT chunks written between two checkpoints of the .chunks sidecar (4 MiB)."""


class ChunkFile:
    """The .part file and its map; chunks are written from worker threads, closed on the loop.

    The map is checkpointed (``.part`` fsynced, then the sidecar replaced atomically) every
    CHECKPOINT chunks and at close, so a kill -9 costs at most CHECKPOINT chunks again.
    """

    def __init__(self, part: Path, sidecar: Path, length: int) -> None:
        bitmap = ChunkMap.load(sidecar, length) if part.exists() else None
        if bitmap is None:  # none yet: take what an HTTP prefix holds; torn: start afresh
            have = part.stat().st_size if part.exists() and not sidecar.exists() else 0
            bitmap = ChunkMap.from_prefix(length, have if have <= length else 0)
            bitmap.save(sidecar)  # before .part grows: HTTP must not read it as a prefix
        self.map = bitmap
        self._sidecar = sidecar
        self._lock = threading.Lock()
        self._fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o600)
        os.ftruncate(self._fd, length)
        self._dirty = 0
        self._closed = False

    def write(self, index: int, payload: bytes) -> bool:
        """Write chunk ``index`` at its offset; False when the file was closed meanwhile."""
        with self._lock:
            if self._closed:
                return False
            view, offset = memoryview(payload), index * CHUNK_BYTES
            while view:
                written = os.pwrite(self._fd, view, offset)
                view, offset = view[written:], offset + written
            self.map.set(index)
            self._dirty += 1
            if self._dirty >= CHECKPOINT:
                self._checkpoint()
            return True

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                try:
                    self._checkpoint()
                finally:
                    os.close(self._fd)

    def _checkpoint(self) -> None:
        if self._dirty:
            os.fsync(self._fd)  # the data first, then the map that claims it
            self.map.save(self._sidecar)
            self._dirty = 0


@dataclass(frozen=True)
class ChunkTarget:
    """Which artifact to receive, where, and how patiently."""

    prefix: str
    sha256: str
    length: int
    part: Path
    window: int
    stall_timeout_s: float


class ChunkReceiver:
    """One MQTT attempt: a window of chunk subscriptions over what is still missing."""

    def __init__(
        self,
        link: FleetLink,
        target: ChunkTarget,
        counters: NetworkCounters,
        progress: Progress | None,
    ) -> None:
        self._link, self._target, self._counters = link, target, counters
        self._progress = progress
        self._topics: dict[str, int] = {}  # subscribed chunk topic -> index
        self._wake = asyncio.Event()
        self._failure: Exception | None = None
        self._last = time.monotonic()
        self._file: ChunkFile | None = None
        self._done = 0

    async def run(self) -> None:
        part, sidecar = self._target.part, self._target.part.with_suffix(".chunks")
        try:
            self._file = ChunkFile(part, sidecar, self._target.length)
        except OSError as exc:
            raise TransferFailed(f"cannot open {part}: {exc.strerror}") from None
        try:
            await self._receive(self._file)
        finally:
            for topic in list(self._topics):
                await self._link.unsubscribe(topic)
            self._topics.clear()
            self._file.close()

    async def _receive(self, file: ChunkFile) -> None:
        length, window = self._target.length, self._target.window
        missing = file.map.missing()
        self._done = length - sum(chunk_size(length, i) for i in missing)
        # First the index one past the last: a retained chunk there means a longer artifact.
        await self._subscribe(file.map.count)
        missing.reverse()
        while True:
            if self._failure is not None:
                raise self._failure
            while missing and len(self._topics) <= window:
                await self._subscribe(missing.pop())
            if len(self._topics) == 1 and not missing:
                return  # only the sentinel is left
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation
            # that lands as the wake-up does, and the attempt would outlive its caller.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            self._wake.clear()
            now = time.monotonic()
            if not self._link.connected:
                self._last = now  # offline is not a stall: the link resubscribes on reconnect
            elif now - self._last > self._target.stall_timeout_s:
                left = len(missing) + len(self._topics) - 1
                raise TransferFailed(
                    f"no chunk arrived for {self._target.stall_timeout_s} s "
                    f"({left} of {file.map.count} chunks missing)"
                )

    async def _subscribe(self, index: int) -> None:
        topic = chunk_topic(self._target.prefix, self._target.sha256, index)
        self._topics[topic] = index  # before SUBSCRIBE: the retained chunk may come at once
        try:
            async with asyncio.timeout(self._target.stall_timeout_s):
                await self._link.subscribe(topic, self._on_chunk)
        except TimeoutError:
            raise TransferFailed(f"no SUBACK for {topic}") from None
        except LinkError as exc:
            raise TransferFailed(str(exc)) from None

    async def _on_chunk(self, topic: str, payload: bytes, _retained: bool) -> None:
        index, file, length = self._topics.get(topic), self._file, self._target.length
        if index is None or file is None or self._failure is not None:
            return
        self._counters.add("artifacts", len(payload))
        if index == file.map.count:
            if payload:
                self._fail(
                    TransferRejected(
                        f"the broker holds chunk {index}, beyond the last of {file.map.count} "
                        f"chunks ({length} bytes declared)",
                    )
                )
            return
        expected = chunk_size(length, index)
        if not payload:
            self._fail(TransferFailed(f"chunk {index} was removed from the broker"))
            return
        if len(payload) != expected:
            self._fail(
                TransferRejected(f"chunk {index} is {len(payload)} bytes; it must be {expected}")
            )
            return
        if not file.map.has(index):
            try:
                if not await asyncio.to_thread(file.write, index, payload):
                    return
            except OSError as exc:
                self._fail(TransferFailed(f"cannot write chunk {index}: {exc.strerror}"))
                return
            self._done += expected
            if self._progress is not None:
                self._progress(self._done, length)
        if self._topics.pop(topic, None) is not None:
            await self._link.unsubscribe(topic)
        self._last = time.monotonic()
        self._wake.set()

    def _fail(self, failure: Exception) -> None:
        self._failure = failure
        self._wake.set()
