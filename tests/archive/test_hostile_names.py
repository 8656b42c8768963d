"""Names and JSON that attack the reader rather than the disk: NUL bytes zipfile would cut
away, control characters, names too long to repeat, nesting that overflows a parser, a
TorchServe .mar handed over where an archive belongs, and a disk that fills mid-extract."""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from archive_helpers import hand_archive, manifest_json, rewrite, tree_snapshot, write_zip

from edgeserve.archive.format import (
    extract_archive,
    read_manifest,
    read_tree_manifest,
    verify_tree,
)
from edgeserve.archive.safezip import shown
from edgeserve.archive.signing import TrustStore
from edgeserve.errors import ECHO_LIMIT, ArchiveError, VerificationError
from edgeserve.store.model_store import ModelStore

MODEL = b"not really torchscript, the format does not care"


def test_shown_escapes_control_characters_and_clips() -> None:
    assert shown("a\x00b\nc\x1b") == "a\\x00b\\nc\\x1b"
    assert shown("model.pt") == "model.pt"
    long = shown("x" * 20_000)
    assert len(long) == ECHO_LIMIT and long.endswith("…")


def test_a_nul_in_a_stored_member_name_is_refused_under_that_name(tmp_path: Path) -> None:
    plain = hand_archive(tmp_path / "plain.esar", {"model.pt": MODEL}, [("evilXname", b"x")])
    hostile = tmp_path / "nul.esar"
    hostile.write_bytes(plain.read_bytes().replace(b"evilXname", b"evil\x00name"))
    with zipfile.ZipFile(hostile) as zf:  # what zipfile shows: the name cut at the NUL
        assert "evil" in zf.namelist()
    with pytest.raises(ArchiveError) as caught:
        read_manifest(hostile, trust=None)
    assert "member 'evil\\x00name' contains a NUL byte" in str(caught.value)


@pytest.mark.parametrize("name", ["a\nb", "esc\x1b[31m", "del\x7f"])
def test_control_characters_in_member_names(tmp_path: Path, name: str) -> None:
    archive = hand_archive(tmp_path / "a.esar", {"model.pt": MODEL, name: b"x"})
    with pytest.raises(ArchiveError) as caught:
        extract_archive(archive, tmp_path / "dest", trust=None)
    message = str(caught.value)
    assert f"member '{shown(name)}' contains a control character" in message
    assert not any(ord(c) < 0x20 for c in message)
    assert not (tmp_path / "dest").exists()


def test_a_long_member_name_is_clipped_in_the_message(tmp_path: Path) -> None:
    name = "x" * 20_000 + "\\y"
    archive = hand_archive(tmp_path / "a.esar", {"model.pt": MODEL, name: b"x"})
    with pytest.raises(ArchiveError) as caught:
        read_manifest(archive, trust=None)
    message = str(caught.value)
    assert "contains a backslash" in message and len(message) < ECHO_LIMIT + 200


def test_a_deeply_nested_manifest_is_refused(tmp_path: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    archive = write_zip(tmp_path / "deep.esar", [("manifest.json", deep), ("model.pt", MODEL)])
    with pytest.raises(ArchiveError, match=r"manifest.json is not valid JSON \(nested deeper"):
        read_manifest(archive, trust=None)


def test_a_deeply_nested_manifest_on_disk_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "manifest.json").write_bytes(b"{" * 50_000)
    with pytest.raises(ArchiveError, match="nested deeper than 32 levels"):
        verify_tree(folder, trust=None)


def test_a_deeply_nested_signature_is_a_verification_error(
    tmp_path: Path, signed_archive: Path, trust: TrustStore
) -> None:
    deep = b"[" * 2000 + b"]" * 2000
    archive = rewrite(
        signed_archive, tmp_path / "deep-sig.esar", replace={"signature.ed25519.json": deep}
    )
    with pytest.raises(VerificationError, match=r"is not JSON \(nested deeper than 4 levels\)"):
        read_manifest(archive, trust=trust)


def test_a_mar_is_known_by_its_content(tmp_path: Path) -> None:
    manifest = b'{"model": {"serializedFile": "m.pt"}}'
    entries = [("MAR-INF/", b""), ("MAR-INF/MANIFEST.json", manifest), ("m.pt", MODEL)]
    nameless = write_zip(tmp_path / "upload-without-suffix", entries)
    with pytest.raises(ArchiveError) as caught:
        extract_archive(nameless, tmp_path / "dest", trust=None)
    assert "is a TorchServe .mar; convert it first" in str(caught.value)
    assert "edgeserve package --from-mar FILE.mar" in str(caught.value)


def _open_files() -> list[str]:
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            found.append(os.readlink(f"/proc/self/fd/{fd}"))
        except FileNotFoundError:  # the listing's own descriptor, closed meanwhile
            continue
    return found


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (root only: mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_mid_extract_closes_the_archive_at_once(
    tmp_path: Path, small_disk: Path
) -> None:
    """The archive's descriptor is closed when the error is raised, not when the garbage
    collector gets to the member stream the failed write left suspended."""
    members = {"model.pt": MODEL, "big.bin": os.urandom(3 << 20)}
    entries = [("manifest.json", manifest_json(members)), *members.items()]
    archive = write_zip(tmp_path / "a.esar", entries)
    with pytest.raises(OSError) as caught:
        extract_archive(archive, small_disk / "dest", trust=None)
    assert caught.value.errno == errno.ENOSPC
    assert str(archive) not in _open_files(), "the archive is still open"
    assert tree_snapshot(small_disk) == []


def _refused_at_once(fifo: Path, read: Callable[[], object]) -> BaseException:
    """What ``read`` raised, within 5 s; fails (after releasing it) if it waited on the FIFO."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            read()
        except BaseException as exc:  # what it raised is the result
            outcome.append(exc)
        else:
            outcome.append(None)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(5)
    if worker.is_alive():  # the bug: open() waits for a writer; give it one
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail(f"reading {fifo.name} waited for a writer")
    assert outcome[0] is not None, "a FIFO was read as if it were a file"
    return outcome[0]


def test_a_fifo_given_as_an_archive_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.esar"
    os.mkfifo(fifo)
    refused = _refused_at_once(fifo, lambda: read_manifest(fifo, trust=None))
    assert isinstance(refused, ArchiveError)
    assert str(refused) == f"archive '{fifo}': is not a regular file"


def test_a_fifo_in_the_store_is_refused_not_waited_on(tmp_path: Path) -> None:
    """``store.list`` (and ``verify_tree``, after its walk) open files from the store: a
    FIFO there must not hang the thread that holds the store's lock."""
    version_dir = tmp_path / "models" / "mlp" / "1"
    version_dir.mkdir(parents=True)
    fifo = version_dir / "manifest.json"
    os.mkfifo(fifo)
    refused = _refused_at_once(fifo, lambda: read_tree_manifest(version_dir))
    assert isinstance(refused, ArchiveError)
    assert "'manifest.json' is not a regular file" in str(refused)
    store = ModelStore(tmp_path / "models", None, live_state_path=tmp_path / "live.json")
    assert store.list() == []
