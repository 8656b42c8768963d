"""Fetch an artifact into the staging dir: bounded, resumable, verified before anyone sees it.

Sources: the retained MQTT chunks of ``fleet/artifacts.py`` or an http(s) URL. Nothing is
ever written past the document's declared ``length``, and the file only gets its final name
after the sha256 over all of it matched. Files in the staging dir (inside the state dir),
per artifact, named by its sha256::

    <sha256>.part    what arrived so far. HTTP writes a contiguous prefix (its size is where
                     the next ``Range: bytes=<size>-`` starts); MQTT writes each chunk at its
                     offset into a file of the declared length.
    <sha256>.chunks  MQTT only: which chunks of .part are on disk (``ChunkMap`` in
                     ``fleet/artifacts.py``). Replaced atomically after .part was fsynced:
                     every 16 chunks and when an attempt ends, so a kill -9 costs at most 16
                     chunks again (``fleet/mqtt_source.py``). A header that does not match
                     discards both files.
    <sha256>.esar    the verified artifact.

A restart calls ``fetch`` again and resumes: HTTP from the .part size, MQTT by subscribing
only to the missing chunks' topics (a window of ``window`` topics at a time; retained
messages arrive on subscribe), so a resumed download moves only what is missing. Switching
source keeps what is usable: an HTTP prefix counts as the chunks wholly inside it, and
chunks up to the first missing one are an HTTP prefix.

Failures. A transient one (connection refused or dropped, timeout, HTTP error status, no
chunk within ``stall_timeout_s`` while the link is up) keeps the partial download and tries
again after a back-off with jitter, up to ``max_attempts``, then raises ``FetchFailed``. The
source sending something other than the document says discards the partial download and
raises ``ArtifactRejected`` at once::

    EdgeserveError
    └── FetchError           the artifact is too large for this device, or no disk space
        ├── FetchFailed      transient failures used up the attempts (partial file kept)
        └── ArtifactRejected more bytes than declared, wrong length, a chunk of the wrong
                             size or beyond the last, sha256 mismatch (partial file discarded)
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import shutil
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from edgeserve.errors import EdgeserveError, InvalidArgument, Kind
from edgeserve.fleet.artifacts import (
    Progress,
    TransferFailed,
    TransferRejected,
    check_length,
    check_sha256,
    hash_file,
)
from edgeserve.fleet.http_source import http_attempt, http_opener
from edgeserve.fleet.link_types import backoff_delay
from edgeserve.fleet.mqtt_source import ChunkReceiver, ChunkTarget
from edgeserve.types import NetworkCounters

if TYPE_CHECKING:
    from edgeserve.fleet.link import FleetLink

log = logging.getLogger("edgeserve.fleet")


class FetchError(EdgeserveError):
    kind = Kind.FAILED_PRECONDITION


class FetchFailed(FetchError):
    kind = Kind.NOT_READY

    def __init__(self, artifact: Artifact, attempts: int, reason: str) -> None:
        super().__init__(
            f"artifact {artifact.label}: fetch failed after {attempts} attempts: {reason} "
            "(the partial download is kept and resumed next time)"
        )


class ArtifactRejected(FetchError):
    kind = Kind.INVALID_ARGUMENT

    def __init__(self, artifact: Artifact, problem: str, reason: str = "length") -> None:
        super().__init__(
            f"artifact {artifact.label} rejected: {problem}; partial download discarded"
        )
        self.reason = reason
        """One word for the reported state: ``length`` or ``sha256`` (``TransferRejected``)."""


@dataclass(frozen=True)
class Artifact:
    """What the fetcher needs of a deployment's model entry; ``url`` None means MQTT chunks."""

    name: str
    version: str
    sha256: str
    length: int
    url: str | None = None

    def __post_init__(self) -> None:
        check_sha256(self.sha256)
        check_length(self.length)
        if self.url is not None and urlsplit(self.url).scheme not in ("http", "https"):
            raise InvalidArgument(f"artifact {self.label}: source url must be http(s)")

    @classmethod
    def from_entry(cls, entry: Mapping[str, Any]) -> Artifact:
        """From a deployment document's model entry (``source``: ``{"mqtt": true}`` or
        ``{"url": "http(s)://..."}``)."""
        source = entry.get("source") or {}
        url = source.get("url") if isinstance(source, Mapping) else None
        if url is None and not (isinstance(source, Mapping) and source.get("mqtt") is True):
            raise InvalidArgument(f"model {entry.get('name')!r}: source must be mqtt or url")
        return cls(
            str(entry.get("name")),
            str(entry.get("version")),
            entry.get("sha256", ""),
            entry.get("length", 0),
            url,
        )

    @property
    def label(self) -> str:
        return f"{self.name} {self.version} ({self.sha256[:12]})"


class Fetcher:
    """Fetches artifacts into ``staging_dir``, which must lie inside ``state_dir``."""

    def __init__(
        self,
        staging_dir: Path,
        *,
        state_dir: Path,
        counters: NetworkCounters,
        max_bytes: int,
        link: FleetLink | None = None,
        http_timeout_s: float = 30.0,
        http_ca_file: str | None = None,
        stall_timeout_s: float = 60.0,
        max_attempts: int = 5,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = 30.0,
        window: int = 8,
    ) -> None:
        staging, state = Path(staging_dir).resolve(), Path(state_dir).resolve()
        if staging == state or not staging.is_relative_to(state):
            raise InvalidArgument(
                f"fleet: the artifact staging dir {staging} must lie inside the state dir {state}"
            )
        if max_attempts < 1 or window < 1 or http_timeout_s <= 0 or stall_timeout_s <= 0:
            raise InvalidArgument("fleet fetcher: attempts, window and timeouts must be > 0")
        self._staging = staging
        self._link = link
        self._counters = counters
        self._max_bytes = max_bytes
        self._http_timeout_s = http_timeout_s
        self._stall_timeout_s = stall_timeout_s
        self._max_attempts = max_attempts
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._window = window
        self._opener = http_opener(http_ca_file)
        self._locks: dict[str, asyncio.Lock] = {}

    async def fetch(
        self, artifact: Artifact, prefix: str, *, progress: Progress | None = None
    ) -> Path:
        """Return ``<staging>/<sha256>.esar``, complete and verified, fetching what is missing."""
        if artifact.length > self._max_bytes:
            raise FetchError(
                f"artifact {artifact.label} is {artifact.length} bytes; this device takes at "
                f"most {self._max_bytes} (fleet.max_artifact_bytes)"
            )
        if artifact.url is None and self._link is None:
            raise FetchError(f"artifact {artifact.label} comes over MQTT, but there is no link")
        async with self._locks.setdefault(artifact.sha256, asyncio.Lock()):
            final = self._staging / f"{artifact.sha256}.esar"
            try:
                await asyncio.to_thread(self._prepare, artifact, final)
            except OSError as exc:
                raise FetchError(
                    f"artifact {artifact.label}: staging dir {self._staging}: {exc.strerror}"
                ) from None
            if final.exists():
                return final
            rand = random.SystemRandom()
            for attempt in range(self._max_attempts):
                try:
                    await self._attempt(artifact, prefix, progress)
                    await self._finish(artifact, final)
                    return final
                except TransferRejected as exc:
                    self._discard(artifact)
                    rejected = ArtifactRejected(artifact, str(exc), exc.reason)
                    log.warning("fleet: %s", rejected)
                    raise rejected from None
                except TransferFailed as exc:
                    reason = str(exc)
                except OSError as exc:  # the staging dir's disk: full, read-only, ...
                    reason = f"{exc.strerror or type(exc).__name__} in {self._staging}"
                log.warning(
                    "fleet: artifact %s, attempt %d: %s", artifact.label, attempt + 1, reason
                )
                if attempt + 1 < self._max_attempts:
                    await asyncio.sleep(backoff_delay(attempt, *self._backoff, rand))
            raise FetchFailed(artifact, self._max_attempts, reason)

    def _paths(self, artifact: Artifact) -> tuple[Path, Path]:
        return (
            self._staging / f"{artifact.sha256}.part",
            self._staging / f"{artifact.sha256}.chunks",
        )

    def _prepare(self, artifact: Artifact, final: Path) -> None:
        """Make the staging dir; keep an existing final file only if it still verifies."""
        self._staging.mkdir(mode=0o700, parents=True, exist_ok=True)
        if final.exists() and hash_file(final) != (artifact.sha256, artifact.length):
            log.warning(
                "fleet: staged artifact %s no longer verifies; fetching again", artifact.label
            )
            final.unlink()
        if final.exists():
            return
        part, _ = self._paths(artifact)
        have = part.stat().st_size if part.exists() else 0
        free = shutil.disk_usage(self._staging).free
        if artifact.length - have > free:
            raise FetchError(
                f"artifact {artifact.label} needs {artifact.length - have} more bytes in "
                f"{self._staging}; {free} are free"
            )

    async def _attempt(self, artifact: Artifact, prefix: str, progress: Progress | None) -> None:
        if artifact.url is None:
            assert self._link is not None  # checked in fetch  # noqa: S101
            part, _ = self._paths(artifact)
            target = ChunkTarget(
                prefix, artifact.sha256, artifact.length, part, self._window, self._stall_timeout_s
            )
            await ChunkReceiver(self._link, target, self._counters, progress).run()
            return
        loop = asyncio.get_running_loop()

        def report(done: int) -> None:
            if progress is not None:
                loop.call_soon_threadsafe(progress, done, artifact.length)

        stop = threading.Event()
        part, _ = self._paths(artifact)
        future = loop.run_in_executor(
            None,
            functools.partial(
                http_attempt,
                self._opener,
                artifact.url,
                part,
                artifact.length,
                timeout_s=self._http_timeout_s,
                counters=self._counters,
                stop=stop,
                report=report,
            ),
        )
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            stop.set()  # the thread stops at its next read (within http_timeout_s)
            await asyncio.wait([future])
            raise

    async def _finish(self, artifact: Artifact, final: Path) -> None:
        part, chunks = self._paths(artifact)
        sha256, length = await asyncio.to_thread(hash_file, part)
        if (sha256, length) != (artifact.sha256, artifact.length):
            raise TransferRejected(
                f"sha256 mismatch: expected {artifact.sha256} ({artifact.length} bytes), "
                f"got {sha256} ({length} bytes)",
                reason="sha256",
            )
        await asyncio.to_thread(_publish_file, part, final)
        chunks.unlink(missing_ok=True)
        log.info("fleet: artifact %s fetched and verified", artifact.label)

    def _discard(self, artifact: Artifact) -> None:
        for path in self._paths(artifact):
            path.unlink(missing_ok=True)


def _publish_file(part: Path, final: Path) -> None:
    """Rename the verified .part to its final name, durably."""
    with part.open("rb") as f:
        os.fsync(f.fileno())
    part.replace(final)
    fd = os.open(final.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
