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

DOWNLOADING = ("received", "verified", "downloading")  # before these end, no bytes are final


def reported_state(
    record: Mapping[str, Any],
    committed: Mapping[str, Any],
    live: Sequence[LiveEntry],
    *,
    downloaded: int,
    root_version: int,
) -> dict[str, Any]:
    """``committed_serial``, ``root_version``, ``live`` (with each version's sha256 when a
    document named it) and ``deployment`` (serial, state, reason, bytes done and total;
    ``downloaded`` is the bytes done while the state is ``downloading``)."""
    known = list(committed.get("models") or []) + list(record.get("models") or [])
    shas = {(m["name"], m["version"]): m.get("sha256") for m in known}
    deployment = None
    if record:
        total = int(record.get("bytes_total") or 0)
        past = record.get("verified") and record.get("state") not in DOWNLOADING
        done = downloaded if record.get("state") == "downloading" else total if past else 0
        deployment = {
            "serial": record.get("serial"),
            "state": record.get("state"),
            "reason": record.get("reason"),
            "bytes_done": done,
            "bytes_total": total,
        }
    return {
        "committed_serial": committed.get("serial", 0),
        "root_version": root_version,
        "live": [
            {
                "name": e.name,
                "version": e.version,
                "sha256": shas.get((e.name, e.version)),
                "default": e.default,
            }
            for e in live
        ],
        "deployment": deployment,
    }


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
