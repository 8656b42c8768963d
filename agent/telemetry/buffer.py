"""The telemetry buffer: one SQLite file that keeps rows until the uploader's PUBACK.

Rows come in three classes, ``event`` > ``rollup`` > ``sample``. Nothing expires by age;
only the byte budget ``max_bytes`` (``PRAGMA max_page_count`` on every connection, plus
the check below) forces rows out. When the pages in use pass 85 % of the budget, samples
not thinned before lose every other row, then the oldest rows of the lowest class present
go until use is 15 % (at most 1 MiB) under that mark; one write drops at most
``MAX_DROPS_PER_WRITE`` rows. The measure is pages in use, so thinning frees space only
where samples fill whole pages; mixed with rollups, the oldest samples then go. Events are
never dropped. Each drop is written as an
``event`` of kind ``drop`` with the body ``{class, count, first_id, last_id, first_time,
last_time}``; it is merged into the previous drop event of its class while that one is
unsent and not handed out by ``pending()``, never after.

Ids are ``AUTOINCREMENT`` and unique per device forever: ``<db>.hwm``
(``telemetry/id_mark.py``) holds a reservation above every id ever issued, and a fresh
file (first start, a deleted or a corrupt one) starts above it, with a ``buffer_reset``
event that says why.
A corrupt file at open is moved aside to ``<db>.corrupt-<UTC time>`` (with its -wal and
-shm); opening never raises for a bad file. Writes fail soft: disk full, I/O errors and a
read-only file make ``append``/``acknowledge`` return False and count a write failure, and
the next call tries again.

Every method is synchronous and may block on disk I/O: the owner calls them off the event
loop (``asyncio.to_thread`` or one worker thread). The connection may be used from any
thread; a lock lets one call in at a time. This is the only module that imports
``sqlite_utils`` or ``sqlite3``; the rows it takes and gives, without SQLite, are in
``telemetry/rows.py``.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Generator, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

from sqlite_utils import Database, Migrations

from edgeserve.telemetry.id_mark import read_id_mark, write_id_mark
from edgeserve.telemetry.rows import (
    CLASSES,
    BufferStats,
    Drop,
    Row,
    StoredRow,
    canonical_time,
    iso_time,
)

LOG = logging.getLogger("edgeserve.telemetry")

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
MIN_MAX_BYTES = 64 * 1024
WAL_LIMIT_BYTES = 4 * 1024 * 1024  # journal_size_limit: the file stays within budget + this
HIGH_WATER, LOW_WATER = 0.85, 0.70  # fractions of max_bytes: start dropping, stop dropping
MAX_DROPS_PER_WRITE = 2048  # rows one write may drop: bounds its time and its WAL
_MAX_STEP_BYTES = 1024 * 1024  # below the high-water mark a drop aims for, at most
HWM_BLOCK = 4096  # ids reserved in <db>.hwm at a time: one fsync per this many ids
_ROW_OVERHEAD = 64  # bytes a row costs beyond its body: time, kind, record header, index
_CORRUPT_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
_BUSY_TIMEOUT_S = 2.0
_INSERT = "INSERT INTO records (class, kind, time, body, bytes) VALUES (?, ?, ?, ?, ?)"

MIGRATIONS = Migrations("edgeserve.telemetry")


@MIGRATIONS(name="0001_records_and_meta")
def _create_schema(db: Database) -> None:
    # Plain SQL: sqlite-utils' create() cannot say AUTOINCREMENT, and without it SQLite
    # reuses the ids of deleted newest rows.
    db.execute(
        "CREATE TABLE records (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " class TEXT NOT NULL CHECK (class IN ('event', 'rollup', 'sample')),"
        " kind TEXT NOT NULL, time TEXT NOT NULL, body TEXT NOT NULL, bytes INTEGER NOT NULL)"
    )
    db.execute("CREATE INDEX records_class_id ON records (class, id)")
    db.table("meta").create({"key": str, "value": str}, pk="key")


class _CorruptFile(Exception):
    """The file at open is not a sound SQLite database."""


class TelemetryBuffer:
    """The device's telemetry spool (see the module docstring)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(
                f"max_bytes: must be at least {MIN_MAX_BYTES} (64 KiB), got {max_bytes}"
            )
        self._path = Path(path)
        self._hwm_path = Path(f"{self._path}.hwm")
        self._max_bytes = max_bytes
        self._clock = wall_clock
        self._lock = threading.Lock()
        self._db: Database | None = None
        self._page_size = 4096
        self._failures = 0
        self._saved_failures = 0
        self._reserved = 0
        self._last_id = 0
        self._queued: list[Row] = []
        self._handed_out: set[int] = set()
        with self._lock:
            self._open()

    @property
    def path(self) -> Path:
        return self._path

    @property
    def last_id(self) -> int:
        """The highest id issued by this file so far (0 before the first)."""
        return self._last_id

    def append(self, rows: Iterable[Row]) -> bool:
        """Store rows in one transaction with the bounds and drop events; False on failure.

        A bad row (unknown class, a body that is not a JSON object) raises ValueError before
        anything is written; a storage failure is counted and returns False.
        """
        with self._lock:
            encoded = [self._encode(r) for r in [*self._queued, *rows]]
            if not encoded:
                return True
            if not self._ready():
                self._failures += 1
                return False
            try:
                self._write(self._checked_db(), encoded)
            except (sqlite3.Error, OSError) as exc:
                self._failures += 1
                LOG.warning(
                    "telemetry write failed (%s); %d so far", _describe(exc), self._failures
                )
                return False
            self._queued.clear()
            return True

    def pending(self, max_bytes: int, live_after_id: int) -> list[StoredRow]:
        """Rows to send: ids above ``live_after_id`` first, then the backlog, each part by
        class (event, rollup, sample) and oldest first; at most ``max_bytes`` of
        ``wire_size`` (but always one row when any waits). Send one batch at a time: the
        next call returns the same rows until they are acknowledged."""
        with self._lock:
            if not self._ready():
                return []
            out: list[StoredRow] = []
            total = 0
            rows = self._ordered(self._checked_db(), live_after_id)
            try:
                for row in rows:
                    if out and total + row.wire_size > max_bytes:
                        break
                    out.append(row)
                    total += row.wire_size
            except sqlite3.Error as exc:
                LOG.warning("telemetry read failed (%s)", _describe(exc))
                return []
            finally:
                rows.close()
            self._handed_out.update(r.id for r in out if r.kind == "drop")
            return out

    def acknowledge(self, ids: Iterable[int]) -> bool:
        """Delete exactly these rows (after their PUBACK) and note the upload time."""
        wanted = sorted(set(ids))
        if not wanted:
            return True
        with self._lock:
            if not self._ready():
                self._failures += 1
                return False
            db = self._checked_db()
            try:
                with db.atomic():
                    db.conn.executemany("DELETE FROM records WHERE id = ?", [(i,) for i in wanted])
                    _meta_set(db, "last_upload", self._now())
            except (sqlite3.Error, OSError) as exc:
                self._failures += 1
                LOG.warning("telemetry acknowledge failed (%s)", _describe(exc))
                return False
            self._handed_out.difference_update(wanted)
            return True

    def maintain(self) -> bool:
        """The owner's periodic tick: give free pages back and truncate the WAL."""
        with self._lock:
            if not self._ready():
                return False
            db = self._checked_db()
            try:
                db.execute("PRAGMA incremental_vacuum").fetchall()
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
                db.execute(f"PRAGMA max_page_count = {self._max_bytes // self._page_size}")
            except sqlite3.Error as exc:
                LOG.warning("telemetry maintenance failed (%s)", _describe(exc))
                return False
            return True

    def stats(self) -> BufferStats:
        """Backlog, drops, last upload and write failures (zeros while the file is closed)."""
        with self._lock:
            found = None
            if self._ready():
                try:
                    found = _collect_stats(self._checked_db().conn)
                except sqlite3.Error as exc:
                    LOG.warning("telemetry stats failed (%s)", _describe(exc))
            if found is None:
                found = BufferStats(0, 0, None, dict.fromkeys(CLASSES, 0), None, 0)
            return replace(found, write_failures=max(found.write_failures, self._failures))

    def close(self) -> None:
        """Close the file (a later call opens it again)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    # --- opening -------------------------------------------------------------------------

    def _ready(self) -> bool:
        return self._db is not None or self._open()

    def _checked_db(self) -> Database:
        if self._db is None:  # pragma: no cover - callers check _ready() first
            raise RuntimeError("telemetry buffer is closed")
        return self._db

    def _open(self) -> bool:
        """Open or start the file; False leaves it closed for the next call to retry."""
        self._reserved = read_id_mark(self._hwm_path)
        try:
            existed = self._path.exists() and self._path.stat().st_size > 0
            try:
                db = self._connect()
            except _CorruptFile as exc:
                moved = self._move_aside()
                # Recovered, and reported as a buffer_reset event: a warning, not an error
                # that would keep the device "degraded" in status for ten minutes.
                LOG.warning("telemetry buffer was corrupt (%s); moved aside to %s", exc, moved)
                self._queue_reset(str(exc), moved)
                existed = False
                db = self._connect()
            self._start_ids(db, fresh=not existed)
        except (sqlite3.Error, OSError) as exc:
            LOG.warning("telemetry buffer %s cannot be opened (%s)", self._path, _describe(exc))
            return False
        self._db = db
        try:  # a smaller budget than last time, or queued events: apply them now
            self._write(db, [self._encode(r) for r in self._queued])
            self._queued.clear()
            db.execute("PRAGMA incremental_vacuum").fetchall()
            db.execute(f"PRAGMA max_page_count = {self._max_bytes // self._page_size}")
        except (sqlite3.Error, OSError) as exc:
            LOG.warning("telemetry buffer opened but not trimmed (%s)", _describe(exc))
        return True

    def _check(self) -> None:
        """``quick_check`` an existing file through a read-only connection, which neither
        checkpoints nor deletes the -wal when it closes: a corrupt file is kept as found."""
        if not self._path.exists() or self._path.stat().st_size == 0:
            return
        uri = f"{self._path.resolve().as_uri()}?mode=ro"
        conn = sqlite3.connect(uri, uri=True, timeout=_BUSY_TIMEOUT_S)
        try:
            check = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _CORRUPT_CODES:
                raise _CorruptFile(_describe(exc)) from exc
            raise
        finally:
            conn.close()
        if check != "ok":
            raise _CorruptFile(f"quick_check: {check}")

    def _connect(self) -> Database:
        self._check()
        conn = sqlite3.connect(self._path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False)
        try:
            db = Database(conn, execute_plugins=False)
            if db.execute("PRAGMA page_count").fetchone()[0] == 0:
                # A new file: page size and auto_vacuum go before WAL and the first table.
                small = self._max_bytes < 1024 * 1024
                db.execute(f"PRAGMA page_size = {1024 if small else 4096}")
                db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.enable_wal()
            self._page_size = db.execute("PRAGMA page_size").fetchone()[0]
            for pragma in (
                "synchronous = NORMAL",
                f"journal_size_limit = {WAL_LIMIT_BYTES}",
                f"wal_autocheckpoint = {(1024 * 1024) // self._page_size}",
                f"max_page_count = {self._max_bytes // self._page_size}",
            ):
                db.execute(f"PRAGMA {pragma}")
            MIGRATIONS.apply(db)
            return db
        except sqlite3.DatabaseError as exc:
            conn.close()
            if getattr(exc, "sqlite_errorcode", 0) & 0xFF in _CORRUPT_CODES:
                raise _CorruptFile(_describe(exc)) from exc
            raise
        except BaseException:
            conn.close()
            raise

    def _move_aside(self) -> str:
        stamp = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self._path.with_name(f"{self._path.name}.corrupt-{stamp}-{n}")
            n += 1
        # The -wal first: a stale WAL beside a fresh file would be replayed into it.
        for suffix in ("-wal", "-shm", ""):
            source = Path(f"{self._path}{suffix}")
            if source.exists():
                os.replace(source, f"{target}{suffix}")
        return target.name

    def _queue_reset(self, reason: str, moved: str | None) -> None:
        if not any(r.kind == "buffer_reset" for r in self._queued):
            body = {"reason": reason, "moved_aside": moved, "ids_issued_up_to": self._reserved}
            self._queued.append(Row("event", "buffer_reset", body, self._now()))

    def _start_ids(self, db: Database, *, fresh: bool) -> None:
        """Start a fresh file above the high-water mark; renew the mark if it lags."""
        seq_row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()
        if seq_row is None:
            if fresh and self._reserved > 0:
                self._queue_reset("file missing", None)
            with db.atomic():
                db.execute(
                    "INSERT INTO sqlite_sequence (name, seq) VALUES ('records', ?)",
                    [self._reserved],
                )
            seq = self._reserved
        else:
            seq = int(seq_row[0])
        self._last_id = seq
        self._failures = self._saved_failures = int(_meta_get(db, "write_failures") or 0)
        if seq > self._reserved:
            self._reserve(seq)

    def _reserve(self, top: int) -> None:
        write_id_mark(self._hwm_path, top + HWM_BLOCK)
        self._reserved = top + HWM_BLOCK

    # --- writing -------------------------------------------------------------------------

    def _encode(self, row: Row) -> tuple[str, str, str, str, int]:
        if row.cls not in CLASSES:
            raise ValueError(f"row class: must be one of {', '.join(CLASSES)}, got {row.cls!r}")
        if not isinstance(row.body, Mapping) or not row.kind:
            raise ValueError(f"row {row.kind!r}: needs a kind and a JSON object body")
        body = json.dumps(
            dict(row.body), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        stamp = self._now() if row.time is None else canonical_time(row.time)
        return (row.cls, row.kind, stamp, body, len(body.encode()))

    def _write(self, db: Database, rows: list[tuple[str, str, str, str, int]]) -> None:
        """One transaction: make room, insert, check again, record drops, save the mark."""
        with db.atomic():
            incoming = int(sum(r[4] + _ROW_OVERHEAD for r in rows) * 1.25)
            drops = self._enforce(db, incoming)
            db.conn.executemany(_INSERT, rows)
            drops += self._enforce(db, 0)
            self._record_drops(db, drops)
            if self._failures != self._saved_failures:
                _meta_set(db, "write_failures", str(self._failures))
            top = int(
                db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'records'").fetchone()[0]
            )
            if top > self._reserved:
                self._reserve(top)  # before COMMIT: no id is ever committed above the mark
        self._last_id = top
        self._saved_failures = self._failures

    def _used_bytes(self, db: Database) -> int:
        query = (
            "SELECT page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count()"
        )
        return int(db.execute(query).fetchone()[0]) * self._page_size

    def _enforce(self, db: Database, incoming: int) -> list[Drop]:
        """Drop rows until ``incoming`` more bytes fit under the high-water mark, deleting at
        most ``MAX_DROPS_PER_WRITE`` rows: each write's WAL stays bounded, and the next
        write goes on where this one stopped."""
        drops: list[Drop] = []
        high = self._max_bytes * HIGH_WATER
        if self._used_bytes(db) + incoming <= high:
            return drops
        goal = high - incoming - min(self._max_bytes * (HIGH_WATER - LOW_WATER), _MAX_STEP_BYTES)
        allowance = MAX_DROPS_PER_WRITE
        thinned = False
        while allowance > 0 and (excess := self._used_bytes(db) - goal) > 0:
            drop = None
            if not thinned:
                thinned = True
                drop = self._thin_samples(db, allowance)
            drop = drop or self._drop_oldest(db, int(excess), allowance)
            if drop is None:
                break  # only events left: the insert may now fail soft at max_page_count
            drops.append(drop)
            allowance -= drop.count
        return drops

    def _thin_samples(self, db: Database, limit: int) -> Drop | None:
        """Delete every other sample not thinned before (at most ``limit``, oldest first)."""
        through = int(_meta_get(db, "thinned_through") or 0)
        query = "SELECT id, time FROM records WHERE class = 'sample' AND id > ? ORDER BY id LIMIT ?"
        samples = db.execute(query, [through, 2 * limit]).fetchall()
        victims = samples[1::2]
        if not victims:
            return None
        db.conn.executemany("DELETE FROM records WHERE id = ?", [(i,) for i, _ in victims])
        _meta_set(db, "thinned_through", str(samples[-1][0]))
        return Drop.of("sample", victims)

    def _drop_oldest(self, db: Database, excess: int, limit: int) -> Drop | None:
        """Delete the oldest rows of the lowest class present: about ``excess`` bytes, at
        most ``limit`` rows."""
        for cls in ("sample", "rollup"):
            query = "SELECT id, time, bytes FROM records WHERE class = ? ORDER BY id LIMIT ?"
            victims: list[tuple[int, str]] = []
            freed = 0
            cursor = db.execute(query, [cls, limit])
            for row_id, stamp, size in cursor:
                victims.append((row_id, stamp))
                freed += size + _ROW_OVERHEAD
                if freed >= excess:
                    break
            cursor.close()
            if victims:
                db.conn.executemany("DELETE FROM records WHERE id = ?", [(i,) for i, _ in victims])
                return Drop.of(cls, victims)
        return None

    def _record_drops(self, db: Database, drops: list[Drop]) -> None:
        """Count the drops and describe them in one drop event per class, merged if unsent."""
        by_class: dict[str, Drop] = {}
        for drop in drops:
            seen = by_class.get(drop.cls)
            by_class[drop.cls] = drop if seen is None else drop.merged(seen.body())
        for cls, drop in by_class.items():
            key = f"dropped:{cls}"
            _meta_set(db, key, str(int(_meta_get(db, key) or 0) + drop.count))
            previous = int(_meta_get(db, f"drop_event:{cls}") or 0)
            found = None
            if previous and previous not in self._handed_out:
                found = db.execute("SELECT body FROM records WHERE id = ?", [previous]).fetchone()
            if found is not None:
                drop = drop.merged(json.loads(found[0]))
                body = json.dumps(drop.body(), separators=(",", ":"))
                db.execute(
                    "UPDATE records SET body = ?, bytes = ? WHERE id = ?",
                    [body, len(body.encode()), previous],
                )
            else:
                body = json.dumps(drop.body(), separators=(",", ":"))
                cursor = db.conn.execute(_INSERT, ("event", "drop", self._now(), body, len(body)))
                _meta_set(db, f"drop_event:{cls}", str(cursor.lastrowid))

    # --- reading -------------------------------------------------------------------------

    def _ordered(self, db: Database, live_after_id: int) -> Generator[StoredRow, None, None]:
        query = "SELECT id, class, kind, time, body, bytes FROM records WHERE class = ? AND {}"
        for where in ("id > ? ORDER BY id", "id <= ? ORDER BY id"):
            for cls in CLASSES:
                for row in db.execute(query.format(where), [cls, live_after_id]):
                    yield StoredRow(*row)

    def _now(self) -> str:
        return iso_time(self._clock())


def read_stats(path: str | os.PathLike[str]) -> BufferStats | None:
    """The stats of a buffer file opened read-only (the daemon is down); None when there is
    no file or it cannot be read. Never raises."""
    try:
        file = Path(path).resolve()
        if not file.is_file():
            return None
        conn = sqlite3.connect(f"{file.as_uri()}?mode=ro", uri=True, timeout=0.5)
        try:
            return _collect_stats(conn)
        finally:
            conn.close()
    except (sqlite3.Error, OSError, ValueError) as exc:
        LOG.debug("telemetry stats unreadable at %s (%s)", path, _describe(exc))
        return None


def _collect_stats(conn: sqlite3.Connection) -> BufferStats:
    count, size, oldest = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(bytes), 0), MIN(id) FROM records"
    ).fetchone()
    oldest_time = None
    if oldest is not None:
        oldest_time = conn.execute("SELECT time FROM records WHERE id = ?", [oldest]).fetchone()[0]
    meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
    dropped: dict[str, int] = {cls: int(meta.get(f"dropped:{cls}", 0)) for cls in CLASSES}
    failures = int(meta.get("write_failures", 0))
    return BufferStats(count, size, oldest_time, dropped, meta.get("last_upload"), failures)


def _meta_get(db: Database, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchone()
    return None if row is None else str(row[0])


def _meta_set(db: Database, key: str, value: str) -> None:
    db.execute(
        "INSERT INTO meta (key, value) VALUES (?, ?)"
        " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [key, value],
    )


def _describe(exc: BaseException) -> str:
    name = getattr(exc, "sqlite_errorname", None)
    return f"{name}: {exc}" if name else f"{type(exc).__name__}: {exc}"
