"""Plain data the telemetry buffer takes and gives: ``Row`` in, ``StoredRow`` out,
``BufferStats`` for status, the body of a ``drop`` event (``Drop``), and the row times.

No SQLite here (``telemetry/buffer.py`` owns the file): the rollup, the event log, the
uploader and status import these without opening anything.

Times are ISO 8601 UTC with millisecond precision and ``Z`` (``iso_time``); a row given
with its own time is stored in that form (``canonical_time``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

RowClass = Literal["event", "rollup", "sample"]
CLASSES: tuple[RowClass, ...] = ("event", "rollup", "sample")  # highest priority first


@dataclass(frozen=True)
class Row:
    """A row to append."""

    cls: RowClass
    kind: str
    body: Mapping[str, Any]
    time: str | None = None
    """ISO 8601 UTC (``...Z`` or ``+00:00``); None: the time of the append."""


@dataclass(frozen=True)
class StoredRow:
    """A row as stored, for the uploader."""

    id: int
    cls: RowClass
    kind: str
    time: str
    body: str
    """The JSON object text, as stored."""
    size: int
    """Bytes of ``body`` (UTF-8), the unit of the budget."""

    def record(self) -> dict[str, Any]:
        """The record as the upload message carries it."""
        body = json.loads(self.body)
        return {
            "id": self.id,
            "class": self.cls,
            "kind": self.kind,
            "time": self.time,
            "body": body,
        }

    @property
    def wire_size(self) -> int:
        """Bytes of ``record()`` as compact JSON (``separators=(",", ":")``, UTF-8)."""
        kind = json.dumps(self.kind, ensure_ascii=False).encode()
        fixed = len('{"id":,"class":"","kind":,"time":"","body":}')
        return fixed + len(str(self.id)) + len(self.cls) + len(kind) + len(self.time) + self.size


@dataclass(frozen=True)
class BufferStats:
    """What ``edgeserve status`` shows about the buffer."""

    backlog_rows: int
    backlog_bytes: int
    oldest_unsent_time: str | None
    """Time of the oldest unsent row (the lowest id); None when nothing is waiting."""
    dropped: Mapping[str, int]
    """Rows dropped by the budget since the file began, by class."""
    last_upload: str | None
    write_failures: int
    """Failed writes since the file began (the last ones may not be saved yet)."""


@dataclass(frozen=True)
class Drop:
    """The body of a ``drop`` event: ``{class, count, first_id, last_id, first_time,
    last_time}`` of the rows the budget forced out."""

    cls: str
    count: int
    first_id: int
    last_id: int
    first_time: str
    last_time: str

    @staticmethod
    def of(cls: str, victims: Sequence[tuple[int, str]]) -> Drop:
        """The drop of ``victims`` (``(id, time)`` pairs, ascending ids) of one class."""
        times = [t for _, t in victims]
        return Drop(cls, len(victims), victims[0][0], victims[-1][0], min(times), max(times))

    def merged(self, other: Mapping[str, Any]) -> Drop:
        """This drop and another one's body, as one."""
        return Drop(
            self.cls,
            self.count + int(other["count"]),
            min(self.first_id, int(other["first_id"])),
            max(self.last_id, int(other["last_id"])),
            min(self.first_time, str(other["first_time"])),
            max(self.last_time, str(other["last_time"])),
        )

    def body(self) -> dict[str, Any]:
        return {
            "class": self.cls,
            "count": self.count,
            "first_id": self.first_id,
            "last_id": self.last_id,
            "first_time": self.first_time,
            "last_time": self.last_time,
        }


def iso_time(epoch_s: float) -> str:
    """``2024-05-01T12:00:00.123Z``: ISO 8601 UTC, milliseconds, ``Z``."""
    moment = datetime.fromtimestamp(epoch_s, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def canonical_time(text: str) -> str:
    """A row's own time in the ``iso_time`` form; ValueError unless it is UTC."""
    moment = datetime.fromisoformat(text)
    offset = moment.utcoffset()
    if offset is None or offset.total_seconds() != 0:
        raise ValueError(f"row time: must be UTC (Z), got {text!r}")
    return iso_time(moment.timestamp())
