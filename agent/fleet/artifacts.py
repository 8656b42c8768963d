"""Artifacts as retained MQTT chunks: the protocol both sides share, and the controller's upload.

Protocol. An artifact (a ``.esar`` archive, named by the sha256 of its bytes) of ``length``
bytes is cut into ``chunk_count(length) = ceil(length / CHUNK_BYTES)`` pieces; piece ``n``
(0-based, decimal, no leading zeros) holds bytes ``[n * CHUNK_BYTES, min(length, (n + 1) *
CHUNK_BYTES))`` and is published retained, QoS 1, on ``P/artifacts/<sha256>/<n>``. Every
piece is exactly ``CHUNK_BYTES`` long except the last. ``CHUNK_BYTES`` is a fixed protocol
constant (256 KiB), never configured: the device derives the topics and every piece's size
from the signed document's ``sha256`` and ``length`` alone, and refuses anything else.

256 KiB keeps one message far below Mosquitto's limits and a device's memory (a fetch holds
a few pieces at a time), while a 2 GiB artifact is still only 8192 retained messages. A
broker with a smaller message limit (``message_size_limit``, a cloud broker's 128 KiB) cannot
carry artifacts as chunks: publish them by URL instead (``fleet publish --url-base``).

A fetching device records which chunks it holds in a ``<sha256>.chunks`` sidecar
(``ChunkMap``): ``ESCHUNK1``, the length (8 bytes, big-endian), CHUNK_BYTES (4 bytes),
then one bit per chunk (chunk i is bit i % 8, LSB first, of byte i // 8); ``save``
replaces it atomically (temp file, fsync, rename, fsync of the dir).

Removing an artifact publishes an empty retained payload on each piece's topic, which the
broker takes as "delete the retained message".
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from edgeserve.errors import EdgeserveError, InvalidArgument

if TYPE_CHECKING:
    from edgeserve.fleet.link import FleetLink

log = logging.getLogger("edgeserve.fleet")

CHUNK_BYTES = 256 * 1024
"""Bytes per retained chunk: a fixed protocol constant (changing it is a new protocol)."""
IN_FLIGHT = 8
"""Chunks the controller has handed to the broker and not yet seen PUBACKed (2 MiB)."""
_SHA256 = re.compile(r"[0-9a-f]{64}")
_HASH_READ = 1024 * 1024
_MAP_MAGIC = b"ESCHUNK1"

Progress = Callable[[int, int], None]
"""``progress(bytes_done, bytes_total)``: called as an upload or download advances."""


class TransferFailed(Exception):
    """A fetch attempt failed in a way worth retrying (the partial download is kept)."""


class TransferRejected(Exception):
    """The source sent something other than the document declares (discard, do not retry);
    ``reason`` is the word a deployment is rejected with: ``length`` or ``sha256``."""

    def __init__(self, message: str, reason: str = "length") -> None:
        super().__init__(message)
        self.reason = reason


class ArtifactChanged(EdgeserveError):
    """The file changed between hashing it and publishing it."""

    def __init__(self, path: Path) -> None:
        super().__init__(
            f"artifact {path} changed while it was being published; its chunks were removed"
        )


def check_sha256(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
        raise InvalidArgument(f"artifact sha256 must be 64 lowercase hex digits, got {sha256!r}")
    return sha256


def check_length(length: int) -> int:
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise InvalidArgument(f"artifact length must be a positive integer, got {length!r}")
    return length


def chunk_count(length: int) -> int:
    """How many chunks an artifact of ``length`` bytes has: ceil(length / CHUNK_BYTES)."""
    return -(-check_length(length) // CHUNK_BYTES)


def chunk_size(length: int, index: int) -> int:
    """The exact size of chunk ``index`` of an artifact of ``length`` bytes."""
    count = chunk_count(length)
    if not 0 <= index < count:
        raise InvalidArgument(f"chunk {index} is out of range: the artifact has {count} chunks")
    return min(CHUNK_BYTES, length - index * CHUNK_BYTES)


def chunk_topic(prefix: str, sha256: str, index: int) -> str:
    """``P/artifacts/<sha256>/<n>``."""
    return f"{prefix}/artifacts/{check_sha256(sha256)}/{index}"


def hash_file(path: Path) -> tuple[str, int]:
    """(sha256 hex, length) of a file, read in 1 MiB pieces (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    length = 0
    with path.open("rb") as f:
        while block := f.read(_HASH_READ):
            digest.update(block)
            length += len(block)
    return digest.hexdigest(), length


async def publish_artifact(
    link: FleetLink,
    prefix: str,
    path: Path,
    *,
    progress: Progress | None = None,
    in_flight: int = IN_FLIGHT,
) -> tuple[str, int]:
    """Publish ``path`` as retained chunks under ``prefix``; return its (sha256, length).

    The file is streamed twice, never held whole: once to hash it (the topics are named by
    the hash), once to publish, chunk by chunk, with at most ``in_flight`` chunks awaiting
    their PUBACK. The second pass hashes again; a file that changed in between is refused
    and what was published under the first hash is deleted. Republishing is idempotent.
    """
    if in_flight < 1:
        raise InvalidArgument(f"in_flight must be >= 1, got {in_flight}")
    try:
        sha256, length = await asyncio.to_thread(hash_file, path)
    except OSError as exc:
        raise InvalidArgument(f"cannot read artifact {path}: {exc.strerror or exc}") from None
    if length == 0:
        raise InvalidArgument(f"artifact {path} is empty")
    log.info(
        "fleet: publishing artifact %s (%d bytes, %d chunks)", sha256, length, chunk_count(length)
    )
    try:
        with path.open("rb") as f:
            again = await _publish_chunks(link, prefix, sha256, length, f, progress, in_flight)
    except OSError as exc:
        raise InvalidArgument(f"cannot read artifact {path}: {exc.strerror or exc}") from None
    if again != sha256:
        await delete_artifact(link, prefix, sha256, length)
        raise ArtifactChanged(path)
    return sha256, length


async def _publish_chunks(
    link: FleetLink,
    prefix: str,
    sha256: str,
    length: int,
    f: BinaryIO,
    progress: Progress | None,
    in_flight: int,
) -> str:
    """Publish each chunk read from ``f``; return the sha256 of what was read."""
    digest = hashlib.sha256()
    window = _Window(in_flight)
    done = 0

    def advanced(n: int) -> None:
        nonlocal done
        done += n
        if n and progress is not None:
            progress(done, length)

    try:
        for index in range(chunk_count(length)):
            size = chunk_size(length, index)
            payload = await asyncio.to_thread(f.read, size)
            digest.update(payload)
            if len(payload) != size:
                return digest.hexdigest()  # shorter than hashed: the caller refuses it
            topic = chunk_topic(prefix, sha256, index)
            advanced(await window.add(link.publish(topic, payload, qos=1, retain=True), size))
        advanced(await window.drain())
        if await asyncio.to_thread(f.read, 1):
            digest.update(b"\0")  # longer than hashed: the caller refuses it
        return digest.hexdigest()
    finally:
        await window.cancel()


async def delete_artifact(
    link: FleetLink, prefix: str, sha256: str, length: int, *, in_flight: int = IN_FLIGHT
) -> None:
    """Remove an artifact's retained chunks (an empty retained payload on each topic)."""
    window = _Window(in_flight)
    try:
        for index in range(chunk_count(length)):
            topic = chunk_topic(prefix, sha256, index)
            await window.add(link.publish(topic, b"", qos=1, retain=True), 0)
        await window.drain()
    finally:
        await window.cancel()
    log.info("fleet: removed artifact %s (%d chunks)", sha256, chunk_count(length))


class _Window:
    """At most ``size`` publishes awaiting their PUBACK; the first failure is raised."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._pending: dict[asyncio.Future[None], int] = {}

    async def add(self, publish: Coroutine[Any, Any, None], nbytes: int) -> int:
        """Start ``publish`` once there is room; return the bytes acknowledged meanwhile."""
        acked = 0
        while len(self._pending) >= self._size:
            acked += await self._settle(asyncio.FIRST_COMPLETED)
        self._pending[asyncio.ensure_future(publish)] = nbytes
        return acked

    async def drain(self) -> int:
        return await self._settle(asyncio.ALL_COMPLETED) if self._pending else 0

    async def cancel(self) -> None:
        for task in self._pending:
            task.cancel()
        await asyncio.gather(*self._pending, return_exceptions=True)
        self._pending.clear()

    async def _settle(self, when: str) -> int:
        done, _ = await asyncio.wait(self._pending, return_when=when)
        acked = sum(self._pending.pop(task) for task in done)
        errors = [e for task in done if (e := task.exception()) is not None]
        if errors:
            raise errors[0]
        return acked


class ChunkMap:
    """Which chunks of an artifact are on disk: the ``.chunks`` sidecar (format above)."""

    def __init__(self, length: int, bits: bytearray | None = None) -> None:
        self.length = length
        self.count = chunk_count(length)
        self.bits = bits if bits is not None else bytearray((self.count + 7) // 8)

    @classmethod
    def load(cls, path: Path, length: int) -> ChunkMap | None:
        """The sidecar's map, or None when it is missing, torn or for another layout."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        header = _MAP_MAGIC + length.to_bytes(8, "big") + CHUNK_BYTES.to_bytes(4, "big")
        bitmap = cls(length)
        if data[: len(header)] != header or len(data) != len(header) + len(bitmap.bits):
            return None
        bitmap.bits[:] = data[len(header) :]
        return bitmap

    @classmethod
    def from_prefix(cls, length: int, have: int) -> ChunkMap:
        """The chunks wholly inside the first ``have`` bytes (an HTTP download's prefix)."""
        bitmap = cls(length)
        for index in range(bitmap.count):
            if index * CHUNK_BYTES + chunk_size(length, index) <= have:
                bitmap.set(index)
        return bitmap

    def has(self, index: int) -> bool:
        return bool(self.bits[index // 8] & (1 << (index % 8)))

    def set(self, index: int) -> None:
        self.bits[index // 8] |= 1 << (index % 8)

    def missing(self) -> list[int]:
        return [i for i in range(self.count) if not self.has(i)]

    def prefix_bytes(self) -> int:
        missing = self.missing()
        return min(self.length, (missing[0] if missing else self.count) * CHUNK_BYTES)

    def save(self, path: Path) -> None:
        """Replace the sidecar atomically (temp file, fsync, rename, fsync the dir)."""
        temp = path.with_name(path.name + ".tmp")
        header = _MAP_MAGIC + self.length.to_bytes(8, "big") + CHUNK_BYTES.to_bytes(4, "big")
        with temp.open("wb") as f:
            f.write(header + bytes(self.bits))
            f.flush()
            os.fsync(f.fileno())
        temp.replace(path)
        _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
