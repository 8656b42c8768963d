"""Typed daemon configuration: frozen dataclasses, secure defaults, errors that name the key.

Each dataclass validates its own fields cheaply when built, so a ``Config`` made in code is
checked too; its ``ConfigError`` names the key relative to the dataclass, and the loader
prefixes the section (``models[1].batching.max_queue_delay_ms``). Loading (YAML with line
numbers, ``EDGESERVE_*`` environment variables, overrides, paths, ``run_dir``, where a bad
value came from) is the second phase and lives in ``config.load``; ``load_config`` and
``ENV_VARS`` are re-exported here, so ``from edgeserve.config import load_config`` works.
Nothing here exits.

Batching for one model is one ``types.BatchingSettings`` per layer, stacked with ``over``
(the daemon: ``model.batching.over(config.batching)``; ``serving.build.resolve_batching``
adds the archive's and the built-ins): per-model ``batching`` > global ``batching`` fields
that are set > the archive's defaults > built-ins. Every field defaults to null, so a
layer beats the ones below only where the operator wrote it.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from edgeserve.errors import ConfigError
from edgeserve.types import BatchingSettings

if TYPE_CHECKING:
    from edgeserve.config.load import ENV_VARS as ENV_VARS
    from edgeserve.config.load import load_config as load_config

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["json", "text"]
UnixAddress = tuple[Literal["unix"], str]
TcpAddress = tuple[Literal["tcp"], str, int]

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,2})?)$")
DEFAULT_STATE_DIR = Path("/var/lib/edgeserve")
DEFAULT_RUN_DIR = Path("/run/edgeserve")
DEFAULT_INFERENCE_TCP = "127.0.0.1:8001"
MIB = 1 << 20
MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes with the terminating NUL

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_REMOTE_HINT = "; set server.allow_non_loopback: true to listen beyond this machine"


@dataclass(frozen=True)
class ServerConfig:
    listen: tuple[str, ...] = (f"unix://{DEFAULT_RUN_DIR}/inference.sock", DEFAULT_INFERENCE_TCP)
    """Inference gRPC addresses, unix:///abs/path or host:port; default under run_dir."""
    allow_non_loopback: bool = False
    """Allow TCP addresses other than loopback here and in metrics (never for management)."""
    max_message_bytes: int = 64 * MIB
    """Largest gRPC message received or sent, in bytes; bigger requests get RESOURCE_EXHAUSTED."""
    grace_period_s: float = 10.0
    """On SIGTERM, how long in-flight and queued requests may take to drain before cancel."""

    def __post_init__(self) -> None:
        _check_addresses(self.listen, "listen", self.allow_non_loopback, hint=_REMOTE_HINT)
        if not 1024 <= self.max_message_bytes < 2**31:
            raise _bad("max_message_bytes", "must be 1024..2147483647", self.max_message_bytes)
        if not 0 <= self.grace_period_s <= 3600:
            raise _bad("grace_period_s", "must be 0..3600", self.grace_period_s)


@dataclass(frozen=True)
class ManagementConfig:
    listen: tuple[str, ...] = (f"unix://{DEFAULT_RUN_DIR}/management.sock",)
    """Management gRPC addresses; a Unix socket by default, TCP only on loopback with a token."""
    allowed_group: str | None = "edgeserve"
    """Group whose members may call management over the Unix socket; root is always allowed."""
    token_file: Path | None = None
    """File holding the bearer token; required when listen has TCP; nothing for others."""
    socket_mode: int = 0o660
    """Permission bits of the Unix socket (write it as YAML octal: 0660); never for others."""
    archive_dir: Path | None = None
    """The only directory LoadModel reads archives from; null = <state_dir>/incoming."""

    def __post_init__(self) -> None:
        _check_addresses(self.listen, "listen", False, hint="; management is local only")
        tcp = [a for a in self.listen if parse_listen_address(a)[0] == "tcp"]
        if tcp and self.token_file is None:
            raise ConfigError("token_file", f"required because listen has TCP address {tcp[0]!r}")
        if self.allowed_group is not None and not _GROUP_RE.match(self.allowed_group):
            raise ConfigError("allowed_group", f"not a valid group name: {self.allowed_group!r}")
        if not 0 <= self.socket_mode <= 0o770 or self.socket_mode & 0o007:
            raise _bad("socket_mode", "must be <= 0770, nothing for others", oct(self.socket_mode))


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"
    """Where models run: auto (a GPU when there is one), cpu, cuda or cuda:N."""
    fp16: bool = False
    """Run models in half precision on a GPU (ignored on CPU)."""
    memory_budget_mb: int = 0
    """Refuse a load whose estimated memory would exceed this many MiB in total; 0 = no limit."""

    def __post_init__(self) -> None:
        _check_device(self.device, "device")
        if self.memory_budget_mb < 0:
            raise _bad("memory_budget_mb", "must be >= 0", self.memory_budget_mb)


@dataclass(frozen=True)
class TrustConfig:
    keys: tuple[Path, ...] = ()
    """Public key PEM files whose signatures are trusted for archives and fleet documents."""
    require_signed: bool = True
    """Refuse unsigned archives and documents; turn off only on a development machine."""


@dataclass(frozen=True)
class ModelConfig:
    archive: Path | None = None
    """Archive to install into the store and serve; null serves name/version from the store."""
    name: str | None = None
    """Model name; with an archive, the archive's manifest must carry this name."""
    version: str | None = None
    """Model version; null = the archive's, or the version the store has as default."""
    default: bool = False
    """Make this version the model's default version."""
    device: str | None = None
    """Overrides runtime.device for this model."""
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    """Per-model batching: wins over global batching, which wins over the archive's defaults."""

    def __post_init__(self) -> None:
        if self.archive is None and self.name is None:
            raise ConfigError("archive", "set 'archive' or 'name' (a model already in the store)")
        for key in ("name", "version"):
            value = getattr(self, key)
            if value is not None and not _NAME_RE.match(value):
                raise _bad(key, "must be 1-128 of letters, digits, '_', '.', '-'", value)
        if self.device is not None:
            _check_device(self.device, "device")
        self.batching.validate("batching")


@dataclass(frozen=True)
class MetricsConfig:
    prometheus_listen: str | None = None
    """host:port of the Prometheus text endpoint; null = off; loopback unless allowed."""


@dataclass(frozen=True)
class LoggingConfig:
    level: LogLevel = "info"
    """Lowest level logged: debug, info, warning, error or critical."""
    format: LogFormat = "json"
    """json: one JSON object per line (journald, log shippers); text: for humans."""


@dataclass(frozen=True)
class Config:
    state_dir: Path = DEFAULT_STATE_DIR
    """Model store, persisted live set, telemetry buffer; must be an absolute path."""
    run_dir: Path = DEFAULT_RUN_DIR
    """Sockets and other runtime files; chosen at load when not set (see module docstring)."""
    server: ServerConfig = field(default_factory=ServerConfig)
    """Inference gRPC server."""
    management: ManagementConfig = field(default_factory=ManagementConfig)
    """Management gRPC server."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, precision and memory budget."""
    trust: TrustConfig = field(default_factory=TrustConfig)
    """Signature keys."""
    batching: BatchingSettings = field(default_factory=BatchingSettings)
    """Batching defaults for every model; the fields set here win over the archive's."""
    models: tuple[ModelConfig, ...] = ()
    """Models to serve at start, beside what the store says was live."""
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    """Prometheus endpoint."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Log level and format."""

    def __post_init__(self) -> None:
        for key in ("state_dir", "run_dir"):
            if not getattr(self, key).is_absolute():
                raise _bad(key, "must be an absolute path", str(getattr(self, key)))
        self.batching.validate("batching")
        if self.metrics.prometheus_listen is not None:
            _check_addresses(
                (self.metrics.prometheus_listen,),
                "metrics.prometheus_listen",
                self.server.allow_non_loopback,
                indexed=False,
                unix_ok=False,
                hint=_REMOTE_HINT,
            )
        seen: dict[tuple[str | None, str | None], int] = {}
        defaults: dict[str, int] = {}
        for i, model in enumerate(self.models):
            if model.name is not None and (model.name, model.version) in seen:
                j = seen[(model.name, model.version)]
                raise ConfigError(f"models[{i}]", f"same model and version as models[{j}]")
            seen[(model.name, model.version)] = i
            if model.default and model.name is not None:
                if model.name in defaults:
                    raise ConfigError(
                        f"models[{i}].default",
                        f"models[{defaults[model.name]}] is already the default of '{model.name}'",
                    )
                defaults[model.name] = i


def parse_listen_address(addr: str, key: str = "address") -> UnixAddress | TcpAddress:
    """``unix:///abs/path`` (or ``unix:/abs/path``) -> ("unix", path); ``host:port``,
    ``[v6]:port`` or ``tcp://host:port`` -> ("tcp", host, port). Errors name ``key``."""
    if not isinstance(addr, str) or not addr:
        raise ConfigError(key, f"must be a non-empty address string, got {addr!r}")
    if addr.startswith("unix:"):
        path = addr[7:] if addr.startswith("unix://") else addr[5:]
        if not path.startswith("/"):
            raise ConfigError(key, f"unix socket path must be absolute: unix:///path, got {addr!r}")
        if len(os.fsencode(path)) > MAX_UNIX_PATH_BYTES:
            raise ConfigError(key, f"unix socket path is longer than {MAX_UNIX_PATH_BYTES} bytes")
        return ("unix", path)
    host, sep, port = addr.removeprefix("tcp://").rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        if not _is_ip(host, 6):
            raise ConfigError(key, f"not an IPv6 address: {host!r}")
    elif not sep or not _HOST_RE.match(host):
        raise ConfigError(key, f"must be unix:///path, host:port or [v6]:port, got {addr!r}")
    if not port.isdigit() or int(port) > 65535:
        raise ConfigError(key, f"port must be 0..65535, got {port!r}")
    return ("tcp", host, int(port))


def is_loopback_host(host: str) -> bool:
    """True for ``localhost`` and loopback IP literals; other names are not trusted."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def grpc_address(addr: str) -> str:
    """The string ``grpc`` wants for a listen address (``unix:///p``, ``host:port``, ``[v6]:p``)."""
    parsed = parse_listen_address(addr)
    if parsed[0] == "unix":
        return f"unix://{parsed[1]}"
    host = f"[{parsed[1]}]" if ":" in parsed[1] else parsed[1]
    return f"{host}:{parsed[2]}"


# -- validation helpers ---------------------------------------------------------------------


def _bad(key: str, problem: str, got: Any) -> ConfigError:
    return ConfigError(key, f"{problem}, got {got!r}")


def _check_device(device: str, key: str) -> None:
    if not DEVICE_RE.match(device):
        raise _bad(key, "must be auto, cpu, cuda or cuda:N", device)


def _check_addresses(
    addrs: tuple[str, ...],
    key: str,
    allow_remote: bool,
    *,
    indexed: bool = True,
    unix_ok: bool = True,
    hint: str = "",
) -> None:
    if not addrs:
        raise ConfigError(key, "needs at least one address")
    for i, addr in enumerate(addrs):
        where = f"{key}[{i}]" if indexed else key
        parsed = parse_listen_address(addr, where)
        if parsed[0] == "unix" and not unix_ok:
            raise ConfigError(where, f"must be a TCP host:port, got {addr!r}")
        if parsed[0] == "tcp" and not (allow_remote or is_loopback_host(parsed[1])):
            raise ConfigError(where, f"{addr!r} is not a loopback address{hint}")
        if addrs.index(addr) != i:
            raise ConfigError(where, f"duplicate address {addr!r}")


def _is_ip(host: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(host).version == version
    except ValueError:
        return False


def problem_of(exc: ConfigError) -> str:
    """The problem part of ``exc``'s message, without the key in front of it."""
    return exc.message[len(exc.key) + 2 :]


def __getattr__(name: str) -> Any:
    # ``config.load`` imports this module, so its names are re-exported lazily (PEP 562).
    if name in ("load_config", "ENV_VARS"):
        from edgeserve.config import load

        return getattr(load, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
