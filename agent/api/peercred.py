"""Who is calling the management API: kernel peer credentials and the loopback token.

gRPC Python gives a servicer no way to reach the accepted socket, and its ``local``
credentials do not read ``SO_PEERCRED`` either (the auth context of a Unix-socket call
holds only ``transport_security_type``). So the public management socket is ours:

    client ──connect──► public socket (0660, group = allowed group)      first gate: the
                          │  CredentialRelay: accept, SO_PEERCRED +       kernel checks
                          │  SO_PEERGROUPS, remember them under a fresh   the file mode
                          │  abstract name, connect out *bound* to that
                          ▼  name, copy bytes both ways
                        inner socket (in a 0700 folder) ◄── grpc.aio server
                          servicer: context.peer() == "unix-abstract:<name>"
                          ──► lookup(name) ──► AccessPolicy          second gate, per call

A caller who passes the file mode but is neither root, nor the daemon's user, nor in the
allowed group gets PERMISSION_DENIED on every call (with its uid in the message), and
the audit log names the uid of every change. Only the daemon's user can reach the inner
socket, and an abstract name cannot be reached by connecting to it (nothing listens on
it), so a peer name cannot be forged.

What one caller can hold is bounded: at most ``max_connections`` relayed connections at
once, plus ``ROOT_RESERVE`` more that only root gets (so a technician running
``edgeserve status`` as root always gets in, however many connections others hold); a
connection past that is closed at accept. A relayed connection that carries no byte in
either direction for ``idle_timeout_s`` is closed (the management gRPC server pings
during calls, so a long call is never idle).

Loopback TCP (only when configured) has no peer credentials: every call must carry
``authorization: Bearer <token>`` equal (``hmac.compare_digest``) to the token file.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hmac
import itertools
import logging
import os
import secrets
import shutil
import socket
import stat
import struct
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgeserve.errors import ConfigError

log = logging.getLogger("edgeserve.api")

_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux >= 4.13
_UCRED = struct.Struct("3i")
_ABSTRACT_PREFIX = "unix-abstract:"
_MAX_UNIX_PATH = 107
DEFAULT_MAX_CONNECTIONS = 16
"""Relayed connections at once (``management.max_connections``); more are closed at accept."""
ROOT_RESERVE = 2
"""Connections past ``max_connections`` that only root gets."""
DEFAULT_IDLE_TIMEOUT_S = 60.0
REFUSAL_LOG_S = 10.0


@dataclass(frozen=True)
class PeerCredentials:
    """The process at the other end of a Unix socket, as the kernel recorded it."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] = ()


@dataclass(frozen=True)
class Refusal:
    """Why a call is refused; ``unauthenticated`` means: no or wrong token."""

    message: str
    unauthenticated: bool = False


def read_peer_credentials(sock: socket.socket) -> PeerCredentials:
    """SO_PEERCRED (pid, uid, gid) plus the supplementary groups, from the kernel."""
    pid, uid, gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    return PeerCredentials(pid, uid, gid, _peer_groups(sock, pid))


def _peer_groups(sock: socket.socket, pid: int) -> tuple[int, ...]:
    for count in (64, 65536):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, 4 * count)
        except OSError:
            continue
        return struct.unpack(f"{len(raw) // 4}I", raw)
    try:  # kernels without SO_PEERGROUPS: the process's own record
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("Groups:"):
                return tuple(int(g) for g in line.split()[1:])
    except OSError:
        pass
    return ()


class AccessPolicy:
    """Root, the daemon's own user and members of ``allowed_group`` may manage."""

    def __init__(self, allowed_group: str | None) -> None:
        self.group_name = allowed_group
        self.gid: int | None = None
        if allowed_group is not None:
            try:
                self.gid = grp.getgrnam(allowed_group).gr_gid
            except KeyError:
                log.warning(
                    "management.allowed_group '%s' does not exist: only root and uid %d "
                    "may use the management API",
                    allowed_group,
                    os.geteuid(),
                )
        self.daemon_uid = os.geteuid()

    def allows(self, peer: PeerCredentials) -> bool:
        if peer.uid in (0, self.daemon_uid):
            return True
        return self.gid is not None and (peer.gid == self.gid or self.gid in peer.groups)

    def refusal(self, peer: PeerCredentials) -> Refusal:
        who = f"uid {peer.uid} (pid {peer.pid}) may not use the management API"
        if self.group_name is None:
            return Refusal(
                f"{who}: only root and the daemon's user (uid {self.daemon_uid}) may, as "
                "management.allowed_group is not set"
            )
        return Refusal(
            f"{who}: not root, not the daemon's user and not in group '{self.group_name}' "
            "(management.allowed_group)"
        )

    def socket_gid(self) -> int:
        """The group the public socket gets: the allowed one, else the daemon's own."""
        return self.gid if self.gid is not None else os.getegid()


class TokenCheck:
    """Bearer token for loopback TCP, read once from ``management.token_file``."""

    def __init__(self, token_file: Path | None) -> None:
        self._token: bytes | None = None
        if token_file is not None:
            try:
                token = Path(token_file).read_bytes().strip()
            except OSError as exc:
                raise ConfigError(
                    "management.token_file", f"cannot read {token_file}: {exc.strerror}"
                ) from None
            if len(token) < 16:
                raise ConfigError("management.token_file", f"{token_file}: token is too short")
            self._token = token

    def refusal(self, metadata: Iterable[tuple[str, str | bytes]]) -> Refusal | None:
        """None when ``metadata`` carries the right bearer token."""
        if self._token is None:
            return Refusal("TCP management needs management.token_file", unauthenticated=True)
        for key, value in metadata:
            if key.lower() != "authorization":
                continue
            raw = value.encode() if isinstance(value, str) else value
            scheme, _, token = raw.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self._token):
                return None
            return Refusal("wrong management token", unauthenticated=True)
        return Refusal("missing 'authorization: Bearer <token>' metadata", unauthenticated=True)


class CredentialRelay:
    """The public management socket: records each caller's credentials, relays bytes.

    ``start()`` creates a private 0700 folder beside the public socket for the inner
    socket (``inner_path``), binds the public socket there first, sets its mode and
    group, and only then renames it into place, so it is never reachable with looser
    permissions.
    """

    def __init__(
        self,
        public_path: Path,
        *,
        socket_mode: int,
        socket_gid: int,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self.public_path = public_path
        self.max_connections = max_connections
        self.idle_timeout_s = idle_timeout_s
        self.clients = 0  # relayed (admitted) connections now
        self._refused = 0
        self._refusal_logged_at = -REFUSAL_LOG_S
        self._mode = socket_mode
        self._gid = socket_gid
        self._private: Path | None = None
        self._server: asyncio.Server | None = None
        self._peers: dict[str, PeerCredentials] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._prefix = f"edgeserve-mgmt-{os.getpid()}-{secrets.token_hex(8)}-"
        self._counter = itertools.count()
        self._inode: int | None = None

    @property
    def inner_path(self) -> Path:
        if self._private is None:
            raise RuntimeError("CredentialRelay.prepare() not called")
        return self._private / "inner.sock"

    def prepare(self) -> Path:
        """Create the private folder; returns the inner socket path to bind gRPC to."""
        parent = self.public_path.parent
        if not parent.exists():
            parent.mkdir(parents=True, mode=0o750)
            with contextlib.suppress(PermissionError):
                os.chown(parent, -1, self._gid)
        _refuse_live_socket(self.public_path)
        self._private = Path(tempfile.mkdtemp(prefix=".es-mgmt-", dir=parent))
        if len(os.fsencode(self.inner_path)) > _MAX_UNIX_PATH:
            self.close_private()
            raise ConfigError("management.listen", f"socket folder path too long: {parent}")
        return self.inner_path

    async def start(self) -> None:
        staging = self.inner_path.with_name("public.sock")
        server = await asyncio.start_unix_server(
            self._accept, path=str(staging), start_serving=False
        )
        os.chmod(staging, self._mode)
        with contextlib.suppress(PermissionError):
            os.chown(staging, -1, self._gid)
        os.replace(staging, self.public_path)
        self._inode = self.public_path.lstat().st_ino
        self._server = server
        await server.start_serving()

    def lookup(self, peer: str) -> PeerCredentials | None:
        """The credentials behind a gRPC ``context.peer()`` string, if relayed by us."""
        if not peer.startswith(_ABSTRACT_PREFIX):
            return None
        return self._peers.get(peer[len(_ABSTRACT_PREFIX) :])

    def stop_accepting(self) -> None:
        """No new connections (the socket file goes); relayed ones keep flowing."""
        if self._server is not None:
            self._server.close()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            if self.public_path.lstat().st_ino == self._inode:
                self.public_path.unlink()

    async def stop(self) -> None:
        """Close every relayed connection and remove the socket and private folder."""
        self.stop_accepting()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.close_private()

    def close_private(self) -> None:
        if self._private is not None:
            shutil.rmtree(self._private, ignore_errors=True)
            self._private = None

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._writers.add(writer)
        name = f"{self._prefix}{next(self._counter)}"
        admitted = False
        try:
            peer = read_peer_credentials(writer.get_extra_info("socket"))
            if not self._admits(peer):
                self._log_refusal(peer)
                return
            admitted = True
            self.clients += 1
            self._peers[name] = peer
            inner_reader, inner_writer = await self._connect_inner(name)
            self._writers.add(inner_writer)
            try:
                await _pump_both(reader, writer, inner_reader, inner_writer, self.idle_timeout_s)
            finally:
                self._writers.discard(inner_writer)
                inner_writer.close()
        except OSError as exc:
            log.warning("management: relayed connection failed: %s", exc)
        finally:
            if admitted:
                self.clients -= 1
            self._peers.pop(name, None)
            self._writers.discard(writer)
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    def _log_refusal(self, peer: PeerCredentials) -> None:
        """One warning per ``REFUSAL_LOG_S`` at most: a client that reconnects in a loop
        must not flood the journal."""
        self._refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at < REFUSAL_LOG_S:
            return
        log.warning(
            "management: %d connections open; closing one from uid %d (pid %d) "
            "(%d refused since the last such line)",
            self.clients,
            peer.uid,
            peer.pid,
            self._refused,
        )
        self._refusal_logged_at, self._refused = now, 0

    def _admits(self, peer: PeerCredentials) -> bool:
        """Below the cap anyone; root also in the reserve above it."""
        if self.clients < self.max_connections:
            return True
        return peer.uid == 0 and self.clients < self.max_connections + ROOT_RESERVE

    async def _connect_inner(self, name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind("\0" + name)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(self.inner_path))
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_unix_connection(sock=sock)


async def _pump_both(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
    idle_timeout_s: float,
) -> None:
    """Copy both ways until either side closes or no byte moved for ``idle_timeout_s``;
    then both are closed by the caller."""
    moved = [0]  # bytes copied either way, so far
    pumps = [
        asyncio.create_task(_pump(a_reader, b_writer, moved)),
        asyncio.create_task(_pump(b_reader, a_writer, moved)),
    ]
    try:
        seen = -1
        while seen != moved[0]:
            seen = moved[0]
            done, _ = await asyncio.wait(
                pumps, timeout=idle_timeout_s, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                return
        log.info("management: closing a connection idle for %.0f s", idle_timeout_s)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, moved: list[int]
) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            moved[0] += len(data)
            writer.write(data)
            await writer.drain()


def _refuse_live_socket(path: Path) -> None:
    """A stale socket file is replaced later; a live one or another file is refused."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError("management.listen", f"'{path}' exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        return
    finally:
        probe.close()
    raise ConfigError("management.listen", f"another process is listening on '{path}'")


class ManagementGate:
    """Decides per call: relayed Unix peers by policy, loopback TCP peers by token."""

    def __init__(
        self, policy: AccessPolicy, relays: Sequence[CredentialRelay], token: TokenCheck
    ) -> None:
        self.policy = policy
        self._relays = list(relays)
        self._token = token

    def check(self, peer: str, metadata: Iterable[tuple[str, str | bytes]]) -> str | Refusal:
        """The caller's description when admitted, else why not."""
        if peer.startswith(_ABSTRACT_PREFIX):
            for relay in self._relays:
                creds = relay.lookup(peer)
                if creds is not None:
                    if self.policy.allows(creds):
                        return f"uid {creds.uid} (pid {creds.pid})"
                    return self.policy.refusal(creds)
        elif peer.startswith(("ipv4:", "ipv6:")):
            refusal = self._token.refusal(metadata)
            return refusal if refusal is not None else f"token holder at {peer}"
        sockets = ", ".join(str(r.public_path) for r in self._relays) or "the management socket"
        return Refusal(f"management calls must come through {sockets}")
