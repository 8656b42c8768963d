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
RESOURCE_EXHAUSTED. ``SO_REUSEPORT`` is off, so a second daemon cannot silently share
our port. Reflection (v1 and v1alpha, ``api.reflection``) answers for every service the
server hosts.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
        self.inference = InferenceServicer(
            registry,
            server_name,
            server_version,
            is_ready,
            max_stream_in_flight=max_stream_in_flight,
            # Typed contents decode up to 8x larger than the wire message: bound that too.
            max_request_bytes=max_message_bytes,
            events=events,
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
            *self._options,
        ]
        server = grpc.aio.server(options=options)
        pb_grpc.add_GRPCInferenceServiceServicer_to_server(self.inference, server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health.servicer, server)
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
