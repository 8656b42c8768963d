"""The access checks on their own: peer credentials, policy, token, the relay, archive paths."""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import socket
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from edgeserve.api.management import decode_settings, open_archive
from edgeserve.api.peercred import (
    AccessPolicy,
    CredentialRelay,
    ManagementGate,
    PeerCredentials,
    Refusal,
    TokenCheck,
    read_peer_credentials,
)
from edgeserve.errors import (
    ArchiveError,
    ConfigError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from edgeserve.proto import management_pb2 as pb
from edgeserve.types import BatchingSettings

TOKEN = secrets.token_hex(16)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="es-"))  # Unix socket paths stay short
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_peer_credentials_come_from_the_kernel() -> None:
    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with left, right:
        peer = read_peer_credentials(left)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert set(peer.groups) == set(os.getgroups())


def test_policy_admits_root_the_daemon_user_and_the_group() -> None:
    policy = AccessPolicy(None)
    policy.gid = 4242  # as if the group existed
    policy.group_name = "ops"
    assert policy.allows(PeerCredentials(1, 0, 100))
    assert policy.allows(PeerCredentials(1, policy.daemon_uid, 100))
    assert policy.allows(PeerCredentials(1, 5000, 4242))
    assert policy.allows(PeerCredentials(1, 5000, 100, (7, 4242)))
    assert not policy.allows(PeerCredentials(1, 5000, 100, (7,)))
    refusal = policy.refusal(PeerCredentials(9, 5000, 100))
    assert "uid 5000" in refusal.message and "'ops'" in refusal.message


def test_policy_without_an_existing_group_admits_only_root_and_itself() -> None:
    policy = AccessPolicy("no-such-group-here")
    assert policy.gid is None and policy.socket_gid() == os.getegid()
    assert not policy.allows(PeerCredentials(1, 5000, os.getegid() + 1, (os.getegid() + 1,)))
    assert policy.allows(PeerCredentials(1, 0, 0))


def test_token_check(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    check = TokenCheck(path)
    assert check.refusal([("authorization", f"Bearer {TOKEN}")]) is None
    assert check.refusal([("authorization", f"bearer {TOKEN}".encode())]) is None
    for metadata in (
        [],
        [("authorization", "Bearer wrong")],
        [("authorization", f"Basic {TOKEN}")],
        [("x-token", TOKEN)],
    ):
        refusal = check.refusal(metadata)
        assert isinstance(refusal, Refusal) and refusal.unauthenticated, metadata
    path.write_text("short")
    with pytest.raises(ConfigError, match="management.token_file"):
        TokenCheck(path)
    assert TokenCheck(None).refusal([("authorization", f"Bearer {TOKEN}")]) is not None


def test_gate_sorts_peers_by_transport(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text(TOKEN)
    gate = ManagementGate(AccessPolicy(None), [], TokenCheck(token))
    assert isinstance(gate.check("unix-abstract:edgeserve-mgmt-forged-1", []), Refusal)
    assert isinstance(gate.check("unix:", []), Refusal)
    assert isinstance(gate.check("ipv4:127.0.0.1:5000", []), Refusal)
    auth = [("authorization", f"Bearer {TOKEN}")]
    assert gate.check("ipv4:127.0.0.1:5000", auth) == "token holder at ipv4:127.0.0.1:5000"


def test_relay_records_credentials_and_cleans_up(short_dir: Path) -> None:
    public = short_dir / "m.sock"

    async def scenario() -> tuple[str, PeerCredentials | None, int, list[str]]:
        relay = CredentialRelay(public, socket_mode=0o660, socket_gid=os.getegid())
        server = grpc.aio.server()
        seen: list[PeerCredentials | None] = []

        async def whoami(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            seen.append(relay.lookup(context.peer()))
            return context.peer().encode()

        handler = grpc.unary_unary_rpc_method_handler(whoami)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.T", {"Who": handler}),)
        )
        server.add_insecure_port(f"unix://{relay.prepare()}")
        await server.start()
        await relay.start()
        mode = stat.S_IMODE(public.stat().st_mode)
        async with grpc.aio.insecure_channel(f"unix://{public}") as channel:
            peer = (await channel.unary_unary("/t.T/Who")(b"")).decode()
        await relay.stop()
        await server.stop(None)
        return peer, seen[0], mode, os.listdir(short_dir)

    peer, creds, mode, left = asyncio.run(scenario())
    assert peer.startswith("unix-abstract:edgeserve-mgmt-")
    assert creds is not None and (creds.pid, creds.uid) == (os.getpid(), os.geteuid())
    assert mode == 0o660
    assert left == [], "socket and private folder are removed on stop"


def test_relay_refuses_a_live_socket(short_dir: Path) -> None:
    public = short_dir / "m.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with listener:
        listener.bind(str(public))
        listener.listen()
        relay = CredentialRelay(public, socket_mode=0o660, socket_gid=os.getegid())
        with pytest.raises(ConfigError, match="another process"):
            relay.prepare()


def test_open_archive_stays_inside_the_directory(tmp_path: Path) -> None:
    allowed = tmp_path / "incoming"
    allowed.mkdir()
    (allowed / "good.esar").write_bytes(b"zip")
    secret = tmp_path / "secret.esar"
    secret.write_bytes(b"zip")
    (allowed / "link.esar").symlink_to(secret)
    (allowed / "sub").symlink_to(tmp_path, target_is_directory=True)
    (allowed / "folder").mkdir()

    fd = open_archive("good.esar", allowed)
    try:
        assert Path(os.readlink(f"/proc/self/fd/{fd}")) == allowed / "good.esar"
    finally:
        os.close(fd)
    for bad in (
        str(secret),
        "../secret.esar",
        "link.esar",
        "sub/secret.esar",
        "http://example.com/a.esar",
        "file:///etc/passwd",
    ):
        with pytest.raises(PermissionDenied):
            os.close(open_archive(bad, allowed))
    with pytest.raises(NotFound):
        open_archive("absent.esar", allowed)
    with pytest.raises(ArchiveError, match="is not a regular file \\(a directory\\)"):
        open_archive("folder", allowed)


def test_settings_are_checked_and_name_the_field() -> None:
    assert decode_settings(pb.ModelSettings()) == (BatchingSettings(), None)
    assert decode_settings(pb.ModelSettings(instances=2, max_queue_delay_ms=0.0)) == (
        BatchingSettings(instances=2, max_queue_delay_ms=0.0),
        None,
    )
    assert decode_settings(pb.ModelSettings(device="cuda:1")) == (BatchingSettings(), "cuda:1")
    for bad, field in (
        (pb.ModelSettings(instances=0), "settings.instances"),
        (pb.ModelSettings(max_batch_size=100000), "settings.max_batch_size"),
        (pb.ModelSettings(max_queue_delay_ms=-1), "settings.max_queue_delay_ms"),
        (pb.ModelSettings(device="tpu"), "settings.device"),
    ):
        with pytest.raises(InvalidArgument, match=field):
            decode_settings(bad)
