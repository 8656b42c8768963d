"""Who may manage: group members on the Unix socket, token holders on loopback TCP, and
archives only from the allowed directory. Every refusal leaves the live set as it was."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import grpc
import pytest

from edgeserve.api.client import ClientError
from edgeserve.api.management_client import ManagementClient
from tests.conftest import free_port
from tests.management.conftest import drop_in, management_address, open_run_dir, run_cli


def test_caller_outside_the_allowed_group_is_refused(
    mdaemons, mlp_archive_factory, client_of, accounts
):
    daemon = mdaemons.start(mlp_archive_factory("1"), management={"allowed_group": accounts.group})
    open_run_dir(daemon, accounts.gid)
    sock = daemon.run_dir / "management.sock"
    info = sock.stat()
    assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == accounts.gid
    at = ("--management", f"unix://{sock}")
    before = client_of(daemon).list_models()

    member = accounts.insider.run_cli("models", "list", "--json", *at)
    assert member.returncode == 0, member.stderr
    assert '"version": "1"' in member.stdout

    for args in (("models", "list"), ("models", "unload", "mlp", "1"), ("status",)):
        refused = accounts.outsider.run_cli(*args, *at)
        assert refused.returncode == 1, refused
        assert "permission" in (refused.stderr + refused.stdout).lower(), refused
    assert client_of(daemon).list_models() == before


def test_peer_credentials_are_checked_on_every_call(
    mdaemons, mlp_archive_factory, client_of, accounts
):
    # No allowed group: the socket keeps the daemon's group (root's), so a process of
    # another user running with that gid passes the file mode. The per-call check on the
    # kernel's peer credentials must still refuse it.
    daemon = mdaemons.start(mlp_archive_factory("1"), management={"allowed_group": None})
    open_run_dir(daemon, os.getegid())
    at = ("--management", management_address(daemon))
    before = client_of(daemon).list_models()

    for args in (("models", "list"), ("models", "unload", "mlp", "1")):
        refused = accounts.outsider.run_cli(*args, *at, gid=os.getegid())
        assert refused.returncode == 1, refused
        assert "PERMISSION_DENIED" in refused.stderr
        assert f"uid {accounts.outsider.uid}" in refused.stderr
    assert client_of(daemon).list_models() == before
    assert "refused" in daemon.log()


def test_tcp_needs_the_token(mdaemons, mlp_archive_factory, client_of, tmp_path):
    token = "s3cret-token-" + "x" * 20
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    tcp = f"127.0.0.1:{free_port()}"
    daemon = mdaemons.start(
        mlp_archive_factory("1"),
        management={
            "listen": ["unix://{run_dir}/management.sock", tcp],
            "token_file": str(token_file),
        },
    )
    before = client_of(daemon).list_models()
    wrong = tmp_path / "wrong"
    wrong.write_text("not-the-token-but-long-enough")

    wrong_token = wrong.read_text()
    refusals = {
        None: "missing 'authorization: Bearer <token>' metadata",
        wrong_token: "wrong management token",
    }
    for sent, expected in refusals.items():
        with ManagementClient(tcp, token=sent) as client:
            for call in (lambda c: c.list_models(), lambda c: c.unload("mlp", "1")):
                with pytest.raises(ClientError) as caught:
                    call(client)
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED, caught.value
                assert caught.value.message == expected  # and never the token sent
    with ManagementClient(tcp, token=token) as client:
        assert client.list_models() == before

    no_token = run_cli("models", "list", "--management", tcp)
    assert no_token.returncode == 2 and "--token-file" in no_token.stderr
    bad_token = run_cli(
        "models", "unload", "mlp", "1", "--management", tcp, "--token-file", str(wrong)
    )
    assert bad_token.returncode == 1 and "UNAUTHENTICATED" in bad_token.stderr
    good = run_cli("models", "list", "--management", tcp, "--token-file", str(token_file))
    assert good.returncode == 0 and "mlp" in good.stdout
    assert client_of(daemon).list_models() == before


def test_management_never_listens_beyond_loopback(tmp_path):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeserve",
            "serve",
            "--state-dir",
            str(tmp_path / "s"),
            "--management",
            "0.0.0.0:7001",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "management.listen" in done.stderr, done.stderr


def test_archive_outside_the_allowed_directory_is_refused(
    mdaemons, mlp_archive_factory, client_of, tmp_path
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)
    outside = mlp_archive_factory("2")  # in pytest's archive folder, not in incoming/
    incoming = daemon.state_dir / "incoming"
    escape_file = incoming / "escape.esar"
    escape_file.symlink_to(outside)
    escape_dir = incoming / "elsewhere"
    escape_dir.symlink_to(outside.parent, target_is_directory=True)
    before = client.list_models()

    for path in (
        str(outside),
        f"../../{outside.relative_to(outside.parents[1])}",
        str(escape_file),
        "escape.esar",
        f"elsewhere/{outside.name}",
        f"{incoming}/../{outside.name}",
        "https://example.com/mlp-2.esar",
        "/etc/shadow",
    ):
        with pytest.raises(ClientError) as caught:
            client.load(archive=path, make_default=True)
        assert caught.value.code == grpc.StatusCode.PERMISSION_DENIED, (path, caught.value)
    # A bare name is looked for in archive_dir (a path with a / would be uploaded instead).
    refused = run_cli("models", "load", "escape.esar", "--management", management_address(daemon))
    assert refused.returncode == 1 and "outside the allowed directory" in refused.stderr

    assert client.list_models() == before
    assert not (daemon.state_dir / "models" / "mlp" / "2").exists(), "nothing was installed"
    # The same archive, once copied in, is accepted.
    inside = drop_in(daemon, outside, "mlp-2.esar")
    assert client.load(archive=str(inside))["version"] == "2"
