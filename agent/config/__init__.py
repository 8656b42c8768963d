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
import socket
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
BrokerScheme = Literal["mqtt", "mqtts"]
UnixAddress = tuple[Literal["unix"], str]
TcpAddress = tuple[Literal["tcp"], str, int]

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:[0-9]{1,2})?)$")
DEFAULT_STATE_DIR = Path("/var/lib/edgeserve")
DEFAULT_RUN_DIR = Path("/run/edgeserve")
DEFAULT_INFERENCE_TCP = "127.0.0.1:8001"
MIB = 1 << 20
MAX_UNIX_PATH_BYTES = 107  # sun_path is 108 bytes with the terminating NUL
TELEMETRY_DB_NAME = "telemetry.db"
MIN_TELEMETRY_BYTES = 64 * 1024  # the buffer's smallest budget (telemetry/buffer.py)
MIN_INTERVAL_S = 0.5  # telemetry.interval_s: one SQLite transaction per interval at most this often
MIN_SAMPLE_EVERY_S = 0.1
BROKER_PORTS: dict[str, int] = {"mqtt": 1883, "mqtts": 8883}

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_DEVICE_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_BROKER_RE = re.compile(
    r"^(?P<scheme>[A-Za-z]+)://(?P<host>\[[^\]/]*\]|[^:/\[\]@?#]*)(:(?P<port>[^/]*))?$"
)
_ID_PROBLEM = "must be 1-64 of letters, digits, '.', '_', '-'"
_TOPIC_LEVEL_RE = re.compile(r"^[A-Za-z0-9._-]+$")
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
    max_connections: int = 512
    """Connections per listen address; more are closed at accept (lowered to fit the fd limit)."""
    connection_idle_s: float = 60.0
    """A connection with no call for this long is closed (clients reconnect on their next call)."""
    connection_max_age_s: float = 0.0
    """Close every connection after this long (calls get 30 s more); 0 = no age limit."""
    max_concurrent_rpcs: int = 256
    """Calls in progress at once, streams included; more are answered RESOURCE_EXHAUSTED."""
    inflight_bytes_factor: float = 4.0
    """Request bytes held at once, as a multiple of max_message_bytes; more: RESOURCE_EXHAUSTED."""
    stream_max_pending_bytes: int = 16 * MIB
    """Per stream: bytes of requests running and responses not yet read; then reading pauses."""

    def __post_init__(self) -> None:
        _check_addresses(self.listen, "listen", self.allow_non_loopback, hint=_REMOTE_HINT)
        if not 1024 <= self.max_message_bytes < 2**31:
            raise _bad("max_message_bytes", "must be 1024..2147483647", self.max_message_bytes)
        if not 0 <= self.grace_period_s <= 3600:
            raise _bad("grace_period_s", "must be 0..3600", self.grace_period_s)
        if not 1 <= self.max_connections <= 65536:
            raise _bad("max_connections", "must be 1..65536", self.max_connections)
        if not 1 <= self.connection_idle_s <= 86400:
            raise _bad("connection_idle_s", "must be 1..86400", self.connection_idle_s)
        if not (self.connection_max_age_s == 0 or 1 <= self.connection_max_age_s <= 31536000):
            raise _bad(
                "connection_max_age_s", "must be 0 or 1..31536000", self.connection_max_age_s
            )
        if not 1 <= self.max_concurrent_rpcs <= 65536:
            raise _bad("max_concurrent_rpcs", "must be 1..65536", self.max_concurrent_rpcs)
        if not 1 <= self.inflight_bytes_factor <= 1024:
            raise _bad("inflight_bytes_factor", "must be 1..1024", self.inflight_bytes_factor)
        if not 1024 <= self.stream_max_pending_bytes < 2**31:
            raise _bad(
                "stream_max_pending_bytes",
                "must be 1024..2147483647",
                self.stream_max_pending_bytes,
            )


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
    max_connections: int = 16
    """Connections per management socket at once; one more is always kept for root."""
    idle_timeout_s: float = 60.0
    """A management connection that carries no bytes for this long is closed."""

    def __post_init__(self) -> None:
        _check_addresses(self.listen, "listen", False, hint="; management is local only")
        tcp = [a for a in self.listen if parse_listen_address(a)[0] == "tcp"]
        if tcp and self.token_file is None:
            raise ConfigError("token_file", f"required because listen has TCP address {tcp[0]!r}")
        if self.allowed_group is not None and not _GROUP_RE.match(self.allowed_group):
            raise ConfigError("allowed_group", f"not a valid group name: {self.allowed_group!r}")
        if not 0 <= self.socket_mode <= 0o770 or self.socket_mode & 0o007:
            raise _bad("socket_mode", "must be <= 0770, nothing for others", oct(self.socket_mode))
        if not 1 <= self.max_connections <= 4096:
            raise _bad("max_connections", "must be 1..4096", self.max_connections)
        if not 1 <= self.idle_timeout_s <= 86400:
            raise _bad("idle_timeout_s", "must be 1..86400", self.idle_timeout_s)


@dataclass(frozen=True)
class RuntimeConfig:
    device: str = "auto"
    """Where models run: auto (a GPU when there is one), cpu, cuda or cuda:N."""
    fp16: bool = False
    """Run models in half precision on a GPU (ignored on CPU)."""
    memory_budget_mb: int = 0
    """Refuse a load whose estimated memory would exceed this many MiB in total; 0 = no limit."""
    load_timeout_s: float = 120.0
    """Most seconds one load (model load, thread probe, warm-up together) may take, then fails."""

    def __post_init__(self) -> None:
        _check_device(self.device, "device")
        if self.memory_budget_mb < 0:
            raise _bad("memory_budget_mb", "must be >= 0", self.memory_budget_mb)
        if not 0 < self.load_timeout_s <= 86400:
            raise _bad("load_timeout_s", "must be > 0 and <= 86400", self.load_timeout_s)


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
class TelemetryConfig:
    enabled: bool = True
    """Record rollups, samples and events into the buffer; false: none of it, and no upload."""
    db: Path | None = None
    """The SQLite buffer file; null = <state_dir>/telemetry.db."""
    interval_s: float = 10.0
    """Seconds between rollups (and upload of live data); 0.5..3600."""
    max_bytes: int = 64 * MIB
    """Byte budget of the buffer; near it samples thin out, then the oldest lowest-class rows go."""
    batch_bytes: int = 65536
    """Largest upload message, in bytes of records (JSON); 1024..16777216."""
    upload_bytes_per_s: int = 65536
    """Upload rate cap in bytes per second, so a backlog never saturates the link."""
    sample_every_s: float = 1.0
    """Seconds between system samples (CPU, memory, disk, GPU); 0.1..3600."""

    def __post_init__(self) -> None:
        if not MIN_INTERVAL_S <= self.interval_s <= 3600:
            raise _bad("interval_s", f"must be {MIN_INTERVAL_S}..3600 seconds", self.interval_s)
        if not MIN_SAMPLE_EVERY_S <= self.sample_every_s <= 3600:
            problem = f"must be {MIN_SAMPLE_EVERY_S}..3600 seconds"
            raise _bad("sample_every_s", problem, self.sample_every_s)
        if not MIN_TELEMETRY_BYTES <= self.max_bytes <= 1 << 40:
            problem = f"must be {MIN_TELEMETRY_BYTES} (64 KiB)..1 TiB"
            raise _bad("max_bytes", problem, self.max_bytes)
        if not 1024 <= self.batch_bytes <= 16 * MIB:
            raise _bad("batch_bytes", "must be 1024..16777216", self.batch_bytes)
        if not 1024 <= self.upload_bytes_per_s <= 1 << 30:
            raise _bad("upload_bytes_per_s", "must be 1024..1073741824", self.upload_bytes_per_s)


@dataclass(frozen=True)
class FleetTlsConfig:
    ca_file: Path | None = None
    """CA certificates (PEM) the broker's certificate must chain to; null = the system CAs."""
    cert_file: Path | None = None
    """Client certificate (PEM) for brokers that require one; may hold the key itself."""
    key_file: Path | None = None
    """Private key of cert_file (PEM); must not be readable by others."""

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ConfigError("key_file", "set only together with cert_file")


_WINDOW_RE = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])$")


def parse_activation_window(value: str | None, key: str) -> tuple[int, int] | None:
    """``"HH:MM-HH:MM"`` as (start, end) minutes after midnight; None stays None."""
    if value is None:
        return None
    match = _WINDOW_RE.match(value)
    if match is None:
        raise _bad(key, 'must be "HH:MM-HH:MM" (24 h, device-local time)', value)
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if start == end:
        raise _bad(key, "start and end must differ", value)
    return start, end


@dataclass(frozen=True)
class ProbationConfig:
    max_error_rate: float = 0.01
    """Breach: the new versions' share of failed requests above this (0..1)."""
    min_requests: int = 20
    """Requests the new versions must have served before their error rate is judged."""
    max_p99_ratio: float = 3.0
    """Breach: p99 above this many times the previous set's p99 (and above p99_floor_ms)."""
    p99_floor_ms: float = 20.0
    """A p99 at or below this many milliseconds is never a breach."""

    def __post_init__(self) -> None:
        if not 0 <= self.max_error_rate <= 1:
            raise _bad("max_error_rate", "must be 0..1", self.max_error_rate)
        if not 1 <= self.min_requests <= 1_000_000:
            raise _bad("min_requests", "must be 1..1000000", self.min_requests)
        if not 1 <= self.max_p99_ratio <= 1000:
            raise _bad("max_p99_ratio", "must be 1..1000", self.max_p99_ratio)
        if not 0 <= self.p99_floor_ms <= 600_000:
            raise _bad("p99_floor_ms", "must be 0..600000 ms", self.p99_floor_ms)


@dataclass(frozen=True)
class FleetConfig:
    broker: str | None = None
    """mqtt://host[:1883] or mqtts://host[:8883]; null = no broker, the device runs alone."""
    device_id: str | None = None
    """This device's id in topics and the client id; null = the hostname; [A-Za-z0-9._-]{1,64}."""
    groups: tuple[str, ...] = ()
    """Group names this device follows, same alphabet as device_id."""
    topic_prefix: str = "edgeserve/v1"
    """Prefix P of every topic (P/devices/<id>/...); levels of [A-Za-z0-9._-] joined by /."""
    tls: FleetTlsConfig = field(default_factory=FleetTlsConfig)
    """TLS files for an mqtts:// broker; there is no plaintext fallback."""
    username: str | None = None
    """MQTT user name; null = connect without one."""
    password_file: Path | None = None
    """File holding the MQTT password; needs username, and mqtts:// unless on loopback."""
    root: Path | None = None
    """The fleet trust root (fleet root init); null = follow no deployments (presence only)."""
    probation_s: float = 60.0
    """Seconds a new set is watched on live traffic before it commits; 0..86400."""
    probation: ProbationConfig = field(default_factory=ProbationConfig)
    """What counts as a breach during probation (then the previous set comes back)."""
    activation_window: str | None = None
    """"HH:MM-HH:MM" device-local time when new sets may go live; null = any time."""
    max_artifact_bytes: int = 2 * 1024 * MIB
    """Largest artifact this device downloads, in bytes; 1 MiB..1 TiB."""

    def __post_init__(self) -> None:
        if not 0 <= self.probation_s <= 86_400:
            raise _bad("probation_s", "must be 0..86400 seconds", self.probation_s)
        parse_activation_window(self.activation_window, "activation_window")
        if not MIB <= self.max_artifact_bytes <= 1 << 40:
            raise _bad(
                "max_artifact_bytes", "must be 1048576 (1 MiB)..1 TiB", self.max_artifact_bytes
            )
        if self.device_id is not None and not _DEVICE_ID_RE.match(self.device_id):
            raise _bad("device_id", _ID_PROBLEM, self.device_id)
        for i, group in enumerate(self.groups):
            if not _DEVICE_ID_RE.match(group):
                raise _bad(f"groups[{i}]", _ID_PROBLEM, group)
            if self.groups.index(group) != i:
                raise _bad(f"groups[{i}]", "duplicate group", group)
        levels = self.topic_prefix.split("/")
        if len(self.topic_prefix) > 128 or not all(_TOPIC_LEVEL_RE.match(x) for x in levels):
            problem = "must be levels of letters, digits, '.', '_', '-' joined by '/' (<= 128)"
            raise _bad("topic_prefix", problem, self.topic_prefix)
        if self.password_file is not None and self.username is None:
            raise ConfigError("password_file", "set username too")
        if self.broker is None:
            return
        scheme, host, _ = parse_broker_url(self.broker, "broker")
        tls_set = [k for k in ("ca_file", "cert_file", "key_file") if getattr(self.tls, k)]
        if scheme == "mqtt" and tls_set:
            problem = f"is set but broker is {self.broker!r}: use mqtts:// (TLS is never optional)"
            raise ConfigError(f"tls.{tls_set[0]}", problem)
        if scheme == "mqtt" and self.password_file is not None and not is_loopback_host(host):
            problem = f"would go in clear text to {host!r}: use mqtts://"
            raise ConfigError("password_file", problem)

    def topic(self, device_id: str, leaf: str) -> str:
        """``<prefix>/devices/<id>/<leaf>``."""
        return f"{self.topic_prefix}/devices/{device_id}/{leaf}"


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
    telemetry: TelemetryConfig = field(default_factory=TelemetryConfig)
    """The telemetry buffer and its upload."""
    fleet: FleetConfig = field(default_factory=FleetConfig)
    """The fleet broker connection (telemetry upload, presence)."""

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

    def telemetry_db(self) -> Path:
        """The telemetry buffer file: ``telemetry.db`` or ``<state_dir>/telemetry.db``."""
        return self.telemetry.db or self.state_dir / TELEMETRY_DB_NAME


def default_device_id() -> str | None:
    """The hostname when it is a valid device id (``fleet.device_id``'s default), else None."""
    name = socket.gethostname()
    return name if _DEVICE_ID_RE.match(name) else None


def parse_broker_url(url: str, key: str = "broker") -> tuple[BrokerScheme, str, int]:
    """``mqtt://host[:port]`` / ``mqtts://host[:port]`` (``[v6]`` too) -> (scheme, host,
    port); no user info, path or query. Errors name ``key``."""
    if "@" in url:
        raise ConfigError(key, "no credentials in the URL: use username and password_file")
    match = _BROKER_RE.match(url)
    if match is None:
        raise _bad(key, "must be mqtt://host[:port] or mqtts://host[:port]", url)
    scheme, host, port = match["scheme"].lower(), match["host"], match["port"]
    if scheme not in BROKER_PORTS:
        raise _bad(key, "scheme must be mqtt:// or mqtts://", url)
    if host.startswith("["):
        host = host[1:-1]
        if not _is_ip(host, 6):
            raise _bad(key, "not an IPv6 address", host)
    elif not _HOST_RE.match(host):
        raise _bad(key, "needs a host name or address", url)
    if port is None:
        number = BROKER_PORTS[scheme]
    elif port.isdigit() and 1 <= int(port) <= 65535:
        number = int(port)
    else:
        raise _bad(key, "port must be 1..65535", port)
    return ("mqtts" if scheme == "mqtts" else "mqtt", host, number)


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
