"""The telemetry buffer's id high-water mark, ``<db>.hwm``: one integer in a text file,
read forgivingly and written atomically (a temporary file, fsync, rename, fsync of the
folder), so that a crash leaves the old mark or the new one, never a torn one.

The buffer (``telemetry/buffer.py``) keeps the mark above every id it ever issued; a fresh
database file starts its ids above it, so ids stay unique per device forever.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

LOG = logging.getLogger("edgeserve.telemetry")


def read_id_mark(path: Path) -> int:
    """The mark in ``path``; 0 when there is none or it cannot be read (logged)."""
    try:
        return max(0, int(path.read_text().strip()))
    except FileNotFoundError:
        return 0
    except (OSError, ValueError) as exc:
        LOG.error("telemetry id mark %s unreadable (%s); ids may repeat", path, exc)
        return 0


def write_id_mark(path: Path, value: int) -> None:
    """Atomically: a temporary file, fsync, rename, fsync of the folder."""
    tmp = path.with_name(f"{path.name}.tmp")
    with open(tmp, "w") as handle:
        handle.write(f"{value}\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
