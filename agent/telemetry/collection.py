"""The controller's telemetry records: one SQLite file that holds each ``(device, id)`` once.

``edgeserve fleet collect`` writes here and ``edgeserve fleet report`` reads here; nothing
else touches the file. Table ``records(device, id, class, kind, time, received, body)``
with the primary key ``(device, id)``: ``store()`` inserts with ``INSERT OR IGNORE`` in one
transaction, so the duplicates of at-least-once delivery collapse, and a batch is either
all committed or not at all (its PUBACK follows the commit). Device ids are unique per
device forever (``telemetry/buffer.py``), so a collision is always a duplicate.

Every write and read goes through this one module, so a bigger fleet could point the
collector at a server database later by replacing it; nothing else would change.

``decode_batch`` reads an upload message (``{"device", "boot_id", "records": [{"id",
"class", "kind", "time", "body"}]}``) and raises ``MalformedTelemetry`` for anything that
is not one; the error names what is wrong, never the payload. This module and
``telemetry/buffer.py`` are the only ones that import ``sqlite_utils`` or ``sqlite3``
(one owner per file: the device's buffer, the controller's records).

Every method is synchronous and may block on disk I/O: the collector calls ``store`` off
the event loop. A lock lets one call in at a time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlite_utils import Database, Migrations

from edgeserve.errors import InvalidArgument
from edgeserve.jsonsafe import JsonRefused, parse_json

MIGRATIONS = Migrations("edgeserve.collection")
MAX_RECORDS_PER_BATCH = 100_000
_BUSY_TIMEOUT_MS = 1_000
_INSERT = (
    "INSERT OR IGNORE INTO records (device, id, class, kind, time, received, body)"
    " VALUES (?, ?, ?, ?, ?, ?, ?)"
)


@MIGRATIONS(name="0001_records")
def _create_schema(db: Database) -> None:
    db.table("records").create(
        {
            "device": str,
            "id": int,
            "class": str,
            "kind": str,
            "time": str,
            "received": str,
            "body": str,
        },
        pk=("device", "id"),
        not_null={"device", "id", "class", "kind", "time", "received", "body"},
    )
    db.table("records").create_index(["device", "time"], index_name="records_device_time")


class MalformedTelemetry(InvalidArgument):
    """An upload message that is not a telemetry batch (the message says what, no payload)."""


class StoreBusy(Exception):
    """Another writer holds the database lock; nothing was written, try again."""


@dataclass(frozen=True)
class Record:
    """One telemetry record as stored (``body`` is the JSON object text)."""

    device: str
    id: int
    cls: str
    kind: str
    time: str
    received: str
    body: str

    def data(self) -> dict[str, Any]:
        """The body as a dict (an empty one if the stored text is not a JSON object)."""
        try:
            value = json.loads(self.body)
        except ValueError:
            return {}
        return value if isinstance(value, dict) else {}


@dataclass(frozen=True)
class Batch:
    device: str
    records: list[tuple[int, str, str, str, str]]
    """(id, class, kind, time, body JSON text) of each well-formed record."""
    bad_records: int


_MAX_MESSAGE_BYTES = 17 * 1024 * 1024


def decode_batch(device: str, payload: bytes) -> Batch:
    """An upload message from ``device`` (from its topic); ``MalformedTelemetry`` if it is none.

    Records that are not well formed are left out and counted; the envelope must be right.
    """
    try:
        # A device is an outsider to the controller: bounded (the uploader's batch_bytes
        # is at most 16 MiB) and never a RecursionError.
        message = parse_json(payload, max_bytes=_MAX_MESSAGE_BYTES)
    except JsonRefused as exc:
        raise MalformedTelemetry(f"telemetry message is not acceptable JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("records"), list):
        raise MalformedTelemetry("telemetry message is not an object with a 'records' list")
    if message.get("device") != device:
        raise MalformedTelemetry(f"telemetry message on the topic of {device!r} names another")
    records = message["records"]
    if len(records) > MAX_RECORDS_PER_BATCH:
        raise MalformedTelemetry(f"telemetry message holds over {MAX_RECORDS_PER_BATCH} records")
    good = [r for r in (_record(raw) for raw in records) if r is not None]
    return Batch(device, good, len(records) - len(good))


def _record(raw: object) -> tuple[int, str, str, str, str] | None:
    if not isinstance(raw, dict):
        return None
    rid, cls, kind, stamp, body = (raw.get(k) for k in ("id", "class", "kind", "time", "body"))
    if not isinstance(rid, int) or isinstance(rid, bool) or rid < 1:
        return None
    if not (isinstance(cls, str) and cls and isinstance(kind, str) and kind):
        return None
    moment = parse_time(stamp) if isinstance(stamp, str) else None
    if moment is None or not isinstance(body, dict):
        return None
    try:
        text = json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        return None
    return (rid, cls, kind, iso(moment), text)


def parse_time(text: str) -> datetime | None:
    """An ISO 8601 time as an aware UTC datetime (naive means UTC); None if it is not one."""
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def iso(value: datetime) -> str:
    """``2024-05-01T12:00:00.123Z``: the canonical UTC form."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class RecordStore:
    """The collector's records file (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str], *, create: bool = True) -> None:
        """Open (and with ``create``, make) the file; ``InvalidArgument`` if it is not one."""
        self._path = Path(path)
        self._lock = threading.Lock()
        if not create and not self._path.is_file():
            raise InvalidArgument(f"no telemetry records file at {self._path}")
        try:
            conn = sqlite3.connect(self._path, check_same_thread=False)
        except sqlite3.Error as exc:
            raise InvalidArgument(f"cannot open {self._path}: {exc}") from None
        self._db = Database(conn)
        try:
            self._db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}")
            self._db.enable_wal()
            self._db.execute("PRAGMA synchronous = NORMAL")
            MIGRATIONS.apply(self._db)
            self._db.execute("SELECT 1 FROM records LIMIT 1").fetchall()
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise InvalidArgument(f"{self._path} is not a telemetry records file ({exc})") from None

    @property
    def path(self) -> Path:
        return self._path

    def store(self, batch: Batch, received: str) -> int:
        """Insert each record of ``batch`` once, in one transaction; the number of new rows.

        Raises ``StoreBusy`` when another writer holds the lock past the busy timeout
        (nothing written); other SQLite and OS errors propagate (nothing written).
        """
        rows = [(batch.device, *r[:4], received, r[4]) for r in batch.records]
        if not rows:
            return 0
        with self._lock:
            try:
                with self._db.atomic():
                    before = self._db.conn.total_changes
                    self._db.conn.executemany(_INSERT, rows)
                    return self._db.conn.total_changes - before
            except sqlite3.OperationalError as exc:
                if "locked" in str(exc) or "busy" in str(exc):
                    raise StoreBusy(str(exc)) from None
                raise

    def devices(self) -> list[str]:
        """Every device that has records, sorted."""
        return [r[0] for r in self._query("SELECT DISTINCT device FROM records ORDER BY device")]

    def records(
        self,
        device: str,
        *,
        since: str | None = None,
        kinds: Sequence[str] | None = None,
        classes: Sequence[str] | None = None,
    ) -> Iterator[Record]:
        """A device's records in id order; ``since`` compares the record times as text
        (canonical ``...Z`` times sort in time order)."""
        sql = "SELECT device, id, class, kind, time, received, body FROM records WHERE device = ?"
        params: list[object] = [device]
        if since is not None:
            sql += " AND time >= ?"
            params.append(since)
        for column, values in (("kind", kinds), ("class", classes)):
            if values is not None:
                sql += f" AND {column} IN ({', '.join('?' for _ in values)})"  # noqa: S608
                params.extend(values)
        for row in self._query(sql + " ORDER BY id", params):
            yield Record(*row)

    def ids_between(self, device: str, first: int, last: int) -> list[int]:
        """The stored ids of ``device`` in ``[first, last]``, ascending."""
        sql = "SELECT id FROM records WHERE device = ? AND id BETWEEN ? AND ? ORDER BY id"
        return [int(r[0]) for r in self._query(sql, [device, first, last])]

    def count(self, device: str | None = None) -> int:
        if device is None:
            return int(self._query("SELECT count(*) FROM records")[0][0])
        return int(self._query("SELECT count(*) FROM records WHERE device = ?", [device])[0][0])

    def close(self) -> None:
        with self._lock:
            self._db.conn.close()

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return list(self._db.execute(sql, list(params)).fetchall())
