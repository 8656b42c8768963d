"""The model archive: one zip with ``manifest.json`` at its root (schema in ``manifest.py``).

Writing is deterministic (manifest first, then the signature, then members by name; fixed
timestamps and modes) and atomic (temporary file, fsync, rename).

Reading validates everything before a byte is written anywhere: the zip itself and every
entry under the rules of ``safezip`` (names, types, encryption, compression, zip bombs),
the manifest (JSON, schema), the signature when a ``TrustStore`` is given, and the member
set against ``manifest.files`` with each sha256. Every error is an ``ArchiveError`` naming
the archive, the problem and the member.

``verify_tree`` re-checks an unpacked directory the same way; the runtime only loads
directories that pass it. TorchServe ``.mar`` files are read by ``mar`` under the same
zip rules.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import secrets
import shutil
import stat
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from edgeserve import jsonsafe
from edgeserve.archive.manifest import MANIFEST_NAME, Manifest
from edgeserve.archive.mar import MAR_MANIFEST
from edgeserve.archive.safezip import (
    CHUNK,
    DEFAULT_LIMITS,
    ArchiveLimits,
    iter_member,
    member_name_problem,
    open_zip,
    read_member,
    scan_members,
    shown,
)
from edgeserve.archive.signing import SIGNATURE_NAME, TrustStore, sign_manifest
from edgeserve.errors import ArchiveError

log = logging.getLogger("edgeserve.archive")

RESERVED_NAMES = frozenset({MANIFEST_NAME, SIGNATURE_NAME})
MAR_HINT = (
    "convert it first (and sign it when trust keys are set): "
    "edgeserve package --from-mar FILE.mar --sign-key KEY -o FILE.esar"
)
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)
_FILE_ATTR = (stat.S_IFREG | 0o644) << 16


def _fail(source: str, problem: str, what: str = "archive") -> ArchiveError:
    return ArchiveError(f"{what} '{source}': {problem}")


def _names(names: list[str]) -> str:
    """Name up to five members, with the verb that agrees: "'a' is", "'a', 'b' are"."""
    listed = ", ".join(f"'{shown(n)}'" for n in names[:5]) + (", ..." if len(names) > 5 else "")
    return f"{listed} {'is' if len(names) == 1 else 'are'}"


def _listed_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be a member listed in ``manifest.files``, or None."""
    if name in RESERVED_NAMES:
        return "is a reserved name"
    return member_name_problem(name)


# -- writing --------------------------------------------------------------------------------


def manifest_bytes(manifest: Manifest) -> bytes:
    """The exact bytes stored (and signed) as ``manifest.json``."""
    return json.dumps(manifest.to_dict(), indent=2, sort_keys=True).encode() + b"\n"


def write_archive(
    path: Path,
    manifest: Manifest,
    members: Mapping[str, bytes | Path],
    *,
    sign_key: Path | None = None,
) -> Manifest:
    """Write an archive; ``manifest.files`` is recomputed from ``members``. Returns it.

    With ``sign_key`` (an Ed25519 private key PEM) the archive carries
    ``signature.ed25519.json`` over the manifest bytes.
    """
    source = str(path)
    for name in members:
        if problem := _listed_name_problem(name):
            raise _fail(source, f"cannot write member '{shown(name)}': it {problem}")
    names = sorted(members)
    final = dataclasses.replace(manifest, files={n: _digest_of(members[n]) for n in names})
    data = manifest_bytes(final)
    try:
        Manifest.from_dict(json.loads(data))
    except ArchiveError as exc:
        raise _fail(source, f"cannot write: {exc.message}") from None
    signature = sign_manifest(data, sign_key) if sign_key is not None else None
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as raw:
            with zipfile.ZipFile(raw, "w") as zf:
                _add_member(zf, MANIFEST_NAME, data)
                if signature is not None:
                    _add_member(zf, SIGNATURE_NAME, signature)
                for name in names:
                    _add_member(zf, name, members[name], final.files[name], source)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _fail(source, f"cannot be written ({exc.strerror or exc})") from exc
        raise
    log.info("wrote archive %s (%s %s, %d members)", path, final.name, final.version, len(names))
    return final


def _digest_of(content: bytes | Path) -> str:
    if isinstance(content, bytes):
        return hashlib.sha256(content).hexdigest()
    with open(content, "rb") as f:
        return _hash_stream(f)


def _hash_stream(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    return digest.hexdigest()


def _add_member(
    zf: zipfile.ZipFile,
    name: str,
    content: bytes | Path,
    expected: str | None = None,
    source: str = "",
) -> None:
    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = _FILE_ATTR
    info.create_system = 3
    if isinstance(content, bytes):
        zf.writestr(info, content)
        return
    digest = hashlib.sha256()
    with open(content, "rb") as src, zf.open(info, "w", force_zip64=True) as out:
        while chunk := src.read(CHUNK):
            digest.update(chunk)
            out.write(chunk)
    if digest.hexdigest() != expected:
        raise _fail(
            source, f"member '{shown(name)}' ({content}) changed while it was being written"
        )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- reading --------------------------------------------------------------------------------


@dataclass
class _Checked:
    manifest: Manifest
    manifest_bytes: bytes
    signature: bytes | None
    infos: dict[str, zipfile.ZipInfo]


def parse_manifest(data: bytes, source: str, what: str = "archive") -> Manifest:
    try:  # its size is bounded where it is read; the parser bounds its nesting
        parsed = jsonsafe.parse_json(data, max_bytes=len(data))
    except jsonsafe.JsonRefused as exc:
        raise _fail(source, f"{MANIFEST_NAME} is not valid JSON ({exc})", what) from None
    try:
        manifest = Manifest.from_dict(parsed)
    except ArchiveError as exc:
        raise _fail(source, exc.message, what) from None
    for name in manifest.files:
        if problem := _listed_name_problem(name):
            raise _fail(source, f"manifest lists member '{shown(name)}', which {problem}", what)
    return manifest


def _validate(
    zf: zipfile.ZipFile, source: str, trust: TrustStore | None, limits: ArchiveLimits
) -> _Checked:
    names = set(zf.namelist())
    if MAR_MANIFEST in names and MANIFEST_NAME not in names:
        # Known by content, before its directory entries are refused: a path from
        # management is an fd's, without the .mar suffix.
        raise _fail(source, f"is a TorchServe .mar; {MAR_HINT}")
    infos = scan_members(zf, source, limits)
    if MANIFEST_NAME not in infos:
        raise _fail(source, f"has no {MANIFEST_NAME} at its root")
    data = read_member(zf, infos[MANIFEST_NAME], source, limits.max_manifest_bytes)
    manifest = parse_manifest(data, source)
    signature = None
    if SIGNATURE_NAME in infos:
        signature = read_member(zf, infos[SIGNATURE_NAME], source, 4096)
    if trust is not None:
        trust.verify(data, signature, source=source)
    present = set(infos) - RESERVED_NAMES
    if missing := sorted(set(manifest.files) - present):
        raise _fail(source, f"member {_names(missing)} listed in the manifest but missing")
    if extra := sorted(present - set(manifest.files)):
        raise _fail(source, f"member {_names(extra)} not listed in the manifest")
    for name, expected in sorted(manifest.files.items()):
        digest = hashlib.sha256()
        for chunk in iter_member(zf, infos[name], source):
            digest.update(chunk)
        if digest.hexdigest() != expected:
            raise _fail(
                source,
                f"member '{shown(name)}' sha256 mismatch (manifest {expected[:12]}..., "
                f"content {digest.hexdigest()[:12]}...)",
            )
    return _Checked(manifest, data, signature, infos)


def read_manifest(
    path: Path, *, trust: TrustStore | None, limits: ArchiveLimits = DEFAULT_LIMITS
) -> Manifest:
    """Validate a whole archive (members, hashes, signature when ``trust``); its manifest."""
    with open_zip(path) as zf:
        return _validate(zf, str(path), trust, limits).manifest


def extract_archive(
    path: Path, dest: Path, *, trust: TrustStore | None, limits: ArchiveLimits = DEFAULT_LIMITS
) -> Manifest:
    """Validate, then unpack into ``dest`` (which must not exist), all or nothing.

    Members are written beside ``dest`` first (regular files, mode 0644, fsynced, each
    hashed again as it is written) and the directory is renamed to ``dest`` at the end.
    """
    source = str(path)
    if dest.exists() or dest.is_symlink():
        raise _fail(source, f"extract destination '{dest}' already exists")
    with open_zip(path) as zf:
        checked = _validate(zf, source, trust, limits)
        partial = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.partial")
        try:
            partial.mkdir(mode=0o755)
            _write_tree(zf, checked, partial, source)
            os.rename(partial, dest)
            fsync_dir(dest.parent)
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
    log.info("extracted %s to %s", path, dest)
    return checked.manifest


def _write_tree(zf: zipfile.ZipFile, checked: _Checked, root: Path, source: str) -> None:
    _write_file(root / MANIFEST_NAME, [checked.manifest_bytes])
    if checked.signature is not None:
        _write_file(root / SIGNATURE_NAME, [checked.signature])
    dirs = {root}
    for name, expected in sorted(checked.manifest.files.items()):
        target = root.joinpath(*name.split("/"))
        for parent in reversed(target.parents):
            if parent not in dirs and parent.is_relative_to(root) and parent != root:
                parent.mkdir(mode=0o755)
                dirs.add(parent)
        # closing(): a write that fails (disk full) must not leave the member's stream,
        # and with it the archive's file, open until the garbage collector finds it.
        with contextlib.closing(iter_member(zf, checked.infos[name], source)) as chunks:
            digest = _write_file(target, chunks)
        if digest != expected:
            raise _fail(source, f"member '{shown(name)}' changed while it was being extracted")
    for directory in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        fsync_dir(directory)


def _write_file(target: Path, chunks: Iterable[bytes]) -> str:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(target, flags, 0o644)
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
        os.fchmod(out.fileno(), 0o644)
        for chunk in chunks:
            digest.update(chunk)
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


# -- unpacked directories -------------------------------------------------------------------


def member_path(model_dir: Path, manifest: Manifest, member: str) -> Path:
    """The file of an archive member; ArchiveError unless listed and inside ``model_dir``.

    The store has verified the directory already; this is a second, cheap guard.
    """
    root = model_dir.resolve()
    path = (root / member).resolve()
    if member not in manifest.files or not path.is_relative_to(root):
        raise ArchiveError(
            f"model '{manifest.name}' version '{manifest.version}': "
            f"'{member}' is not a member of the archive"
        )
    return path


def verify_tree(model_dir: Path, *, trust: TrustStore | None) -> Manifest:
    """Re-verify an unpacked archive: manifest, signature (when ``trust``), files, hashes.

    Nothing may be there but ``manifest.json``, the listed files, their directories and
    ``signature.ed25519.json``; no symlinks.
    """
    source, what = str(model_dir), "model directory"
    if not model_dir.is_dir() or model_dir.is_symlink():
        raise _fail(source, "is not a directory", what)
    found, dirs = _walk(model_dir, source)
    if MANIFEST_NAME not in found:
        raise _fail(source, f"has no {MANIFEST_NAME}", what)
    data = _read_small(model_dir / MANIFEST_NAME, DEFAULT_LIMITS.max_manifest_bytes, source)
    manifest = parse_manifest(data, source, what)
    signature = None
    if SIGNATURE_NAME in found:
        signature = _read_small(model_dir / SIGNATURE_NAME, 4096, source)
    if trust is not None:
        trust.verify(data, signature, source=source)
    listed = set(manifest.files)
    if missing := sorted(listed - found):
        raise _fail(source, f"file {_names(missing)} listed in the manifest but missing", what)
    if extra := sorted(found - listed - RESERVED_NAMES):
        raise _fail(source, f"file {_names(extra)} not listed in the manifest", what)
    wanted_dirs = {"/".join(n.split("/")[:i]) for n in listed for i in range(1, n.count("/") + 1)}
    if extra_dirs := sorted(dirs - wanted_dirs):
        raise _fail(source, f"directory {_names(extra_dirs)} not part of the archive", what)
    for name, expected in sorted(manifest.files.items()):
        fd = _open_regular(model_dir.joinpath(*name.split("/")), source)
        with os.fdopen(fd, "rb") as f:
            actual = _hash_stream(f)
        if actual != expected:
            raise _fail(source, f"file '{shown(name)}' sha256 mismatch (modified on disk?)", what)
    return manifest


def read_tree_manifest(model_dir: Path) -> Manifest:
    """The manifest of an unpacked archive, bounded and parsed, nothing else checked
    (listing the store); ``ArchiveError`` or ``OSError`` when it cannot be read."""
    source = str(model_dir)
    data = _read_small(model_dir / MANIFEST_NAME, DEFAULT_LIMITS.max_manifest_bytes, source)
    return parse_manifest(data, source, "model directory")


def _walk(root: Path, source: str) -> tuple[set[str], set[str]]:
    files: set[str] = set()
    dirs: set[str] = set()
    for current, dirnames, filenames in os.walk(root, followlinks=False):
        rel = Path(current).relative_to(root)
        for entry in [*dirnames, *filenames]:
            path = Path(current, entry)
            name = (rel / entry).as_posix()
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                dirs.add(name)
            elif stat.S_ISREG(mode):
                files.add(name)
            else:
                kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
                raise _fail(source, f"'{shown(name)}' is {kind}", "model directory")
    return files, dirs


def _open_regular(path: Path, source: str) -> int:
    """An fd of ``path``, a regular file: a FIFO swapped in since the walk is refused at
    once (O_NONBLOCK), not waited on with the store's lock held."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise _fail(source, f"'{shown(path.name)}' is not a regular file", "model directory")
    os.set_blocking(fd, True)
    return fd


def _read_small(path: Path, limit: int, source: str) -> bytes:
    fd = _open_regular(path, source)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise _fail(source, f"'{path.name}' is larger than {limit} bytes", "model directory")
    return data
