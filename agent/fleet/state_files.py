"""The device's fleet state files under ``<state_dir>/fleet/``: read leniently, replaced
atomically (temporary file, fsync, rename, fsync the directory), so a kill -9 at any
instant leaves either the old or the new content, never a torn file."""

from __future__ import annotations

import json
import logging
import os
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeserve.archive.format import fsync_dir

log = logging.getLogger("edgeserve.fleet")


def read_json(path: Path) -> dict[str, Any] | None:
    """The object in ``path``; None when it is missing, unreadable or not an object (logged)."""
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("fleet: %s unreadable (%s); ignoring it", path, type(exc).__name__)
        return None
    return data if isinstance(data, dict) else None


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    write_bytes(path, json.dumps(data, sort_keys=True).encode() + b"\n")


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
