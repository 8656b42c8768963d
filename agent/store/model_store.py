"""The on-disk model store and the persisted live state.

Layout (``root`` is ``<state_dir>/models``)::

    <root>/<name>/<version>/      a verified, unpacked archive (manifest.json at its top)
    <root>/.staging/<random>/     installs in progress; removed by collect_garbage()
    <root>/.lock                  serialises installs and removals across processes
    <state_dir>/live.json         what is live and which version is default
    <state_dir>/.live.json.<hex>.tmp        a live-set write in progress (removed at start)
    <state_dir>/live.json.corrupt-<time>    a live set that could not be read, kept aside

An install validates and unpacks into staging (every file and directory fsynced), then
renames the version directory into place: a crash or a failure leaves no trace outside
staging, and staging is cleared on the next start. Versions are immutable: installing
the same name/version again is a no-op when the manifest is identical and an error
otherwise.

The live set is written the same way (temporary file, fsync, rename, directory fsync);
a write that fails raises ``StoreFull`` or ``StoreReadOnly`` (``StoreError.from_os``)
and leaves the previous file in place. It is read with bounds (``jsonsafe``); one that
cannot be read is ``LiveStateCorrupt``, which the daemon answers by moving it aside
(``quarantine_live_state``) and starting without it.

A TorchServe ``.mar`` (known by its content: management hands over an fd's path) is refused
by ``archive.format`` with the command that converts it (``edgeserve package --from-mar
FILE.mar [--sign-key KEY] -o FILE.esar``): converting runs the model to infer its
signature, which is the packager's job, and the daemon never imports the packager.

A full or read-only state dir during an install is ``StoreFull`` / ``StoreReadOnly``
(``StoreError.from_os``), and the install leaves nothing behind: staging is removed.
"""

from __future__ import annotations

import builtins
import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgeserve.archive.format import (
    extract_archive,
    fsync_dir,
    read_tree_manifest,
    verify_tree,
)
from edgeserve.archive.manifest import Manifest
from edgeserve.archive.signing import TrustStore
from edgeserve.errors import ArchiveError, NotFound, StoreError
from edgeserve.jsonsafe import parse_json
from edgeserve.types import BatchingSettings

log = logging.getLogger("edgeserve.store")

STAGING = ".staging"
_LOCK = ".lock"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_LIVE_SCHEMA = 1
_LIVE_MAX_BYTES = 4 * 1024 * 1024  # ~10,000 entries; ours is written by us, so far smaller
_LIVE_MAX_DEPTH = 8  # {"models": [{"settings": {...}}]} is 4 deep


class LiveStateCorrupt(StoreError):
    """``live.json`` exists but cannot be used (not JSON, wrong schema, bad entries)."""


@dataclass(frozen=True)
class InstalledModel:
    name: str
    version: str
    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class LiveEntry:
    """One live version as persisted in ``live.json``."""

    name: str
    version: str
    default: bool
    settings: BatchingSettings = field(default_factory=BatchingSettings)
    """The batching asked for (unchecked when read: restoring checks it)."""
    device: str | None = None
    """The device asked for; None: the daemon's ``runtime.device``."""


class ModelStore:
    def __init__(self, root: Path, trust: TrustStore | None, *, live_state_path: Path) -> None:
        self.root = root
        self.trust = trust
        self.live_state_path = live_state_path
        self._lock = threading.Lock()

    # -- models ---------------------------------------------------------------------------

    def install(self, archive: Path) -> InstalledModel:
        """Verify ``archive`` and add it; atomic, all or nothing."""
        try:
            with self._locked():
                staging = self._new_staging()
                try:
                    return self._install(archive, staging)
                finally:
                    shutil.rmtree(staging, ignore_errors=True)
        except OSError as exc:  # the lock or staging: the store's trouble, not the archive's
            raise StoreError.from_os(exc, f"cannot install '{archive}' into the store") from None

    def get(self, name: str, version: str) -> InstalledModel:
        """An installed version, re-verified (files, hashes, signature) on every call."""
        path = self._version_dir(name, version)
        if not path.is_dir():
            raise NotFound(f"model '{name}' version '{version}' is not installed")
        try:
            manifest = verify_tree(path, trust=self.trust)
        except ArchiveError as exc:
            raise StoreError(
                f"installed model '{name}' version '{version}' fails verification: {exc.message}"
            ) from None
        if (manifest.name, manifest.version) != (name, version):
            raise StoreError(
                f"model directory '{path}' holds '{manifest.name}' version '{manifest.version}'"
            )
        return InstalledModel(name, version, path, manifest)

    def list(self) -> list[InstalledModel]:
        """Installed versions, by name then version. Reads manifests only (``get`` verifies);
        a directory whose manifest does not parse is logged and skipped."""
        found = []
        for name_dir in sorted(self._children(self.root)):
            for version_dir in sorted(self._children(name_dir)):
                try:
                    manifest = read_tree_manifest(version_dir)
                except (OSError, ArchiveError) as exc:
                    log.warning("store: skipping %s: %s", version_dir, exc)
                    continue
                found.append(InstalledModel(manifest.name, manifest.version, version_dir, manifest))
        return found

    def remove(self, name: str, version: str) -> None:
        """Delete an installed version (moved into staging first, so removal is atomic)."""
        with self._locked():
            path = self._version_dir(name, version)
            if not path.is_dir():
                raise NotFound(f"model '{name}' version '{version}' is not installed")
            staging = self._new_staging()
            try:
                os.rename(path, staging / "removed")
                fsync_dir(path.parent)
                with contextlib.suppress(OSError):
                    path.parent.rmdir()  # only when no other version is left
                    fsync_dir(self.root)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        log.info("store: removed %s %s", name, version)

    def collect_garbage(self) -> int:
        """Remove leftovers of interrupted installs; how many. Call at startup."""
        staging_root = self.root / STAGING
        if not staging_root.is_dir():
            return 0
        with self._locked():
            leftovers = list(staging_root.iterdir())
            for path in leftovers:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if leftovers:
            log.info("store: removed %d leftover staging entries", len(leftovers))
        return len(leftovers)

    # -- live state -----------------------------------------------------------------------

    def read_live_state(self) -> builtins.list[LiveEntry]:
        """The persisted live set; empty when none was written yet; ``LiveStateCorrupt``
        when it cannot be used."""
        path = self.live_state_path
        try:
            with open(path, "rb") as file:
                raw = file.read(_LIVE_MAX_BYTES + 1)
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise StoreError(f"live state '{path}' cannot be read: {exc.strerror}") from None
        try:
            data = parse_json(raw, max_bytes=_LIVE_MAX_BYTES, max_depth=_LIVE_MAX_DEPTH)
            if data.get("schema") != _LIVE_SCHEMA:
                raise ValueError(f"unsupported schema {str(data.get('schema'))[:32]!r}")
            entries = [_live_entry(e) for e in data["models"]]
            _check_live(entries, str(path))
        except (ValueError, KeyError, TypeError, AttributeError, StoreError) as exc:
            problem = exc.message if isinstance(exc, StoreError) else str(exc)[:200]
            raise LiveStateCorrupt(f"live state '{path}' is malformed: {problem}") from None
        return entries

    def quarantine_live_state(self) -> Path:
        """Move an unusable ``live.json`` aside, kept as ``live.json.corrupt-<UTC time>``."""
        path = self.live_state_path
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        try:
            os.replace(path, aside)
            fsync_dir(path.parent)
        except OSError as exc:
            raise StoreError.from_os(exc, f"cannot move '{path}' aside") from None
        return aside

    def remove_live_leftovers(self) -> int:
        """Delete temporary live-set files of writes cut short (kill -9); how many.

        Only our own pattern (``.live.json.<12 hex>.tmp``), only regular files. Call at
        start, before anything writes the live set.
        """
        removed = 0
        path = self.live_state_path
        ours = re.compile(rf"\.{re.escape(path.name)}\.[0-9a-f]{{12}}\.tmp")
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(path.parent):
                if not (ours.fullmatch(entry.name) and entry.is_file(follow_symlinks=False)):
                    continue
                try:
                    os.unlink(entry.path)
                except FileNotFoundError:
                    continue
                except OSError as exc:  # a read-only state dir: nothing can be cleaned
                    log.warning("store: cannot remove %s: %s", entry.path, exc.strerror)
                    continue
                removed += 1
                log.info("store: removed an interrupted live-set write %s", entry.name)
        return removed

    def write_live_state(self, entries: Sequence[LiveEntry]) -> None:
        """Replace ``live.json`` atomically (temporary file, fsync, rename, fsync dir)."""
        path = self.live_state_path
        _check_live(entries, str(path))
        document = {
            "schema": _LIVE_SCHEMA,
            "models": [
                {
                    "name": e.name,
                    "version": e.version,
                    "default": e.default,
                    # One flat object, as since the first version of live.json.
                    "settings": {
                        **e.settings.to_dict(),
                        **({"device": e.device} if e.device else {}),
                    },
                }
                for e in entries
            ],
        }
        try:
            data = json.dumps(document, indent=2, sort_keys=True).encode() + b"\n"
        except (TypeError, ValueError) as exc:
            raise StoreError(f"live state: settings are not JSON ({exc})") from None
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as out:
                out.write(data)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise StoreError.from_os(exc, f"cannot write the live set '{path}'") from None
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise

    # -- internals ------------------------------------------------------------------------

    def _install(self, archive: Path, staging: Path) -> InstalledModel:
        unpacked = staging / "model"
        try:
            manifest = extract_archive(archive, unpacked, trust=self.trust)
        except OSError as exc:  # disk full, permissions: the store's trouble, not the archive's
            raise StoreError.from_os(exc, f"cannot unpack '{archive}' into the store") from None
        target = self._version_dir(manifest.name, manifest.version)
        if target.exists() or target.is_symlink():
            return self._existing(target, manifest)
        try:
            if _ensure_dir(target.parent):
                fsync_dir(self.root)
            os.rename(unpacked, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                target.parent.rmdir()  # only succeeds when empty (nothing else there)
            raise StoreError.from_os(
                exc,
                f"cannot install model '{manifest.name}' version '{manifest.version}' "
                f"into '{target}'",
            ) from None
        fsync_dir(target.parent)
        log.info("store: installed %s %s from %s", manifest.name, manifest.version, archive)
        return InstalledModel(manifest.name, manifest.version, target, manifest)

    def _existing(self, target: Path, manifest: Manifest) -> InstalledModel:
        current = self.get(manifest.name, manifest.version)
        if current.manifest.to_dict() != manifest.to_dict():
            raise StoreError(
                f"model '{manifest.name}' version '{manifest.version}' is already installed "
                "with different content; versions are immutable (install a new version)"
            )
        log.info("store: %s %s already installed", manifest.name, manifest.version)
        return current

    def _version_dir(self, name: str, version: str) -> Path:
        for what, value in (("name", name), ("version", version)):
            if not _NAME_RE.match(value):
                raise NotFound(f"model {what} '{value}' is not a valid store name")
        return self.root / name / version

    def _new_staging(self) -> Path:
        staging_root = self.root / STAGING
        staging_root.mkdir(parents=True, exist_ok=True)
        path = staging_root / secrets.token_hex(8)
        path.mkdir(mode=0o700)
        return path

    @staticmethod
    def _children(path: Path) -> Iterator[Path]:
        if not path.is_dir():
            return iter(())
        return (
            p
            for p in path.iterdir()
            if not p.name.startswith(".") and p.is_dir() and not p.is_symlink()
        )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One writer at a time: a thread lock plus ``flock`` on ``<root>/.lock``."""
        self.root.mkdir(parents=True, exist_ok=True)
        with self._lock, open(self.root / _LOCK, "a+b") as lock_file:
            fcntl.flock(lock_file.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file.fileno(), fcntl.LOCK_UN)


def _ensure_dir(path: Path) -> bool:
    try:
        path.mkdir(mode=0o755)
    except FileExistsError:
        if not path.is_dir() or path.is_symlink():
            raise NotADirectoryError(20, "exists and is not a directory", str(path)) from None
        return False
    return True


def _live_entry(raw: Any) -> LiveEntry:
    settings = dict(raw.get("settings", {}))
    device = settings.get("device")
    return LiveEntry(
        str(raw["name"]),
        str(raw["version"]),
        bool(raw["default"]),
        BatchingSettings.from_dict(settings),
        None if device is None else str(device),
    )


def _check_live(entries: Sequence[LiveEntry], source: str) -> None:
    seen: set[tuple[str, str]] = set()
    defaults: set[str] = set()
    for entry in entries:
        key = (entry.name, entry.version)
        if key in seen:
            raise StoreError(f"live state '{source}': {entry.name} {entry.version} listed twice")
        seen.add(key)
        if entry.default:
            if entry.name in defaults:
                raise StoreError(
                    f"live state '{source}': model '{entry.name}' has more than one default version"
                )
            defaults.add(entry.name)
