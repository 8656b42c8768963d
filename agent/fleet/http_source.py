"""One HTTP(S) attempt of an artifact fetch: ``Range`` resume into the .part file, bounded.

Runs in a worker thread (``urllib.request``, no extra dependency). The request asks for
``bytes=<have>-``; a 206 must start there and name the declared total, a 200 (a server that
ignores ``Range``) restarts the file from byte 0. A ``Content-Length`` or total that differs
from the declared length is refused before any byte is written, and a body without one is
cut at the declared length (endless data). HTTPS verifies the certificate and host name
against the system CAs or ``ca_file``; redirects are followed to http(s) URLs only.
"""

from __future__ import annotations

import os
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from http.client import HTTPException, HTTPResponse
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from edgeserve import __version__
from edgeserve.fleet.artifacts import ChunkMap, TransferFailed, TransferRejected
from edgeserve.types import NetworkCounters

_READ = 64 * 1024
_PROGRESS_EVERY = 1024 * 1024


def http_opener(ca_file: str | None) -> urllib.request.OpenerDirector:
    """An opener whose HTTPS verifies the server (system CAs, or ``ca_file``)."""
    context = ssl.create_default_context(cafile=ca_file)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return urllib.request.build_opener(urllib.request.HTTPSHandler(context=context), _Redirects())


def http_attempt(
    opener: urllib.request.OpenerDirector,
    url: str,
    part: Path,
    length: int,
    *,
    timeout_s: float,
    counters: NetworkCounters,
    stop: threading.Event,
    report: Callable[[int], None],
) -> None:
    """Bring ``part`` up to ``length`` bytes from ``url``, or raise ``Transfer*``.

    Returns early (incomplete) once ``stop`` is set; each read waits at most ``timeout_s``.
    """
    have = resume_point(part, part.with_suffix(".chunks"), length)
    if have == length:
        return
    if urlsplit(url).scheme not in ("http", "https"):
        raise TransferRejected("the source url is not http(s)", reason="source")
    request = urllib.request.Request(  # noqa: S310 - the scheme is checked above
        url,
        headers={
            "Range": f"bytes={have}-",
            "Accept-Encoding": "identity",
            "User-Agent": f"edgeserve/{__version__}",
        },
    )
    try:
        with opener.open(request, timeout=timeout_s) as response:
            start = _body_start(response, have, length)
            position = _write_body(response, part, start, length, counters, stop, report)
    except urllib.error.HTTPError as exc:
        exc.close()
        if exc.code == 416:
            _check_total(exc.headers.get("Content-Range"), length)
        raise TransferFailed(f"HTTP {exc.code} {exc.reason}") from None
    except (urllib.error.URLError, OSError, HTTPException) as exc:
        raise TransferFailed(_describe(exc)) from None
    if position < length and not stop.is_set():
        raise TransferFailed(f"the connection ended at byte {position} of {length}")


def resume_point(part: Path, chunks: Path, length: int) -> int:
    """Bytes of ``part`` to keep: its size, or (after MQTT) the chunks before the first gap."""
    if chunks.exists():
        bitmap = ChunkMap.load(chunks, length)
        keep = 0 if bitmap is None else bitmap.prefix_bytes()
        if part.exists():
            with part.open("r+b") as f:
                f.truncate(min(keep, part.stat().st_size))
                os.fsync(f.fileno())
        chunks.unlink()
    if not part.exists():
        return 0
    have = part.stat().st_size
    if have > length:
        part.unlink()
        return 0
    return have


def _body_start(response: HTTPResponse, have: int, length: int) -> int:
    """Where the body starts in the file; refuse a body that cannot fit the declared length."""
    if response.status == 206:
        content_range = response.headers.get("Content-Range", "")
        _check_total(content_range, length)
        first = content_range.removeprefix("bytes ").split("-", 1)[0]
        if first != str(have):
            raise TransferFailed(f"asked for bytes from {have}, got the range {content_range!r}")
        start = have
    else:
        start = 0  # the whole file: a server that ignores Range
    declared = response.headers.get("Content-Length")
    if declared is not None and declared.isdigit() and int(declared) != length - start:
        raise TransferRejected(
            f"wrong length: the server has {start + int(declared)} bytes, "
            f"the document says {length}"
        )
    return start


def _check_total(content_range: str | None, length: int) -> None:
    total = (content_range or "").rpartition("/")[2]
    if total.isdigit() and int(total) != length:
        raise TransferRejected(
            f"wrong length: the server has {total} bytes, the document says {length}"
        )


def _write_body(
    response: HTTPResponse,
    part: Path,
    start: int,
    length: int,
    counters: NetworkCounters,
    stop: threading.Event,
    report: Callable[[int], None],
) -> int:
    """Stream the body into ``part`` from ``start``; return the bytes the file then holds."""
    with part.open("r+b" if part.exists() else "wb") as f:
        f.truncate(start)
        f.seek(start)
        position, reported = start, start
        try:
            while not stop.is_set():
                block = response.read1(min(_READ, length - position + 1))
                if not block:
                    break
                counters.add("artifacts", len(block))
                if position + len(block) > length:
                    raise TransferRejected(f"the server sent more than the declared {length} bytes")
                f.write(block)
                position += len(block)
                if position - reported >= _PROGRESS_EVERY or position == length:
                    report(position)
                    reported = position
        finally:
            f.flush()
            os.fsync(f.fileno())
    return position


def _describe(exc: BaseException) -> str:
    """A one-line reason without a traceback (URLError wraps the socket error)."""
    if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException):
        exc = exc.reason
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = getattr(exc, "strerror", None) or str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class _Redirects(urllib.request.HTTPRedirectHandler):
    """Follows redirects to http(s) only (never ftp:, file:, data:)."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        if urlsplit(newurl).scheme not in ("http", "https"):
            return None
        return super().redirect_request(req, fp, code, msg, headers, newurl)
