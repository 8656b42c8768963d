"""The deployer's persisted records, in plain JSON: what ``deployment.json`` and
``committed.json`` say about models, and reading a document's claims before verifying it.

Pure helpers (no I/O): ``fleet/state_files.py`` reads and writes the files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from edgeserve.fleet.documents import ModelEntry
from edgeserve.store.model_store import LiveEntry
from edgeserve.types import BatchingSettings


def is_past_download(record: Mapping[str, Any]) -> bool:
    before = ("received", "verified", "downloading")
    return bool(record.get("verified")) and record.get("state") not in before


def inside_window(window: tuple[int, int], now: float) -> bool:
    local = time.localtime(now)
    minute = local.tm_hour * 60 + local.tm_min
    start, end = window
    return start <= minute < end if start < end else minute >= start or minute < end


def peek_serial(data: bytes | None) -> int | None:
    """The serial a document claims, unverified (only to order and de-duplicate)."""
    try:
        serial = json.loads(data or b"")["signed"]["serial"]
    except (ValueError, KeyError, TypeError):
        return None
    return serial if isinstance(serial, int) and not isinstance(serial, bool) else None


def model_summary(entry: ModelEntry) -> dict[str, Any]:
    return {"name": entry.name, "version": entry.version, "sha256": entry.sha256}


def entries_to_json(entries: Sequence[LiveEntry]) -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            "version": e.version,
            "default": e.default,
            "settings": e.settings.to_dict(),
            "device": e.device,
        }
        for e in entries
    ]


def entries_from_json(raw: Sequence[Mapping[str, Any]]) -> list[LiveEntry]:
    return [
        LiveEntry(
            str(m["name"]),
            str(m["version"]),
            bool(m["default"]),
            BatchingSettings.from_dict(dict(m.get("settings") or {})),
            m.get("device"),
        )
        for m in raw
    ]
