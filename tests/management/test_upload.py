"""``edgeserve models load ./file.esar``: an archive from outside archive_dir, streamed over
the management socket (UploadModel) and verified exactly as a file in archive_dir.

Real daemons, real archives, the CLI in-process through ``main``; raw stubs where a test
must send what the CLI never would (too many bytes, a stalled or abandoned stream).
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgeserve.api.client import ClientError
from edgeserve.api.management_client import ManagementClient
from edgeserve.api.upload import MAX_UPLOAD_BYTES
from edgeserve.archive.safezip import DEFAULT_LIMITS
from edgeserve.cli import main
from edgeserve.proto import management_pb2 as pb
from edgeserve.proto import management_pb2_grpc as pb_grpc
from tests.api.support import wait_for
from tests.conftest import free_port
from tests.management.conftest import drop_in, management_address, open_run_dir

X = np.ones((1, 16), dtype=np.float32)
HELD_S = 60  # the most a stalled test stream waits for the test to let it go


@pytest.fixture
def outside_dir() -> Iterator[Path]:
    """A folder outside every daemon's state dir (and so outside archive_dir), readable
    by other users (the permission test runs the CLI as one)."""
    folder = Path(tempfile.mkdtemp(prefix="es-upload-"))
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out, err


def _spool_fds(daemon: Any) -> list[str]:
    """What the daemon's open descriptors under <state_dir>/uploads point at."""
    uploads = os.path.realpath(daemon.state_dir / "uploads") + "/"
    found = []
    folder = f"/proc/{daemon.process.pid}/fd"
    for fd in os.listdir(folder):
        try:
            target = os.readlink(f"{folder}/{fd}")
        except FileNotFoundError:  # closed meanwhile
            continue
        if target.startswith(uploads):
            found.append(target)
    return found


def _store_versions(daemon: Any) -> list[str]:
    folder = daemon.state_dir / "models" / "mlp"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _served_version(daemon: Any, version: str = "") -> str:
    with daemon.client() as client:
        served, outputs = client.infer("mlp", {"x": X}, version=version)
    assert outputs["output__0"].shape == (1, 4)
    return served


def _rewrite(source: Path, target: Path, change: dict[str, bytes | None]) -> Path:
    """A copy of the archive ``source`` with members replaced (bytes) or dropped (None)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for info in old.infolist():
            data = change.get(info.filename, old.read(info))
            if data is not None:
                new.writestr(info, data)
    return target


def _chunks(header: pb.UploadHeader, *chunks: bytes, hold: threading.Event | None = None):
    yield pb.UploadModelRequest(header=header)
    for chunk in chunks:
        yield pb.UploadModelRequest(chunk=chunk)
    if hold is not None:  # a client that stops sending without ending the stream
        hold.wait(HELD_S)


def _stub(daemon: Any) -> tuple[grpc.Channel, pb_grpc.ManagementStub]:
    channel = grpc.insecure_channel(management_address(daemon))
    return channel, pb_grpc.ManagementStub(channel)


def test_the_upload_cap_is_the_archive_size_limit():
    assert MAX_UPLOAD_BYTES == DEFAULT_LIMITS.max_total_bytes


def test_upload_from_outside_archive_dir_loads_and_serves(
    mdaemons, mlp_archive_factory, client_of, outside_dir, monkeypatch, capsys
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)
    at = ("--management", management_address(daemon))
    shutil.copyfile(mlp_archive_factory("2"), outside_dir / "mlp-2.esar")
    shutil.copyfile(mlp_archive_factory("3"), outside_dir / "mlp-3.esar")
    monkeypatch.chdir(outside_dir)

    code, out, err = _cli(capsys, "models", "load", "./mlp-2.esar", "--max-batch-size", "4", *at)
    assert (code, err) == (0, "")
    assert out.strip() == "loaded mlp version 2 on cpu"
    assert _served_version(daemon) == "1", "not the default without --default"
    assert _served_version(daemon, "2") == "2"
    assert client.describe("mlp", "2")["versions"][0]["settings"]["max_batch_size"] == 4

    absolute = str(outside_dir / "mlp-3.esar")
    code, out, err = _cli(capsys, "models", "load", absolute, "--default", "--json", *at)
    assert code == 0, err
    assert '"default": true' in out and '"version": "3"' in out
    assert _served_version(daemon) == "3"

    assert _store_versions(daemon) == ["1", "2", "3"]
    assert not list((daemon.state_dir / "incoming").glob("*")), "nothing in archive_dir"
    assert "installs upload './mlp-2.esar'" in daemon.log()
    uploads = daemon.state_dir / "uploads"
    assert stat.S_IMODE(uploads.stat().st_mode) == 0o700 and not list(uploads.iterdir())
    wait_for(lambda: not _spool_fds(daemon), "the spooled files to be closed")


def test_a_bare_name_is_a_file_in_archive_dir(
    mdaemons, mlp_archive_factory, outside_dir, monkeypatch, capsys
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    at = ("--management", management_address(daemon))
    drop_in(daemon, mlp_archive_factory("2"), "mlp-2.esar")
    shutil.copyfile(mlp_archive_factory("3"), outside_dir / "mlp-3.esar")
    monkeypatch.chdir(outside_dir)

    code, out, err = _cli(capsys, "models", "load", "mlp-2.esar", "--default", *at)
    assert (code, err) == (0, "")
    assert out.strip() == "loaded mlp version 2 on cpu (default)"
    assert "installs mlp-2.esar" in daemon.log() and "installs upload" not in daemon.log()

    # A bare name that exists only here is still looked for in archive_dir, with a hint.
    code, out, err = _cli(capsys, "models", "load", "mlp-3.esar", *at)
    incoming = (daemon.state_dir / "incoming").resolve()
    assert code == 1 and out == ""
    assert err.strip() == (
        f"edgeserve: error: archive 'mlp-3.esar' does not exist in {incoming}; "
        "to upload the file here, give ./mlp-3.esar"
    )
    # A URL is not a path: the daemon refuses it, as before.
    code, out, err = _cli(capsys, "models", "load", "https://example.com/mlp-3.esar", *at)
    assert code == 1 and "is a URL; the daemon never fetches" in err
    assert _store_versions(daemon) == ["1", "2"]


@pytest.mark.parametrize("damage", ["unsigned", "tampered"])
def test_a_bad_archive_is_refused_as_from_archive_dir(
    damage, mdaemons, mlp_archive_factory, client_of, outside_dir, capsys
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)
    good = mlp_archive_factory("2")
    if damage == "unsigned":
        bad = _rewrite(good, outside_dir / "bad.esar", {"signature.ed25519.json": None})
    else:
        bad = _rewrite(good, outside_dir / "bad.esar", {"model.pt": b"not the model"})
    drop_in(daemon, bad, "bad.esar")
    live_before = (daemon.state_dir / "live.json").read_bytes()
    models_before = client.list_models()

    with pytest.raises(ClientError) as from_dir:
        client.load(archive="bad.esar")
    with pytest.raises(ClientError) as uploaded:
        client.upload(bad)
    assert from_dir.value.code == uploaded.value.code == grpc.StatusCode.INVALID_ARGUMENT
    expected = "is not signed" if damage == "unsigned" else "member 'model.pt' sha256 mismatch"
    assert from_dir.value.message.startswith("archive 'bad.esar'"), from_dir.value.message
    assert expected in from_dir.value.message
    assert uploaded.value.message == from_dir.value.message.replace("'bad.esar'", f"'{bad}'")

    code, out, err = _cli(capsys, "models", "load", str(bad), "--management", client.address)
    assert (code, out) == (2, "")
    assert err == f"edgeserve: error: {uploaded.value.message}\n"

    assert client.list_models() == models_before
    assert (daemon.state_dir / "live.json").read_bytes() == live_before
    assert _store_versions(daemon) == ["1"]
    wait_for(lambda: not _spool_fds(daemon), "the spooled files to be closed")


def test_an_oversize_archive_is_refused_before_it_is_sent(
    mdaemons, mlp_archive_factory, client_of, outside_dir, capsys
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    big = outside_dir / "big.esar"
    with big.open("wb") as sparse:  # takes no disk space
        sparse.truncate(MAX_UPLOAD_BYTES + 1)

    code, out, err = _cli(
        capsys, "models", "load", str(big), "--management", client_of(daemon).address
    )
    assert (code, out) == (2, "")
    assert err.strip() == (
        f"edgeserve: error: archive '{big}' is 2147483649 bytes (2 GiB), over the archive "
        "size limit of 2147483648 bytes (2 GiB)"
    )
    assert "upload" not in daemon.log()

    missing = outside_dir / "missing.esar"
    code, _, err = _cli(
        capsys, "models", "load", str(missing), "--management", client_of(daemon).address
    )
    assert code == 2
    assert err.strip() == (
        f"edgeserve: error: archive '{missing}' cannot be read: No such file or directory"
    )


def test_the_daemon_holds_an_upload_to_its_bounds(mdaemons, mlp_archive_factory, client_of):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    archive = mlp_archive_factory("2").read_bytes()
    channel, stub = _stub(daemon)
    hold = threading.Event()
    cases = [
        # over the limit: refused on the header, before any byte is taken
        (
            _chunks(pb.UploadHeader(filename="huge.esar", size=MAX_UPLOAD_BYTES + 1), b"x"),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "archive 'huge.esar' is 2147483649 bytes (2 GiB), over the archive size limit of "
            "2147483648 bytes (2 GiB)",
        ),
        # a byte more than declared stops the stream there: the stream is still open
        # (held), so an answer proves the daemon did not wait for its end
        (
            _chunks(pb.UploadHeader(filename="a.esar", size=1000), archive, hold=hold),
            grpc.StatusCode.INVALID_ARGUMENT,
            "archive 'a.esar': more than the 1000 bytes its header declared",
        ),
        (
            _chunks(pb.UploadHeader(filename="a.esar", size=len(archive)), archive[:100]),
            grpc.StatusCode.INVALID_ARGUMENT,
            f"archive 'a.esar': the upload ended after 100 of {len(archive)} bytes",
        ),
        (
            iter([]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UploadModel: the stream is empty (no header)",
        ),
        (
            iter([pb.UploadModelRequest(chunk=archive)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UploadModel: the first message must be the header",
        ),
        (
            iter([pb.UploadModelRequest(header=pb.UploadHeader(size=10))] * 2),
            grpc.StatusCode.INVALID_ARGUMENT,
            "archive 'upload': a second header in the stream",
        ),
        (
            _chunks(pb.UploadHeader(filename="x" * 5000, size=10)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "UploadModel: filename is over 4096 bytes",
        ),
        (
            _chunks(
                pb.UploadHeader(filename="a.esar", size=10, settings=pb.ModelSettings(instances=0))
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "settings.instances: must be 1..64, got 0",
        ),
    ]
    try:
        for messages, code, message in cases:
            with pytest.raises(grpc.RpcError) as caught:
                stub.UploadModel(messages, timeout=HELD_S / 2)
            assert (caught.value.code(), caught.value.details()) == (code, message)
    finally:
        hold.set()
        channel.close()
    assert [m["version"] for m in client_of(daemon).list_models()] == ["1"]
    assert _store_versions(daemon) == ["1"]
    wait_for(lambda: not _spool_fds(daemon), "the spooled files to be closed")


@pytest.mark.parametrize("ending", ["cancelled", "deadline"])
def test_an_abandoned_upload_leaves_no_file(ending, mdaemons, mlp_archive_factory, client_of):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    archive = mlp_archive_factory("2").read_bytes()
    header = pb.UploadHeader(filename="mlp-2.esar", size=len(archive))
    channel, stub = _stub(daemon)
    hold = threading.Event()
    try:
        half = archive[: len(archive) // 2]
        # deadline: long enough to see the spooled file before the daemon gives up
        call = stub.UploadModel.future(
            _chunks(header, half, hold=hold), timeout=5 if ending == "deadline" else HELD_S
        )
        wait_for(lambda: len(_spool_fds(daemon)) == 1, "the upload to be spooled")
        [spooled] = _spool_fds(daemon)
        assert spooled.endswith("(deleted)"), "the spooled file has no name"
        if ending == "cancelled":
            assert call.cancel()
        else:
            with pytest.raises(grpc.RpcError) as caught:
                call.result()
            assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: not _spool_fds(daemon), "the spooled file to be closed")
    finally:
        hold.set()
        channel.close()
    assert not list((daemon.state_dir / "uploads").iterdir())
    assert _store_versions(daemon) == ["1"]
    # the daemon is fine and takes the next upload
    assert client_of(daemon).upload(mlp_archive_factory("2"))["version"] == "2"


def test_uploads_pass_the_same_gate(
    mdaemons, mlp_archive_factory, client_of, tmp_path, outside_dir, accounts
):
    token = "s3cret-token-" + "x" * 20
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    tcp = f"127.0.0.1:{free_port()}"
    # No allowed group: the socket keeps root's group, so another user running with that
    # gid passes the file mode; the per-call check on peer credentials must refuse it.
    daemon = mdaemons.start(
        mlp_archive_factory("1"),
        management={
            "listen": ["unix://{run_dir}/management.sock", tcp],
            "token_file": str(token_file),
            "allowed_group": None,
        },
    )
    open_run_dir(daemon, os.getegid())
    archive = Path(shutil.copyfile(mlp_archive_factory("2"), outside_dir / "mlp-2.esar"))
    archive.chmod(0o644)
    before = client_of(daemon).list_models()

    at = ("--management", management_address(daemon))
    refused = accounts.outsider.run_cli("models", "load", str(archive), *at, gid=os.getegid())
    assert refused.returncode == 1, refused
    assert refused.stderr.startswith("edgeserve: error: PERMISSION_DENIED: ")
    assert f"uid {accounts.outsider.uid}" in refused.stderr and "Traceback" not in refused.stderr
    assert "UploadModel refused" in daemon.log()

    with ManagementClient(tcp) as no_token, pytest.raises(ClientError) as caught:
        no_token.upload(archive)
    assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED
    assert caught.value.message == "missing 'authorization: Bearer <token>' metadata"
    assert client_of(daemon).list_models() == before
    assert _store_versions(daemon) == ["1"]

    with ManagementClient(tcp, token=token) as admitted:
        assert admitted.upload(archive, make_default=True)["version"] == "2"
    assert _served_version(daemon) == "2"


def test_the_help_says_which_is_which(capsys):
    code, out, _ = _cli(capsys, "models", "load", "--help")
    assert code == 0
    text = " ".join(out.split())
    assert "a path with a / (./mlp-2.esar, /tmp/mlp-2.esar): this file, uploaded" in text
    assert "a bare name (mlp-2.esar): that file in the daemon's management.archive_dir" in text
