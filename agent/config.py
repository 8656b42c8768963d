"""Typed daemon configuration: frozen dataclasses, secure defaults, errors that name the key.

Precedence, lowest first: the defaults below < the YAML file < ``EDGESERVE_*`` environment
variables (``ENV_VARS``) < ``overrides`` (dotted keys from CLI flags). Every problem is a
``ConfigError`` whose key is dotted (``models[1].batching.max_queue_delay_ms``) and which
says where the value came from (file and line, variable, or override). Nothing here exits.

Two phases, as in uvicorn: each dataclass validates its own fields cheaply when built (so a
``Config`` made in code is checked too); ``load_config`` then does what needs the machine:
relative paths are made absolute (YAML paths relative to the file's folder), ``run_dir`` is
chosen, the default socket addresses are put under it, and the files the config names
(token file, trust keys, archives) are checked to exist.

``run_dir`` when not set: ``/run/edgeserve`` if running as root or if that folder is
writable (systemd's ``RuntimeDirectory=`` made it); otherwise ``$XDG_RUNTIME_DIR/edgeserve``
when that variable is set, else ``<state_dir>/run``.

Overrides: a None value means "flag not given" and is skipped; a key ending in ``+``
(``"models+"``) appends to the list below it instead of replacing it.

Batching for one model (``effective_batching``, and ``ModelConfig.settings_dict`` for
``lifecycle``): per-model ``batching`` > global ``batching`` fields that are set > the
archive's defaults > built-ins. The global fields an archive also carries default to
null, so they beat the archive only when the operator wrote them.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import ipaddress
import os
import re
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, Union, get_args, get_origin, get_type_hints

import yaml

from edgeserve.errors import ConfigError

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

# Environment variable -> dotted key. Lists are comma-separated.
ENV_VARS: dict[str, str] = {
    "EDGESERVE_STATE_DIR": "state_dir",
    "EDGESERVE_RUN_DIR": "run_dir",
    "EDGESERVE_LISTEN": "server.listen",
    "EDGESERVE_MANAGEMENT": "management.listen",
    "EDGESERVE_DEVICE": "runtime.device",
    "EDGESERVE_MEMORY_BUDGET_MB": "runtime.memory_budget_mb",
    "EDGESERVE_METRICS_LISTEN": "metrics.prometheus_listen",
    "EDGESERVE_LOG_LEVEL": "logging.level",
    "EDGESERVE_LOG_FORMAT": "logging.format",
}
_LIST_ENV = {"EDGESERVE_LISTEN", "EDGESERVE_MANAGEMENT"}
_INT_ENV = {"EDGESERVE_MEMORY_BUDGET_MB"}
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$")
_GROUP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")
_REMOTE_HINT = "; set server.allow_non_loopback: true to listen beyond this machine"
_NO_OVERRIDES: Mapping[str, Any] = types.MappingProxyType({})


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
class BatchingConfig:
    max_batch_size: int | None = None
    """Largest batch; null takes the archive's value (1 when it has none)."""
    max_queue_delay_ms: float | None = None
    """Upper bound on the wait added for a batch to fill; 0 never waits; null: archive's, 2.0."""
    max_queue_size: int = 256
    """Requests queued per model version before RESOURCE_EXHAUSTED."""
    preferred_batch_sizes: tuple[int, ...] | None = None
    """Batch sizes worth waiting for (ascending, each <= max_batch_size); null: archive's."""
    instances: int = 1
    """Execution threads per model version."""
    intra_op_threads: int | None = None
    """Torch intra-op threads per instance; null splits the allowed CPUs across instances."""

    def __post_init__(self) -> None:
        _check_batching(self)


@dataclass(frozen=True)
class ModelBatching:
    max_batch_size: int | None = None
    """Overrides the global and the archive's max_batch_size."""
    max_queue_delay_ms: float | None = None
    """Overrides the global and the archive's max_queue_delay_ms."""
    max_queue_size: int | None = None
    """Overrides the global max_queue_size."""
    preferred_batch_sizes: tuple[int, ...] | None = None
    """Overrides the global and the archive's preferred_batch_sizes."""
    instances: int | None = None
    """Overrides the global instances."""
    intra_op_threads: int | None = None
    """Overrides the global intra_op_threads."""

    def __post_init__(self) -> None:
        _check_batching(self)


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
    batching: ModelBatching = field(default_factory=ModelBatching)
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

    def settings_dict(self, defaults: BatchingConfig | None = None) -> dict[str, Any]:
        """Keyword arguments for ``types.ModelSettings``: this model's batching over the
        global ``defaults``, plus ``device``; unset fields are left out, so the archive's
        defaults (applied by ``lifecycle``) fill them."""
        out = dataclasses.asdict(defaults or BatchingConfig())
        out.update((k, v) for k, v in dataclasses.asdict(self.batching).items() if v is not None)
        out["device"] = self.device
        return {k: v for k, v in out.items() if v is not None}


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
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    """Batching defaults for every model."""
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


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int
    """Largest batch."""
    max_queue_delay_ms: float
    """Upper bound on added wait."""
    max_queue_size: int
    """Queue bound before RESOURCE_EXHAUSTED."""
    preferred_batch_sizes: tuple[int, ...]
    """Batch sizes worth waiting for; empty = none."""
    instances: int
    """Execution threads."""
    intra_op_threads: int
    """Torch intra-op threads per instance."""

    def __post_init__(self) -> None:
        _check_batching(self)


class ArchiveBatching(Protocol):
    """What ``effective_batching`` reads from an archive (``manifest.BatchingDefaults``)."""

    @property
    def max_batch_size(self) -> int: ...
    @property
    def max_queue_delay_ms(self) -> float: ...
    @property
    def preferred_batch_sizes(self) -> Sequence[int]: ...


def effective_batching(
    model_cfg: ModelConfig | None,
    archive_defaults: ArchiveBatching | None,
    defaults: BatchingConfig | None = None,
    *,
    cpus: int | None = None,
) -> BatchSettings:
    """Resolve one model's batching: per-model config > global ``defaults`` (fields set)
    > archive defaults > built-in (max_batch_size 1, max_queue_delay_ms 2.0).

    Global fields beat the archive only when set: their defaults are None for the fields an
    archive carries, so a global ``batching.max_batch_size: 8`` means what it says.

    ``intra_op_threads`` left open becomes ``cpus // instances`` (at least 1), where ``cpus``
    defaults to the CPUs this process may run on (systemd ``CPUAffinity=`` counts).
    """
    layers: list[Any] = [
        model_cfg.batching if model_cfg else None,
        defaults or BatchingConfig(),
        archive_defaults,
    ]

    def pick(name: str) -> Any:
        for layer in layers:
            value = getattr(layer, name, None)
            if value is not None:
                return value
        return None

    instances = pick("instances") or 1
    if cpus is None:
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    label = (model_cfg.name or str(model_cfg.archive)) if model_cfg else "?"
    try:
        return BatchSettings(
            max_batch_size=pick("max_batch_size") or 1,
            max_queue_delay_ms=float(_first(pick("max_queue_delay_ms"), 2.0)),
            max_queue_size=pick("max_queue_size") or 256,
            preferred_batch_sizes=tuple(pick("preferred_batch_sizes") or ()),
            instances=instances,
            intra_op_threads=pick("intra_op_threads") or max(1, cpus // instances),
        )
    except ConfigError as exc:
        raise ConfigError(f"batching.{exc.key}", f"{_problem(exc)} (model {label})") from None


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


def load_config(
    path: Path | None,
    *,
    overrides: Mapping[str, Any] = _NO_OVERRIDES,
    env: Mapping[str, str] = os.environ,
) -> Config:
    """Defaults < YAML at ``path`` < ``EDGESERVE_*`` in ``env`` < ``overrides``.

    ``overrides`` maps dotted keys (``"server.listen"``, ``"state_dir"``) to values; a None
    value means "flag not given" and is skipped, so argparse results can be passed as is.
    """
    data: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        data = _read_yaml(Path(path), sources)
    for var, key in ENV_VARS.items():
        if env.get(var):
            _set_dotted(data, key, _env_value(var, env[var]), sources, f"from ${var}")
    for key, value in overrides.items():
        if value is not None:
            _set_dotted(data, key, value, sources, "from overrides")
    try:
        _resolve_dirs(data, env)
        config = _build(Config, data, "")
        _check_files(config)
    except ConfigError as exc:
        raise _with_source(exc, sources) from None
    return config


# -- validation helpers ---------------------------------------------------------------------


def _bad(key: str, problem: str, got: Any) -> ConfigError:
    return ConfigError(key, f"{problem}, got {got!r}")


def _check_device(device: str, key: str) -> None:
    if not DEVICE_RE.match(device):
        raise _bad(key, "must be auto, cpu, cuda or cuda:N", device)


def _check_batching(b: Any) -> None:
    for key, low, high in (
        ("max_batch_size", 1, 65536),
        ("max_queue_delay_ms", 0, 60000),
        ("max_queue_size", 1, 1_000_000),
        ("instances", 1, 64),
        ("intra_op_threads", 1, 1024),
    ):
        value = getattr(b, key)
        if value is not None and not low <= value <= high:
            raise _bad(key, f"must be {low}..{high}", value)
    sizes = b.preferred_batch_sizes or ()
    if not all(x >= 1 for x in sizes) or list(sizes) != sorted(set(sizes)):
        raise _bad("preferred_batch_sizes", "must be ascending distinct sizes >= 1", list(sizes))
    if sizes and b.max_batch_size is not None and sizes[-1] > b.max_batch_size:
        raise ConfigError(
            "preferred_batch_sizes", f"{sizes[-1]} is larger than max_batch_size {b.max_batch_size}"
        )


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


def _check_files(config: Config) -> None:
    token = config.management.token_file
    files = [("management.token_file", token)]
    files += [(f"trust.keys[{i}]", key) for i, key in enumerate(config.trust.keys)]
    files += [(f"models[{i}].archive", m.archive) for i, m in enumerate(config.models)]
    for key, path in files:
        if path is not None and not path.is_file():
            raise ConfigError(key, f"file not found: {path}")
    if token is not None and token.stat().st_mode & 0o007:
        raise ConfigError("management.token_file", f"{token} is open to others; chmod o-rwx it")


# -- loading --------------------------------------------------------------------------------

_PATH_KEYS = ("state_dir", "run_dir", "management.token_file", "trust.keys[]", "models[].archive")


def _read_yaml(path: Path, sources: dict[str, str]) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except OSError as exc:
        raise ConfigError(str(path), f"cannot read: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(str(path), f"invalid YAML at {where}{problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path), f"top level must be a mapping, got {_tname(data)}")
    _record_lines(root, "", sources, str(path))
    for pattern in _PATH_KEYS:
        _map_paths(data, pattern.split("."), lambda p: str(path.parent.absolute() / p))
    return data


def _record_lines(node: yaml.Node, key: str, sources: dict[str, str], name: str) -> None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            child = f"{key}.{k.value}" if key else str(k.value)
            if child in sources:
                raise ConfigError(
                    child,
                    f"duplicate key ({name} {sources[child]} and line {k.start_mark.line + 1})",
                )
            sources[child] = f"line {k.start_mark.line + 1}"
            _record_lines(v, child, sources, name)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            sources[f"{key}[{i}]"] = f"line {v.start_mark.line + 1}"
            _record_lines(v, f"{key}[{i}]", sources, name)
    if not key:
        for k in sources:
            sources[k] = f"{name} {sources[k]}"  # "config.yaml line 3"


def _map_paths(data: Any, parts: list[str], fix: Callable[[str], str]) -> None:
    """Apply ``fix`` to relative path strings at ``parts`` ("models[]" = every item)."""
    if not parts or not isinstance(data, dict):
        return
    name, is_list = parts[0].removesuffix("[]"), parts[0].endswith("[]")
    if name not in data:
        return
    if is_list and isinstance(data[name], list):
        items = data[name]
        for i, item in enumerate(items):
            if len(parts) == 1 and _relative(item):
                items[i] = fix(item)
            _map_paths(item, parts[1:], fix)
    elif len(parts) == 1 and _relative(data[name]):
        data[name] = fix(data[name])
    else:
        _map_paths(data[name], parts[1:], fix)


def _relative(value: Any) -> bool:
    return isinstance(value, str) and value != "" and not os.path.isabs(value)


def _env_value(var: str, raw: str) -> Any:
    if var in _LIST_ENV:
        return [item.strip() for item in raw.split(",") if item.strip()]
    if var in _INT_ENV:
        try:
            return int(raw)
        except ValueError:
            problem = f"must be an integer, got {raw!r} (${var})"
            raise ConfigError(ENV_VARS[var], problem) from None
    return raw


def _set_dotted(
    data: dict[str, Any], key: str, value: Any, sources: dict[str, str], source: str
) -> None:
    append = key.endswith("+")  # "models+": append to the list instead of replacing it
    key = key.removesuffix("+")
    *parents, leaf = key.split(".")
    node = data
    for i, part in enumerate(parents):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(".".join(parents[: i + 1]), f"must be a mapping, got {_tname(node)}")
    if append:
        old = node.get(leaf, [])
        if not isinstance(old, list) or not isinstance(value, list | tuple):
            raise ConfigError(key, f"can only append a list to a list, got {_tname(old)}")
        node[leaf] = [*old, *value]
        sources.update((f"{key}[{i}]", source) for i in range(len(old), len(node[leaf])))
        return
    node[leaf] = value
    for k in [k for k in sources if k.startswith((f"{key}.", f"{key}["))]:
        del sources[k]
    sources[key] = source


def _resolve_dirs(data: dict[str, Any], env: Mapping[str, str]) -> None:
    for pattern in _PATH_KEYS:  # paths from env and overrides are relative to the cwd
        _map_paths(data, pattern.split("."), os.path.abspath)
    state_dir = data.get("state_dir", str(DEFAULT_STATE_DIR))
    if "run_dir" not in data and isinstance(state_dir, str):
        data["run_dir"] = str(_default_run_dir(Path(state_dir), env))
    run_dir = data.get("run_dir")
    for section, sock in (("server", "inference.sock"), ("management", "management.sock")):
        sect = data.setdefault(section, {})
        if isinstance(sect, dict) and "listen" not in sect and isinstance(run_dir, str):
            tcp = [DEFAULT_INFERENCE_TCP] if section == "server" else []
            sect["listen"] = [f"unix://{Path(run_dir) / sock}", *tcp]


def _default_run_dir(state_dir: Path, env: Mapping[str, str]) -> Path:
    if os.geteuid() == 0 or os.access(DEFAULT_RUN_DIR, os.W_OK | os.X_OK):
        return DEFAULT_RUN_DIR
    xdg = env.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "edgeserve"
    return state_dir / "run"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _build(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise ConfigError(prefix or "config", f"must be a mapping, got {_tname(raw)}")
    names = [f.name for f in dataclasses.fields(cls)]
    for k in raw:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f"; known: {', '.join(names)}"
            raise ConfigError(_join(prefix, str(k)), f"unknown key{hint}")
    hints = _hints(cls)
    kwargs = {n: _coerce(raw[n], hints[n], _join(prefix, n)) for n in names if n in raw}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(_join(prefix, exc.key), _problem(exc)) from None


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):  # only X | None is used
        inner = next(a for a in get_args(tp) if a is not type(None))
        return None if value is None else _coerce(value, inner, key)
    if origin is Literal:
        norm = value.lower() if isinstance(value, str) else value
        if norm not in get_args(tp):
            raise ConfigError(key, f"must be one of {', '.join(get_args(tp))}, got {value!r}")
        return norm
    if origin is tuple:
        item = get_args(tp)[0]
        if isinstance(value, str) and item in (str, Path):
            value = [value]
        if not isinstance(value, list | tuple):
            raise ConfigError(key, f"must be a list, got {_tname(value)}")
        return tuple(_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)  # type: ignore[arg-type]
    checks: dict[Any, tuple[Callable[[Any], bool], str]] = {
        bool: (lambda v: isinstance(v, bool), "true or false"),
        int: (lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer"),
        float: (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
        str: (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
        Path: (lambda v: isinstance(v, str | Path) and str(v) != "", "a path"),
    }
    ok, what = checks[tp]
    if not ok(value):
        raise ConfigError(key, f"must be {what}, got {value!r}")
    return tp(value)


def _first(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _problem(exc: ConfigError) -> str:
    return exc.message[len(exc.key) + 2 :]


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _with_source(exc: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """Add where the value at fault (or its nearest parent) was set."""
    key = exc.key
    while key:
        if key in sources:
            return ConfigError(exc.key, f"{_problem(exc)} ({sources[key]})")
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key)
        key = "" if parent == key else parent
    return exc
