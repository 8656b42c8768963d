"""UploadModel's receiving end: an archive the caller streams, spooled into a private file.

The stream is one ``UploadHeader`` and then the archive's bytes. The bytes go into an
anonymous file (``O_TMPFILE``: it never has a name, so nothing is left behind whatever
happens, a kill -9 included) in ``<state_dir>/uploads`` (mode 0700; the file 0600), on
the disk of the store. The servicer hands ``SpooledArchive.path`` (``/proc/self/fd/N``)
to the lifecycle's install, as it hands over a file of archive_dir, and the install
closes it. Everything a caller sends is bounded:

    size   the header declares it; over ``max_bytes`` (the archive size limit) is refused
           before a byte is taken, and a byte more than declared stops the stream
    count  at most ``max_uploads`` spooled files at once; another upload is refused
    time   the RPC deadline; and a stream that sends nothing for ``idle_s`` is cut off
    memory one message at a time (gRPC's 4 MiB receive limit), written out before the next

The client side (``MAX_UPLOAD_BYTES``, ``CHUNK_BYTES``) is in this module too, so that
both ends share one number; it imports nothing heavier than the generated stubs.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from edgeserve.errors import (
    Expired,
    InvalidArgument,
    MessageTooLarge,
    Overloaded,
    StoreError,
    StoreFull,
)

log = logging.getLogger("edgeserve.api")

MAX_UPLOAD_BYTES = 2 << 30
"""The largest archive file UploadModel takes: the archive size limit, which bounds what
an archive unpacks to (``archive.safezip.ArchiveLimits.max_total_bytes``; a test keeps
the two equal)."""
CHUNK_BYTES = 1 << 20
"""Bytes per message the client sends."""
MAX_LABEL_BYTES = 4096
"""The longest file name a header may carry (it only names the upload in messages)."""
MAX_UPLOADS = 2
"""Uploads that may hold a spooled file at the same time."""
IDLE_S = 60.0
"""Seconds an upload may send nothing before the daemon cuts it off."""


def size_text(n: int) -> str:
    """``n`` bytes for a message: ``2147483648 bytes (2 GiB)``."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n} bytes ({n / scale:.3g} {unit})"
    return f"{n} bytes"


def too_large(label: str, size: int, limit: int = MAX_UPLOAD_BYTES) -> str | None:
    """The refusal for an archive of ``size`` bytes, or None when it may be uploaded."""
    if size <= limit:
        return None
    return (
        f"archive '{label}' is {size_text(size)}, over the archive size limit of {size_text(limit)}"
    )


class SpooledArchive:
    """The spooled bytes of one upload: an open anonymous file, readable through ``path``."""

    def __init__(self, fd: int, on_close: Callable[[], None]) -> None:
        self._fd: int | None = fd
        self._on_close = on_close
        self._pending: asyncio.Future[None] | None = None
        self.size = 0

    @property
    def path(self) -> Path:
        if self._fd is None:
            raise ValueError("spooled archive is closed")
        return Path(f"/proc/self/fd/{self._fd}")

    async def write(self, data: bytes) -> None:
        """Append ``data`` (in a thread: a slow disk must not stall the event loop)."""
        assert self._fd is not None, "write after close"  # noqa: S101 (a bug, not input)
        self._pending = asyncio.ensure_future(asyncio.to_thread(_write_all, self._fd, data))
        await asyncio.shield(self._pending)
        self.size += len(data)

    def close(self) -> None:
        """Close the file (its space is freed with it); again is a no-op. A write still in
        its thread finishes first: the descriptor's number must not be reused under it."""
        pending = self._pending
        if pending is not None and not pending.done():
            pending.add_done_callback(self._close_after)
            return
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _close_off_loop(fd, self._on_close)

    def _close_after(self, write: asyncio.Future[None]) -> None:
        _consume(write)
        self.close()


class UploadSpool:
    """Receives uploads into ``folder`` within the bounds above; one per server."""

    def __init__(
        self,
        folder: Path,
        *,
        max_bytes: int = MAX_UPLOAD_BYTES,
        max_uploads: int = MAX_UPLOADS,
        idle_s: float = IDLE_S,
    ) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self._max_uploads = max_uploads
        self._idle_s = idle_s
        self._active = 0

    def prepare(self) -> None:
        """Create the folder, private to the daemon's user."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.folder.stat().st_mode & 0o777 != 0o700:  # a read-only state dir is fine as is
            os.chmod(self.folder, 0o700)

    async def header(self, messages: AsyncIterator[Any]) -> Any:
        """The stream's first message, which must be its header (an ``UploadHeader``)."""
        try:
            async with asyncio.timeout(self._idle_s):
                first = await anext(messages)
        except StopAsyncIteration:
            raise InvalidArgument("UploadModel: the stream is empty (no header)") from None
        except TimeoutError:
            raise Expired(f"UploadModel: no header within {self._idle_s:g} s") from None
        if first.WhichOneof("part") != "header":
            raise InvalidArgument("UploadModel: the first message must be the header")
        header = first.header
        label = header.filename
        if len(label.encode()) > MAX_LABEL_BYTES:
            raise InvalidArgument(f"UploadModel: filename is over {MAX_LABEL_BYTES} bytes")
        if not label.isprintable():
            raise InvalidArgument("UploadModel: filename has control characters")
        if refusal := too_large(label or "upload", header.size, self.max_bytes):
            raise MessageTooLarge(refusal)
        return header

    async def receive(self, label: str, size: int, messages: AsyncIterator[Any]) -> SpooledArchive:
        """Spool exactly ``size`` bytes of chunks; the caller closes what it gets back."""
        if self._active >= self._max_uploads:
            raise Overloaded(
                f"archive '{label}': {self._active} uploads are in progress, the most at "
                "once; try again when one has finished"
            )
        self._active += 1  # counted before the first await: the cap holds across it
        try:
            fd = await fd_off_loop(self._open, label, size)
        except BaseException:
            self._active -= 1
            raise
        spooled = SpooledArchive(fd, on_close=self._closed)
        try:
            await self._fill(spooled, label, size, messages)
        except BaseException:
            spooled.close()
            raise
        return spooled

    def _closed(self) -> None:
        self._active -= 1

    def _open(self, label: str, size: int) -> int:
        """A spool file for ``size`` bytes (file system calls: run in a thread)."""
        free = _free_bytes(self.folder)
        if size > free:
            raise StoreFull(
                f"state dir full: archive '{label}' ({size_text(size)}) does not fit in "
                f"{self.folder} ({size_text(free)} free); nothing was changed"
            )
        try:
            return _anonymous_file(self.folder)
        except OSError as exc:
            raise StoreError.from_os(
                exc, f"archive '{label}': cannot create a file in {self.folder}"
            ) from None

    async def _fill(
        self, spooled: SpooledArchive, label: str, size: int, messages: AsyncIterator[Any]
    ) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(self._idle_s) as timer:
                async for message in messages:
                    if message.WhichOneof("part") != "chunk":
                        raise InvalidArgument(f"archive '{label}': a second header in the stream")
                    if spooled.size + len(message.chunk) > size:
                        raise InvalidArgument(
                            f"archive '{label}': more than the {size} bytes its header declared"
                        )
                    await _write(spooled, label, message.chunk)
                    timer.reschedule(loop.time() + self._idle_s)
        except TimeoutError:
            raise Expired(
                f"archive '{label}': upload stalled, nothing received for {self._idle_s:g} s "
                f"({spooled.size} of {size} bytes)"
            ) from None
        if spooled.size != size:
            raise InvalidArgument(
                f"archive '{label}': the upload ended after {spooled.size} of {size} bytes"
            )


async def _write(spooled: SpooledArchive, label: str, data: bytes) -> None:
    try:
        await spooled.write(data)
    except OSError as exc:  # ENOSPC: StoreFull (RESOURCE_EXHAUSTED), the file is dropped
        raise StoreError.from_os(exc, f"archive '{label}': cannot spool the upload") from None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


async def fd_off_loop(opener: Callable[..., int], *args: Any) -> int:
    """``opener(*args)``, a descriptor, in a thread (opening touches the file system); a
    caller cancelled meanwhile does not leak it: it is closed when the thread is done."""
    opening = asyncio.ensure_future(asyncio.to_thread(opener, *args))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[int]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        os.close(opening.result())


def _close_off_loop(fd: int, then: Callable[[], None]) -> None:
    """Close ``fd``, then call ``then``. The last close of a spooled file frees its space,
    which can take a while for a large one: in a thread when an event loop runs."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        os.close(fd)
        then()
        return
    closing = loop.run_in_executor(None, os.close, fd)

    def closed(future: asyncio.Future[None]) -> None:
        _consume(future)
        then()

    closing.add_done_callback(closed)


def _consume(future: asyncio.Future[None]) -> None:
    """Retrieve a finished write's outcome (its caller has gone: nothing else will)."""
    if not future.cancelled():
        future.exception()


def _free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def _anonymous_file(folder: Path) -> int:
    """A new file in ``folder`` that has no name (mode 0600), open for reading and writing."""
    try:
        return os.open(folder, os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise
    # A file system without O_TMPFILE: a named file, unlinked at once.
    fd, name = tempfile.mkstemp(dir=folder, prefix=".upload-")
    os.unlink(name)
    log.debug("uploads: %s has no O_TMPFILE; used a named file, unlinked", folder)
    return fd
