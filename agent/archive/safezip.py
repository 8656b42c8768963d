"""Zip files a hostile sender cannot abuse: the rules every archive read goes through.

    open_zip(path)                 missing, not a zip, truncated -> ArchiveError
    scan_members(zf, source, lim)  every entry checked before a byte is read:
                                   names (``..``, absolute paths, backslashes, drive
                                   letters, NUL and other control characters,
                                   duplicates, a file that is also a
                                   directory), types (symlinks and other non-regular
                                   entries, from ``external_attr``), encryption, odd
                                   compression, member count, and zip bombs (a bound on
                                   the total uncompressed size, and on the expansion
                                   ratio of large archives)
    read_member / iter_member      a member's bytes, bounded by its declared size, CRC
                                   checked

Every error is an ``ArchiveError`` naming the file, the problem and the member (as
``shown``: control characters escaped, cut at ``errors.ECHO_LIMIT``); ``what`` says what kind of
file it is ("archive", "TorchServe archive"). Both the model archive
(``archive``) and TorchServe ``.mar`` import (``mar``) read zips through this module.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import zipfile
import zlib
from collections.abc import Generator, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from edgeserve.errors import ArchiveError, clip

CHUNK = 1 << 20
"""Bytes read or written at a time when streaming members."""
_DRIVE_RE = re.compile(r"^[A-Za-z]:")
_COMPRESSIONS = (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)


@dataclass(frozen=True)
class ArchiveLimits:
    """Bounds that make a hostile archive fail before it fills the disk."""

    max_total_bytes: int = 2 << 30
    """Sum of the members' uncompressed sizes."""
    max_ratio: float = 100.0
    """Uncompressed total / archive file size, checked once the total passes ``ratio_floor``."""
    ratio_floor_bytes: int = 16 << 20
    """Archives that unpack to less than this are never refused for their ratio."""
    max_members: int = 10_000
    max_manifest_bytes: int = 1 << 20


DEFAULT_LIMITS = ArchiveLimits()


def _fail(source: str, problem: str, what: str) -> ArchiveError:
    return ArchiveError(f"{what} '{source}': {problem}")


def shown(name: str) -> str:
    """A member name for a message: control characters escaped (a NUL reads ``\\x00``),
    cut by ``errors.clip``, so a hostile name cannot garble a log line or a status message."""
    return clip("".join(c if c.isprintable() else ascii(c)[1:-1] for c in name))


def member_name_problem(name: str) -> str | None:
    """Why ``name`` is not a safe relative member path, or None when it is."""
    if not name:
        return "has an empty name"
    if "\\" in name:
        return "contains a backslash"
    if "\x00" in name:
        return "contains a NUL byte"
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return "contains a control character"
    if name.startswith("/") or _DRIVE_RE.match(name):
        return "is an absolute path"
    parts = name.split("/")
    if ".." in parts:
        return "escapes the archive ('..')"
    if any(part in ("", ".") for part in parts):
        return "is not a normalised relative path"
    return None


@contextlib.contextmanager
def open_zip(path: Path, what: str = "archive") -> Iterator[zipfile.ZipFile]:
    """``path`` open as a zip (closed on exit); ArchiveError when it is missing, not a
    regular file, not a zip or truncated. Opened O_NONBLOCK and checked with fstat first,
    so a FIFO is refused at once instead of waiting for a writer."""
    source = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise _fail(source, "does not exist", what) from None
    except OSError as exc:
        raise _fail(source, f"cannot be read ({exc.strerror})", what) from None
    with os.fdopen(fd, "rb") as file:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise _fail(source, "is a directory, not an archive file", what)
        if not stat.S_ISREG(mode):
            raise _fail(source, "is not a regular file", what)
        os.set_blocking(fd, True)
        try:
            zf = zipfile.ZipFile(file)
        except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as exc:
            raise _fail(source, f"is not a zip file or is truncated ({exc})", what) from None
        except OSError as exc:
            raise _fail(source, f"cannot be read ({exc.strerror})", what) from None
        with zf:
            yield zf


def scan_members(
    zf: zipfile.ZipFile,
    source: str,
    limits: ArchiveLimits,
    *,
    allow_dirs: bool = False,
    what: str = "archive",
) -> dict[str, zipfile.ZipInfo]:
    """Check every entry's name, type, flags and size; return the regular files by name."""
    entries = zf.infolist()
    if len(entries) > limits.max_members:
        raise _fail(source, f"has {len(entries)} members (limit {limits.max_members})", what)
    files: dict[str, zipfile.ZipInfo] = {}
    seen: set[str] = set()
    total = 0
    for info in entries:
        # zipfile cuts a name at its first NUL (``filename``); the name as stored is
        # ``orig_filename``, and a NUL there is refused, not silently cut away.
        raw = info.orig_filename
        is_dir = raw.endswith("/")
        name = raw[:-1] if is_dir else raw
        problem = member_name_problem(name) or _entry_problem(info, is_dir, allow_dirs)
        if problem is None and name in seen:
            problem = "is a duplicate name"
        if problem:
            raise _fail(source, f"member '{shown(raw)}' {problem}", what)
        seen.add(name)
        total += info.file_size
        if not is_dir:
            files[name] = info
    _check_no_prefix_clash(files, source, what)
    size = os.fstat(zf.fp.fileno()).st_size if zf.fp is not None else 0
    _check_expansion(total, size, limits, source, what)
    return files


def _check_expansion(total: int, size: int, limits: ArchiveLimits, source: str, what: str) -> None:
    """Zip bombs: a bound on the unpacked total, and on the ratio of large archives."""
    if total > limits.max_total_bytes:
        raise _fail(
            source,
            f"unpacks to {total} bytes, over the limit of {limits.max_total_bytes} (zip bomb?)",
            what,
        )
    if total > limits.ratio_floor_bytes and total > limits.max_ratio * max(size, 1):
        raise _fail(
            source,
            f"unpacks to {total} bytes from {size} ({total / max(size, 1):.0f}x, limit "
            f"{limits.max_ratio:.0f}x): zip bomb?",
            what,
        )


def _entry_problem(info: zipfile.ZipInfo, is_dir: bool, allow_dirs: bool) -> str | None:
    mode = info.external_attr >> 16
    kind = stat.S_IFMT(mode)
    if stat.S_ISLNK(mode):
        return "is a symbolic link"
    if is_dir or stat.S_ISDIR(mode):
        return None if allow_dirs and is_dir else "is a directory entry"
    if kind and not stat.S_ISREG(mode):
        return "is not a regular file"
    if info.flag_bits & 0x1:
        return "is encrypted"
    if info.compress_type not in _COMPRESSIONS:
        return f"uses unsupported compression method {info.compress_type}"
    return None


def _check_no_prefix_clash(files: Mapping[str, object], source: str, what: str) -> None:
    for name in files:
        parts = name.split("/")
        for i in range(1, len(parts)):
            parent = "/".join(parts[:i])
            if parent in files:
                raise _fail(
                    source, f"member '{shown(parent)}' is both a file and a directory", what
                )


def read_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, limit: int, what: str = "archive"
) -> bytes:
    """A member's bytes, refusing more than ``limit``."""
    if info.file_size > limit:
        raise _fail(source, f"member '{shown(info.filename)}' is larger than {limit} bytes", what)
    chunks = list(iter_member(zf, info, source, what))
    data = b"".join(chunks)
    if len(data) > limit:
        raise _fail(source, f"member '{shown(info.filename)}' is larger than {limit} bytes", what)
    return data


def iter_member(
    zf: zipfile.ZipFile, info: zipfile.ZipInfo, source: str, what: str = "archive"
) -> Generator[bytes, None, None]:
    """Stream a member; more bytes than the header declares, or a bad CRC, is an error."""
    read = 0
    try:
        with zf.open(info) as stream:
            while chunk := stream.read(CHUNK):
                read += len(chunk)
                if read > info.file_size:
                    raise _fail(
                        source, f"member '{shown(info.filename)}' exceeds its declared size", what
                    )
                yield chunk
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError) as exc:
        raise _fail(source, f"member '{shown(info.filename)}' is corrupt ({exc})", what) from None
