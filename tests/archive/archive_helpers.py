"""Helpers for hand-built (often hostile) zips and for asserting that nothing was written."""

from __future__ import annotations

import hashlib
import io
import json
import stat
import warnings
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

# -- hand-built zips ------------------------------------------------------------------------

Entry = tuple[str | zipfile.ZipInfo, bytes]


def write_zip(path: Path, entries: Iterable[Entry]) -> Path:
    """A zip with exactly these entries (duplicates allowed: zipfile warns, we mean it)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def zip_entries(path: Path) -> list[tuple[zipfile.ZipInfo, bytes]]:
    with zipfile.ZipFile(path) as zf:
        return [(info, zf.read(info)) for info in zf.infolist()]


def rewrite(
    src: Path,
    dst: Path,
    *,
    drop: Iterable[str] = (),
    replace: dict[str, bytes] | None = None,
    add: Iterable[Entry] = (),
) -> Path:
    """Copy an archive entry by entry, dropping, replacing or adding some."""
    replace = replace or {}
    kept: list[Entry] = [
        (info.filename, replace.get(info.filename, data))
        for info, data in zip_entries(src)
        if info.filename not in set(drop)
    ]
    return write_zip(dst, [*kept, *add])


def manifest_json(members: dict[str, bytes], **overrides: object) -> bytes:
    """A valid manifest for these members (model.pt must be one), with correct hashes."""
    data = {
        "schema": 1,
        "name": "hand",
        "version": "1",
        "format": "torchscript",
        "model_file": "model.pt",
        "handler": "tensor",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, 4]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
        "files": {name: hashlib.sha256(data).hexdigest() for name, data in members.items()},
    }
    data.update(overrides)
    return json.dumps(data).encode()


def hand_archive(path: Path, members: dict[str, bytes], extra: Iterable[Entry] = ()) -> Path:
    """manifest.json + members (+ extra raw entries the manifest does not know about)."""
    return write_zip(path, [("manifest.json", manifest_json(members)), *members.items(), *extra])


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def tree_snapshot(root: Path) -> list[str]:
    """Every path under root, relative, sorted (to assert 'untouched')."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))
