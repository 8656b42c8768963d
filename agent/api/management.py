"""``edgeserve.v1.Management``: a thin servicer over ``lifecycle``, and its server.

Each RPC checks who is calling (``peercred``: kernel peer credentials on the Unix socket,
a bearer token on loopback TCP), decodes the request, makes one call into the lifecycle
(or the status builder) and encodes the reply. Errors go through the shared table in
``api/status.py``; refused callers get PERMISSION_DENIED or UNAUTHENTICATED and nothing
changes. Every change is logged with the caller's uid.

LoadModel takes an archive only from inside ``management.archive_dir``: the path is
resolved, opened with O_NOFOLLOW, and the opened file's real path is checked again, so a
symlink swapped in meanwhile cannot lead the daemon elsewhere; it must be a regular file
(opened O_NONBLOCK, so a FIFO is refused instead of waiting for a writer); the store then
installs it (under state_dir only). Nothing here blocks the event loop: the open, and the
install's reading, hashing and writing, run in threads. URLs are refused: this API never
fetches anything.

UploadModel is LoadModel for an archive the caller holds: the caller streams its bytes,
``api/upload.py`` spools them (bounded in size, count and time) into an anonymous file
under ``<state_dir>/uploads``, and that file goes to the same install, through an fd, as
a file of archive_dir: the same signature, hash and zip checks before anything is
installed. Install errors name the archive as the caller named it, on both paths.

The client (``ManagementClient``, ``ClientError``) is ``api/management_client.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import json
import logging
import os
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from edgeserve.api.bounds import bounded_handlers, captured_handlers
from edgeserve.api.errors import map_errors
from edgeserve.api.peercred import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    ROOT_RESERVE,
    AccessPolicy,
    CredentialRelay,
    ManagementGate,
    TokenCheck,
)
from edgeserve.api.upload import UploadSpool, fd_off_loop
from edgeserve.config import DEVICE_RE, is_loopback_host, parse_listen_address
from edgeserve.errors import (
    ArchiveError,
    ConfigError,
    EdgeserveError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    clip,
)
from edgeserve.proto import management_pb2 as pb
from edgeserve.proto import management_pb2_grpc as pb_grpc
from edgeserve.types import BatchingSettings

if TYPE_CHECKING:  # the CLI's client side must not import torch
    from edgeserve.lifecycle import Lifecycle
    from edgeserve.serving.registry import LiveModel, ModelRegistry

log = logging.getLogger("edgeserve.api")

StatusSource = Callable[[], dict[str, Any]]
_CALLER: contextvars.ContextVar[str] = contextvars.ContextVar("management_caller", default="?")
_S = TypeVar("_S", bound="ManagementServicer")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_BATCHING_KEYS = (
    "instances",
    "max_batch_size",
    "max_queue_delay_ms",
    "max_queue_size",
    "intra_op_threads",
)


# -- codec ----------------------------------------------------------------------------------


def decode_settings(message: pb.ModelSettings) -> tuple[BatchingSettings, str | None]:
    """The batching and the device set in ``message``, checked (``InvalidArgument``
    names the field at fault); what is not set is None."""
    batching = BatchingSettings(
        **{k: getattr(message, k) for k in _BATCHING_KEYS if message.HasField(k)}
    ).validate("settings", lambda key, problem: InvalidArgument(f"{key}: {problem}"))
    device = message.device if message.HasField("device") else None
    if device is not None and not DEVICE_RE.match(device):
        raise InvalidArgument(f"settings.device: must be auto, cpu, cuda or cuda:N, got {device!r}")
    return batching, device


def version_message(
    live: LiveModel, registry: ModelRegistry, device: str | None, *, signature: bool = False
) -> pb.ModelVersion:
    """``device``: the one asked for; None shows the one it runs on."""
    settings = live.settings  # as resolved at load
    message = pb.ModelVersion(
        name=live.name,
        version=live.version,
        state=live.state.value,
        is_default=registry.default_version(live.name) == live.version,
        instances=settings.instances,
        device=live.device,
        loaded_at=live.loaded_at,
        load_seconds=live.load_seconds,
        in_flight=live.in_flight,
        quantization=json.dumps(live.quantization, sort_keys=True) if live.quantization else "",
        settings=pb.ModelSettings(
            instances=settings.instances,
            max_batch_size=live.max_batch_size,
            max_queue_delay_ms=settings.max_queue_delay_ms,
            max_queue_size=settings.max_queue_size,
            intra_op_threads=settings.intra_op_threads or 1,
            device=device or live.device,
        ),
    )
    if signature:
        for specs, field in ((live.inputs, message.inputs), (live.outputs, message.outputs)):
            for spec in specs:
                field.add(name=spec.name, datatype=spec.datatype, shape=list(spec.shape))
    return message


MAX_PATH_BYTES = 4096
"""The longest archive path LoadModel takes (Linux's PATH_MAX)."""


def open_archive(text: str, archive_dir: Path) -> int:
    """An fd of the archive ``text`` names, proven to be a regular file inside
    ``archive_dir``. File system calls: the servicer runs it in a thread (``fd_off_loop``).
    Messages repeat ``text`` clipped (``errors.clip``): it comes from the caller."""
    if "\x00" in text:  # the OS cannot take it; an outsider can send it
        raise InvalidArgument(f"archive {clip(ascii(text))}: the path contains a NUL byte")
    shown = clip(text)
    if len(text.encode("utf-8", "surrogatepass")) > MAX_PATH_BYTES:
        raise InvalidArgument(f"archive '{shown}': the path is over {MAX_PATH_BYTES} bytes")
    if "://" in text:
        raise PermissionDenied(
            f"archive '{shown}' is a URL; the daemon never fetches: copy it into {archive_dir}"
        )
    base = archive_dir.resolve()
    path = Path(text) if os.path.isabs(text) else base / text
    if not path.resolve().is_relative_to(base):
        raise PermissionDenied(
            f"archive '{shown}' is outside the allowed directory {base} (management.archive_dir)"
        )
    # O_NONBLOCK: opening a FIFO must not wait for a writer; the type is checked next.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(path.resolve(), flags)
    except FileNotFoundError:
        raise NotFound(f"archive '{shown}' does not exist in {base}") from None
    except OSError as exc:
        raise ArchiveError(f"archive '{shown}' cannot be opened: {exc.strerror}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not Path(os.readlink(f"/proc/self/fd/{fd}")).is_relative_to(base):
            raise PermissionDenied(f"archive '{shown}' is not a file inside {base}")
        if not stat.S_ISREG(mode):
            raise ArchiveError(f"archive '{shown}' is not a regular file ({_file_kind(mode)})")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _file_kind(mode: int) -> str:
    for test, kind in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return kind
    return f"file type {stat.S_IFMT(mode):o}"


def _require_version(rpc: str, version: str) -> None:
    if not version:
        raise InvalidArgument(f"{rpc}: version is required")


# -- servicer -------------------------------------------------------------------------------

_Method = Callable[[_S, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]


def _guarded(method: _Method[_S, _Req, _Resp]) -> _Method[_S, _Req, _Resp]:
    """Refuse callers the gate does not admit (``Unauthenticated`` without a right token,
    ``PermissionDenied`` otherwise), then map errors through the shared table."""

    @functools.wraps(method)
    async def checked(self: _S, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        peer = context.peer()
        verdict = self.gate.check(peer, context.invocation_metadata() or ())
        if not isinstance(verdict, str):
            log.warning("management: %s refused (%s): %s", method.__name__, peer, verdict.message)
            refused = Unauthenticated if verdict.unauthenticated else PermissionDenied
            raise refused(verdict.message)
        _CALLER.set(verdict)  # each RPC runs in its own task: a per-call value
        return await method(self, request, context)

    return map_errors(checked)


class ManagementServicer(pb_grpc.ManagementServicer):
    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        registry: ModelRegistry,
        status: StatusSource,
        gate: ManagementGate,
        archive_dir: Path,
        uploads: UploadSpool,
    ) -> None:
        self._lifecycle = lifecycle
        self._registry = registry
        self._status = status
        self.gate = gate
        self._archive_dir = archive_dir
        self._uploads = uploads

    def _version(self, live: LiveModel, signature: bool = False) -> pb.ModelVersion:
        device = self._lifecycle.entry(live.name, live.version).device
        return version_message(live, self._registry, device, signature=signature)

    @_guarded
    async def ListModels(self, request: Any, context: Any) -> pb.ListModelsResponse:
        return pb.ListModelsResponse(models=[self._version(m) for m in self._registry.all()])

    @_guarded
    async def DescribeModel(self, request: Any, context: Any) -> pb.DescribeModelResponse:
        versions = [request.version] if request.version else self._registry.versions(request.name)
        if not versions:
            raise NotFound.model(request.name)
        lives = [self._registry.get(request.name, v) for v in versions]
        return pb.DescribeModelResponse(
            name=request.name,
            default_version=self._registry.default_version(request.name) or "",
            versions=[self._version(live, signature=True) for live in lives],
        )

    @_guarded
    async def LoadModel(self, request: Any, context: Any) -> pb.LoadModelResponse:
        settings, device = decode_settings(request.settings)
        source = request.WhichOneof("source")
        if source == "archive_path":
            fd = await fd_off_loop(open_archive, request.archive_path, self._archive_dir)
            label = clip(request.archive_path)
            log.info("management: %s installs %s", _CALLER.get(), label)
            # The descriptor is closed by the install itself: the RPC may be cancelled
            # while the store still reads through it.
            name, version = await self._install(
                Path(f"/proc/self/fd/{fd}"), label, partial(os.close, fd)
            )
        elif source == "stored":
            name, version = request.stored.name, request.stored.version
        else:
            raise InvalidArgument("LoadModel: give archive_path or stored name and version")
        return await self._load(name, version, settings, device, request.make_default)

    @_guarded
    async def UploadModel(self, request: AsyncIterator[Any], context: Any) -> pb.LoadModelResponse:
        header = await self._uploads.header(request)
        settings, device = decode_settings(header.settings)
        label = clip(header.filename or "upload")
        spooled = await self._uploads.receive(label, header.size, request)
        log.info("management: %s installs upload %r (%d bytes)", _CALLER.get(), label, header.size)
        # As LoadModel: the install reads the file through its fd and closes it.
        name, version = await self._install(spooled.path, label, spooled.close)
        return await self._load(name, version, settings, device, header.make_default)

    async def _install(
        self, fd_path: Path, label: str, release: Callable[[], None]
    ) -> tuple[str, str]:
        """Verify and store the archive open at ``fd_path``; errors name it ``label``."""
        try:
            installed = await self._lifecycle.install(fd_path, release=release)
        except EdgeserveError as exc:  # say what the caller gave, not /proc/self/fd/N
            exc.message = exc.message.replace(f"'{fd_path}'", f"'{label}'")
            exc.args = (exc.message,)
            raise
        return installed.name, installed.version

    async def _load(
        self,
        name: str,
        version: str,
        settings: BatchingSettings,
        device: str | None,
        make_default: bool,
    ) -> pb.LoadModelResponse:
        log.info("management: %s loads %s/%s", _CALLER.get(), name, version)
        live = await self._lifecycle.load(
            name, version, settings, device=device, make_default=make_default
        )
        return pb.LoadModelResponse(model=self._version(live))

    @_guarded
    async def UnloadModel(self, request: Any, context: Any) -> pb.UnloadModelResponse:
        _require_version("UnloadModel", request.version)
        log.info("management: %s unloads %s/%s", _CALLER.get(), request.name, request.version)
        await self._lifecycle.unload(request.name, request.version)
        return pb.UnloadModelResponse(
            default_version=self._registry.default_version(request.name) or ""
        )

    @_guarded
    async def SetDefaultVersion(self, request: Any, context: Any) -> pb.SetDefaultVersionResponse:
        _require_version("SetDefaultVersion", request.version)
        previous = self._registry.default_version(request.name) or ""
        log.info(
            "management: %s sets %s default to %s", _CALLER.get(), request.name, request.version
        )
        await self._lifecycle.set_default(request.name, request.version)
        live = self._registry.get(request.name, request.version)
        return pb.SetDefaultVersionResponse(previous_default=previous, model=self._version(live))

    @_guarded
    async def ScaleModel(self, request: Any, context: Any) -> pb.ScaleModelResponse:
        version = self._registry.get(request.name, request.version or None).version
        changes, device = decode_settings(request.settings)
        asked = {**changes.to_dict(), **({"device": device} if device else {})}
        if not asked:
            raise InvalidArgument("ScaleModel: no setting to change")
        log.info("management: %s scales %s/%s: %s", _CALLER.get(), request.name, version, asked)
        await self._lifecycle.scale(request.name, version, changes, device)
        return pb.ScaleModelResponse(model=self._version(self._registry.get(request.name, version)))

    @_guarded
    async def GetStatus(self, request: Any, context: Any) -> pb.GetStatusResponse:
        document = self._status()
        daemon = document.get("daemon") or {}
        return pb.GetStatusResponse(
            status_json=json.dumps(document, sort_keys=True, default=str),
            health=str(document.get("health", "")),
            ready=bool(daemon.get("ready")),
            version=str(daemon.get("version") or ""),
            uptime_s=float(daemon.get("uptime_s") or 0.0),
        )


# -- server ---------------------------------------------------------------------------------


class ManagementServer:
    """The management ``grpc.aio`` server: Unix sockets through a ``CredentialRelay``,
    loopback TCP with a token. ``await start()`` after the inference server is up,
    ``await stop(grace)`` first on shutdown."""

    def __init__(
        self,
        *,
        lifecycle: Lifecycle,
        registry: ModelRegistry,
        status: StatusSource,
        listen: Sequence[str],
        archive_dir: Path,
        state_dir: Path,
        allowed_group: str | None = None,
        token_file: Path | None = None,
        socket_mode: int = 0o660,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S,
    ) -> None:
        self._listen = [parse_listen_address(a, "management.listen") for a in listen]
        self._idle_timeout_s = idle_timeout_s
        self._max_connections = max_connections
        policy = AccessPolicy(allowed_group)
        self._relays = [
            CredentialRelay(
                Path(a[1]),
                socket_mode=socket_mode,
                socket_gid=policy.socket_gid(),
                max_connections=max_connections,
                idle_timeout_s=idle_timeout_s,
            )
            for a in self._listen
            if a[0] == "unix"
        ]
        tcp = [a for a in self._listen if a[0] == "tcp"]
        for address in tcp:
            if not is_loopback_host(str(address[1])):
                raise ConfigError("management.listen", f"{address[1]} is not loopback")
        self._token = TokenCheck(token_file) if tcp else TokenCheck(None)
        self._archive_dir = archive_dir
        self._state_dir = state_dir
        self._socket_gid = policy.socket_gid()
        self.gate = ManagementGate(policy, self._relays, self._token)
        self._uploads = UploadSpool(state_dir / "uploads")
        self.servicer = ManagementServicer(
            lifecycle=lifecycle,
            registry=registry,
            status=status,
            gate=self.gate,
            archive_dir=archive_dir,
            uploads=self._uploads,
        )
        self._server: grpc.aio.Server | None = None
        self.addresses: list[str] = []

    async def start(self) -> list[str]:
        # The inference server is already serving on this loop: folders in a thread.
        await asyncio.to_thread(self._prepare_archive_dir)
        await asyncio.to_thread(self._uploads.prepare)
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0), *self._bounds()])
        # Parsed without raising, as the inference services: a malformed message is
        # INVALID_ARGUMENT, not grpcio's UNKNOWN.
        service, handlers = captured_handlers(
            pb_grpc.add_ManagementServicer_to_server, self.servicer
        )
        bounded = bounded_handlers(handlers)
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, bounded),))
        server.add_registered_method_handlers(service, bounded)
        try:
            for relay in self._relays:
                server.add_insecure_port(f"unix://{relay.prepare()}")
                self.addresses.append(f"unix://{relay.public_path}")
            for address in self._listen:
                if address[0] == "tcp":
                    host = f"[{address[1]}]" if ":" in str(address[1]) else address[1]
                    port = server.add_insecure_port(f"{host}:{address[2]}")
                    self.addresses.append(f"{host}:{port}")
            await server.start()
            for relay in self._relays:
                await relay.start()
        except BaseException:
            await server.stop(None)
            for relay in self._relays:
                await relay.stop()
            raise
        self._server = server
        return self.addresses

    def _bounds(self) -> list[tuple[str, int]]:
        """Connection bounds (peercred.py says why): pings during calls keep a long call
        from looking idle to the relay; idle and silent connections go."""
        idle_ms = round(self._idle_timeout_s * 1000)
        return [
            ("grpc.max_allowed_incoming_connections", self._max_connections + ROOT_RESERVE),
            ("grpc.max_connection_idle_ms", idle_ms),
            ("grpc.server_handshake_timeout_ms", min(idle_ms, 5000)),
            ("grpc.keepalive_time_ms", max(1000, idle_ms // 3)),
            ("grpc.keepalive_timeout_ms", max(1000, idle_ms // 3)),
        ]

    def _prepare_archive_dir(self) -> None:
        """Create the drop folder (group-writable) when it is ours to make: in state_dir."""
        folder = self._archive_dir
        if folder.exists() or not folder.resolve().is_relative_to(self._state_dir.resolve()):
            return
        folder.mkdir(parents=True, mode=0o770)
        # setgid: dropped archives keep the allowed group; nothing for others
        os.chmod(folder, 0o2770)  # noqa: S103
        with contextlib.suppress(PermissionError):
            os.chown(folder, -1, self._socket_gid)

    async def stop(self, grace: float | None) -> None:
        """Stop accepting, let calls in progress finish within ``grace`` s, then close."""
        for relay in self._relays:
            relay.stop_accepting()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        for relay in self._relays:
            await relay.stop()
