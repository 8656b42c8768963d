"""Hostile archives and paths an outsider hands a real daemon get a precise, one-line answer
(issue 10, finding 12): NUL bytes in an archive path or a member name, JSON nested to blow
the parser's stack in a manifest or a signature file, a TorchServe ``.mar`` given to
``models load``, and an install into a full state dir (a real tmpfs filled by another
writer). Every case leaves the store as it was and the daemon serving.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgeserve.api.client import ClientError
from edgeserve.cli import main
from tests.api.support import wait_for
from tests.management.conftest import drop_in

X = np.ones((1, 16), dtype=np.float32)
DEEP = 100_000


def _members(archive: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(archive) as zf:
        return {info.filename: zf.read(info) for info in zf.infolist()}


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _refusals(client: Any, daemon: Any, archive: Path, label: str) -> list[ClientError]:
    """Load ``archive`` from archive_dir and by upload; both must be refused."""
    drop_in(daemon, archive, label)
    caught = []
    for attempt in (lambda: client.load(archive=label), lambda: client.upload(archive)):
        with pytest.raises(ClientError) as refused:
            attempt()
        caught.append(refused.value)
    return caught


def _store_is_clean(daemon: Any) -> None:
    models = daemon.state_dir / "models"
    assert sorted(p.name for p in (models / "mlp").iterdir()) == ["1"]
    assert not list((models / ".staging").iterdir()), "an install left something in staging"
    with daemon.client() as client:
        served, outputs = client.infer("mlp", {"x": X})
    assert served == "1" and outputs["output__0"].shape == (1, 4)


def test_nul_bytes_and_long_names_in_an_archive_path_or_member_name(
    mdaemons, mlp_archive_factory, client_of, tmp_path
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)

    with pytest.raises(ClientError) as caught:
        client.load(archive="mlp\x00.esar")
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert caught.value.message == "archive 'mlp\\x00.esar': the path contains a NUL byte"

    for long in ("d/" * 10_000 + "mlp.esar", "m" * 20_000 + ".esar"):
        with pytest.raises(ClientError) as caught:
            client.load(archive=long)
        assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
        assert caught.value.message.endswith("…': the path is over 4096 bytes")
        assert len(caught.value.message) < 200
    for long in ("m" * 300 + ".esar", "../" + "m" * 300):  # under PATH_MAX, still clipped
        with pytest.raises(ClientError) as caught:
            client.load(archive=long)
        assert caught.value.code != grpc.StatusCode.INTERNAL, caught.value
        assert len(caught.value.message) < 300, caught.value.message

    # zipfile cuts a name at its NUL: the member must be refused under its stored name.
    members = _members(mlp_archive_factory("2"))
    members["evilXname.bin"] = b"x"
    plain = _zip(tmp_path / "plain.esar", members)
    hostile = tmp_path / "nul.esar"
    hostile.write_bytes(plain.read_bytes().replace(b"evilXname.bin", b"evil\x00name.bin"))
    for refused in _refusals(client, daemon, hostile, "nul.esar"):
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert "member 'evil\\x00name.bin' contains a NUL byte" in refused.message
        assert "\x00" not in refused.message
    _store_is_clean(daemon)


@pytest.mark.parametrize("member", ["manifest.json", "signature.ed25519.json"])
def test_deeply_nested_json_is_refused_not_a_crash(
    member, mdaemons, mlp_archive_factory, client_of, tmp_path
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)
    members = _members(mlp_archive_factory("2"))
    depth = DEEP if member == "manifest.json" else 2000  # a signature file has 4096 bytes
    members[member] = b"[" * depth + b"]" * depth
    hostile = _zip(tmp_path / "deep.esar", members)
    expected = {
        "manifest.json": "manifest.json is not valid JSON (nested deeper than 32 levels)",
        "signature.ed25519.json": "signature.ed25519.json is not JSON (nested deeper than",
    }[member]
    for refused in _refusals(client, daemon, hostile, "deep.esar"):
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert expected in refused.message
    assert "Traceback" not in daemon.log()
    _store_is_clean(daemon)


def test_a_torchserve_mar_given_to_models_load_names_the_conversion(
    mdaemons, mlp_archive_factory, client_of, tmp_path, capsys
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)
    manifest = b'{"model": {"serializedFile": "m.pt", "handler": "image_classifier"}}'
    mar = _zip(tmp_path / "tiny.mar", {"MAR-INF/MANIFEST.json": manifest, "m.pt": b"x"})
    for refused in _refusals(client, daemon, mar, "tiny.mar"):
        assert refused.code == grpc.StatusCode.INVALID_ARGUMENT, refused
        assert "is a TorchServe .mar; convert it first" in refused.message
        assert "edgeserve package --from-mar FILE.mar" in refused.message

    capsys.readouterr()
    code = main(["models", "load", str(mar), "--management", client.address])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert err == (
        f"edgeserve: error: archive '{mar}': is a TorchServe .mar; convert it first (and "
        "sign it when trust keys are set): edgeserve package --from-mar FILE.mar "
        "--sign-key KEY -o FILE.esar\n"
    )
    _store_is_clean(daemon)


@pytest.fixture
def small_state_dir() -> Iterator[Path]:
    """A real 48 MiB tmpfs for a daemon's state dir (root only: mount)."""
    mount = Path(tempfile.mkdtemp(prefix="es-full-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)
        mount.rmdir()


def _fill(disk: Path) -> Path:
    """Another writer takes every free byte (dd until ENOSPC)."""
    filler = disk / "filler"
    done = subprocess.run(
        ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, text=True
    )
    assert "No space left" in done.stderr, done.stderr
    return filler


def _spooled(daemon: Any) -> list[str]:
    """The daemon's open files under <state_dir>/uploads (nameless: only /proc sees them)."""
    uploads = os.path.realpath(daemon.state_dir / "uploads") + "/"
    found = []
    for fd in os.listdir(f"/proc/{daemon.process.pid}/fd"):
        try:
            target = os.readlink(f"/proc/{daemon.process.pid}/fd/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith(uploads):
            found.append(target)
    return found


def test_an_install_into_a_full_state_dir(
    mdaemons, mlp_archive_factory, client_of, small_state_dir
):
    daemon = mdaemons.start(mlp_archive_factory("1"), state_dir=small_state_dir)
    client = client_of(daemon)
    archive = mlp_archive_factory("2")
    drop_in(daemon, archive, "mlp-2.esar")  # in archive_dir before the disk fills
    live_before = (daemon.state_dir / "live.json").read_bytes()
    filler = _fill(small_state_dir)

    for attempt in (lambda: client.load(archive="mlp-2.esar"), lambda: client.upload(archive)):
        with pytest.raises(ClientError) as caught:
            attempt()
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        assert caught.value.message.startswith("state dir full: "), caught.value.message
        assert caught.value.message.endswith("; nothing was changed"), caught.value.message
    assert (daemon.state_dir / "live.json").read_bytes() == live_before
    assert not _spooled(daemon)
    _store_is_clean(daemon)

    # Room for the spooled upload but not for unpacking it: refused by the store, and
    # the spooled file and staging are gone all the same. Freed a page at a time: the
    # daemon's log and telemetry on the same disk take some of what is freed, so a fixed
    # amount may leave too little even to spool (seen in CI).
    message = ""
    for _ in range(64):
        os.truncate(filler, max(0, filler.stat().st_size - 4096))
        with pytest.raises(ClientError) as caught:
            client.upload(archive)
        assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED, caught.value
        message = caught.value.message
        if "cannot unpack" in message:  # before: "does not fit", "cannot spool the upload"
            break
    assert message.startswith(f"state dir full: cannot unpack '{archive}' into"), message
    wait_for(lambda: not _spooled(daemon), "the spooled file to be closed")
    _store_is_clean(daemon)

    os.unlink(filler)  # space again: the same install goes through
    assert client.load(archive="mlp-2.esar")["version"] == "2"
