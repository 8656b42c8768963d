"""The inference ``grpc.aio`` server: listeners, servicers, health, reflection, stop.

Addresses (``listen``):

* ``unix:///abs/path.sock``: the parent folder is created,
  a stale socket file left by a dead process is removed (a live one, or a file that is
  not a socket, is refused), and the socket is made ``socket_mode`` (0660) after bind.
* ``HOST:PORT`` (or ``tcp://HOST:PORT``) with a loopback host (``127.0.0.1``, ``[::1]``,
  ``localhost``); the forms are parsed by ``config.parse_listen_address``. Any other
  host is refused with a ConfigError unless ``allow_non_loopback`` is set. Port 0 binds a
  free port; ``addresses`` reports the real one.

Messages larger than ``max_message_bytes`` are refused by gRPC itself with
RESOURCE_EXHAUSTED. Bounds on what callers hold (``ServerBounds``; grpc core or grpcio
decides each from channel args, per listener where it says so, except the last two,
which are ours):

* ``max_connections`` per listener (``grpc.max_allowed_incoming_connections``): grpc core
  closes a connection past it right after accept, so idle TCP clients can neither use up
  the daemon's file descriptors nor lock out the Unix socket, which has its own count.
  ``start`` lowers it, with a warning, until every listener's connections and
  ``FD_RESERVE`` more fit in the soft RLIMIT_NOFILE (``raise_fd_limit`` lifts that to the
  hard limit first; the systemd unit sets ``LimitNOFILE``).
* a connection with no call for ``connection_idle_s`` gets a GOAWAY
  (``grpc.max_connection_idle_ms``); one that has not sent its HTTP/2 settings within
  ``HANDSHAKE_TIMEOUT_S`` is closed (``grpc.server_handshake_timeout_ms``);
  ``connection_max_age_s`` (0: none) ends every connection after that long, calls
  still running get ``AGE_GRACE_S`` more (``grpc.max_connection_age_ms`` / ``_grace_ms``).
* keepalive: the server pings a connection with calls after ``KEEPALIVE_S`` of silence and
  drops a peer that does not answer; a client pinging more often than
  ``MIN_CLIENT_PING_S`` is sent away (``grpc.http2.min_ping_interval_without_data_ms``).
* ``max_concurrent_rpcs``: calls past it are answered RESOURCE_EXHAUSTED at once (grpcio's
  ``maximum_concurrent_rpcs``); the same figure caps streams per connection
  (``grpc.max_concurrent_streams``).
* ``inflight_bytes_factor``: the server-wide budget of request bytes held (``bounds``),
  and malformed protobuf messages answered INVALID_ARGUMENT rather than grpcio's UNKNOWN,
  for the KServe and health services (reflection stays as grpcio answers it).
* ``stream_max_pending_bytes``: per ModelStreamInfer stream, requests running plus
  responses its client has not read (``inference._Stream``).

``SO_REUSEPORT`` is off, so a second daemon cannot silently share
our port. Reflection (v1 and v1alpha, ``api.reflection``) answers for every service the
server hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

from edgeserve.api.bounds import InflightBudget, bounded_handlers, captured_handlers
from edgeserve.api.health import ModelHealth
from edgeserve.api.inference import InferenceServicer
from edgeserve.api.reflection import enable_reflection
from edgeserve.config import grpc_address, is_loopback_host, parse_listen_address
from edgeserve.errors import ConfigError
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc
from edgeserve.serving.registry import ModelRegistry
from edgeserve.types import EventSink

log = logging.getLogger("edgeserve.api")

LISTEN_KEY = "server.listen"
HANDSHAKE_TIMEOUT_S = 5.0
"""A local client completes the HTTP/2 handshake in milliseconds; a silent socket goes."""
AGE_GRACE_S = 30.0
KEEPALIVE_S = 60.0
KEEPALIVE_TIMEOUT_S = 20.0
MIN_CLIENT_PING_S = 10.0
FD_RESERVE = 256
"""File descriptors kept for all but inference connections: management (3 per relayed
connection), model files, the telemetry database, logs."""
_CHARGED = frozenset({"ModelInfer"})
_STREAM_AWARE = frozenset({"ModelStreamInfer"})


@dataclass(frozen=True)
class ServerBounds:
    """What one client, and all of them together, may hold (``server.*`` in the config)."""

    max_connections: int = 256
    connection_idle_s: float = 300.0
    connection_max_age_s: float = 0.0
    max_concurrent_rpcs: int = 256
    inflight_bytes_factor: float = 4.0
    stream_max_pending_bytes: int = 16 << 20

    def channel_args(self) -> list[tuple[str, int]]:
        args = [
            ("grpc.max_allowed_incoming_connections", self.max_connections),
            ("grpc.server_handshake_timeout_ms", _ms(HANDSHAKE_TIMEOUT_S)),
            ("grpc.max_connection_idle_ms", _ms(self.connection_idle_s)),
            ("grpc.max_concurrent_streams", self.max_concurrent_rpcs),
            ("grpc.keepalive_time_ms", _ms(KEEPALIVE_S)),
            ("grpc.keepalive_timeout_ms", _ms(KEEPALIVE_TIMEOUT_S)),
            ("grpc.http2.min_ping_interval_without_data_ms", _ms(MIN_CLIENT_PING_S)),
        ]
        if self.connection_max_age_s > 0:
            args.append(("grpc.max_connection_age_ms", _ms(self.connection_max_age_s)))
            args.append(("grpc.max_connection_age_grace_ms", _ms(AGE_GRACE_S)))
        return args


def raise_fd_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; returns the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, exc)
    return soft


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


@dataclass(frozen=True)
class ServiceBinding:
    """One more service on the same server (e.g. the management API)."""

    descriptor: ServiceDescriptor
    servicer: Any
    add_to_server: Callable[[Any, grpc.aio.Server], None]


@dataclass(frozen=True)
class _Listener:
    address: str  # as configured
    unix_path: Path | None  # set for unix: addresses


def parse_listen(address: str, *, allow_non_loopback: bool = False) -> _Listener:
    """Validate one listen address (the forms ``config`` accepts); ConfigError names it."""
    parsed = parse_listen_address(address, LISTEN_KEY)
    if parsed[0] == "unix":
        return _Listener(f"unix://{parsed[1]}", Path(parsed[1]))
    if not allow_non_loopback and not is_loopback_host(parsed[1]):
        raise ConfigError(
            LISTEN_KEY,
            f"'{address}' is not a loopback address; set server.allow_non_loopback to listen on it",
        )
    return _Listener(grpc_address(address), None)


class InferenceServer:
    """The KServe v2 gRPC server of one daemon: ``await start()``, ``await stop(grace)``."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        listen: Sequence[str],
        max_message_bytes: int,
        is_ready: Callable[[], bool],
        server_version: str,
        server_name: str = "edgeserve",
        allow_non_loopback: bool = False,
        socket_mode: int = 0o660,
        max_stream_in_flight: int = 1024,
        bounds: ServerBounds | None = None,
        extra_services: Sequence[ServiceBinding] = (),
        options: Sequence[tuple[str, Any]] = (),
        events: EventSink | None = None,
    ) -> None:
        if not listen:
            raise ConfigError(LISTEN_KEY, "needs at least one address")
        if max_message_bytes < 1:
            raise ConfigError("server.max_message_bytes", f"must be > 0, got {max_message_bytes}")
        self._listeners = [parse_listen(a, allow_non_loopback=allow_non_loopback) for a in listen]
        self._max_message_bytes = max_message_bytes
        self._socket_mode = socket_mode
        self._extra = tuple(extra_services)
        self._options = tuple(options)
        self._bounds = bounds or ServerBounds()
        self.inflight = InflightBudget(
            max(1, int(self._bounds.inflight_bytes_factor * max_message_bytes))
        )
        self.inference = InferenceServicer(
            registry,
            server_name,
            server_version,
            is_ready,
            max_stream_in_flight=max_stream_in_flight,
            # Typed contents decode up to 8x larger than the wire message: bound that too.
            max_request_bytes=max_message_bytes,
            events=events,
            stream_max_pending_bytes=self._bounds.stream_max_pending_bytes,
            inflight=self.inflight,
        )
        self.health = ModelHealth(registry, is_ready)
        self._server: grpc.aio.Server | None = None
        self._stopped = False
        self._addresses: list[str] = []
        self._sockets: list[Path] = []

    @property
    def addresses(self) -> list[str]:
        """The bound addresses (TCP with the real port), after ``start``."""
        return list(self._addresses)

    async def start(self) -> list[str]:
        """Bind every listener and start serving; returns the bound addresses."""
        if self._server is not None:
            raise RuntimeError("InferenceServer.start called twice")
        options = [
            ("grpc.max_receive_message_length", self._max_message_bytes),
            ("grpc.max_send_message_length", self._max_message_bytes),
            ("grpc.so_reuseport", 0),
            *self._fitted_bounds().channel_args(),
            *self._options,
        ]
        server = grpc.aio.server(
            options=options, maximum_concurrent_rpcs=self._bounds.max_concurrent_rpcs
        )
        self._add_bounded(
            server, pb_grpc.add_GRPCInferenceServiceServicer_to_server, self.inference
        )
        self._add_bounded(
            server, health_pb2_grpc.add_HealthServicer_to_server, self.health.servicer
        )
        for binding in self._extra:
            binding.add_to_server(binding.servicer, server)
        enable_reflection(server, self._service_descriptors())
        try:
            for listener in self._listeners:
                self._addresses.append(self._bind(server, listener))
            await self.health.start()
            await server.start()
        except BaseException:
            await server.stop(None)
            self._remove_sockets()
            self._addresses.clear()
            raise
        self._server = server
        return self.addresses

    async def refresh_health(self) -> None:
        """Re-read readiness into the health service (call after becoming ready)."""
        await self.health.refresh()

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, let in-flight RPCs finish within ``grace`` s, then cancel them."""
        if self._server is None or self._stopped:
            return
        self._stopped = True
        await self.health.shutdown()
        await self._server.stop(grace)
        self._remove_sockets()

    async def wait_for_termination(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    def _fitted_bounds(self) -> ServerBounds:
        """``bounds`` with ``max_connections`` lowered to fit the soft RLIMIT_NOFILE."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            return self._bounds
        fits = max(1, (soft - FD_RESERVE) // len(self._listeners))
        if fits >= self._bounds.max_connections:
            return self._bounds
        log.warning(
            "server.max_connections lowered from %d to %d per listener: the open files limit "
            "is %d (raise LimitNOFILE)",
            self._bounds.max_connections,
            fits,
            soft,
        )
        return replace(self._bounds, max_connections=fits)

    def _add_bounded(self, server: grpc.aio.Server, add_to_server: Any, servicer: Any) -> None:
        """Register a generated service with ``bounds``' parsing and in-flight budget."""
        service, handlers = captured_handlers(add_to_server, servicer)
        bounded = bounded_handlers(
            handlers, budget=self.inflight, charged=_CHARGED, stream_aware=_STREAM_AWARE
        )
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, bounded),))
        server.add_registered_method_handlers(service, bounded)

    def _service_descriptors(self) -> list[ServiceDescriptor]:
        return [
            pb.DESCRIPTOR.services_by_name["GRPCInferenceService"],
            health_pb2.DESCRIPTOR.services_by_name["Health"],
            *(binding.descriptor for binding in self._extra),
        ]

    def _bind(self, server: grpc.aio.Server, listener: _Listener) -> str:
        path = listener.unix_path
        if path is None:
            port = server.add_insecure_port(listener.address)
            if port == 0:
                raise ConfigError(LISTEN_KEY, f"cannot bind '{listener.address}'")
            host = listener.address.rpartition(":")[0]
            return f"{host}:{port}"
        _prepare_socket_path(path)
        if server.add_insecure_port(listener.address) == 0:
            raise ConfigError(LISTEN_KEY, f"cannot bind '{listener.address}'")
        self._sockets.append(path)
        os.chmod(path, self._socket_mode)
        return listener.address

    def _remove_sockets(self) -> None:
        for path in self._sockets:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
        self._sockets.clear()


def _prepare_socket_path(path: Path) -> None:
    """Create the parent folder; remove a stale socket; refuse a live one or another file."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(LISTEN_KEY, f"'{path}' exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    finally:
        probe.close()
    raise ConfigError(LISTEN_KEY, f"another process is listening on '{path}'")
