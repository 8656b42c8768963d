"""Loading the daemon configuration: sources, merging, paths, and where errors come from.

Precedence, lowest first: the defaults of the ``config`` dataclasses < the YAML file <
``EDGESERVE_*`` environment variables (``ENV_VARS``) < ``overrides`` (dotted keys from CLI
flags). Every problem is a ``ConfigError`` whose key is dotted
(``models[1].batching.max_queue_delay_ms``) and which says where the value came from (file
and line, variable, or override). Nothing here exits.

This is the second of the two phases (as in uvicorn); the first, cheap validation of each
field, happens in the dataclasses of ``config`` when they are built. ``load_config`` does
what needs the machine: relative paths are made absolute (YAML paths relative to the file's
folder, the others to the working directory), ``run_dir`` is chosen, the default socket
addresses are put under it, and the files the config names (token file, trust keys,
archives) are checked to exist.

``run_dir`` when not set: ``/run/edgeserve`` if running as root or if that folder is
writable (systemd's ``RuntimeDirectory=`` made it); otherwise ``$XDG_RUNTIME_DIR/edgeserve``
when that variable is set, else ``<state_dir>/run``.

Overrides: a None value means "flag not given" and is skipped; a key ending in ``+``
(``"models+"``) appends to the list below it instead of replacing it.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
import socket
import types
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

import yaml

from edgeserve.config import (
    DEFAULT_INFERENCE_TCP,
    DEFAULT_RUN_DIR,
    DEFAULT_STATE_DIR,
    Config,
    default_device_id,
    problem_of,
)
from edgeserve.errors import ConfigError

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
    "EDGESERVE_FLEET_BROKER": "fleet.broker",
    "EDGESERVE_FLEET_DEVICE_ID": "fleet.device_id",
    "EDGESERVE_FLEET_GROUPS": "fleet.groups",
}
_LIST_ENV = {"EDGESERVE_LISTEN", "EDGESERVE_MANAGEMENT", "EDGESERVE_FLEET_GROUPS"}
_INT_ENV = {"EDGESERVE_MEMORY_BUDGET_MB"}
_NO_OVERRIDES: Mapping[str, Any] = types.MappingProxyType({})
_PATH_KEYS = (
    "state_dir",
    "run_dir",
    "management.token_file",
    "trust.keys[]",
    "models[].archive",
    "telemetry.db",
    "fleet.tls.ca_file",
    "fleet.tls.cert_file",
    "fleet.tls.key_file",
    "fleet.password_file",
    "fleet.root",
)
# Secrets: refused when others may read them.
_PRIVATE_FILES = ("management.token_file", "fleet.tls.key_file", "fleet.password_file")


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


def _check_files(config: Config) -> None:
    fleet = config.fleet
    files: list[tuple[str, Path | None]] = [("management.token_file", config.management.token_file)]
    files += [(f"trust.keys[{i}]", key) for i, key in enumerate(config.trust.keys)]
    files += [(f"models[{i}].archive", m.archive) for i, m in enumerate(config.models)]
    if fleet.broker is not None:  # without a broker the fleet files are not used
        files += [(f"fleet.tls.{k}", getattr(fleet.tls, k)) for k in ("ca_file", "cert_file")]
        files += [("fleet.tls.key_file", fleet.tls.key_file)]
        files += [("fleet.password_file", fleet.password_file)]
        files += [("fleet.root", fleet.root)]
    for key, path in files:
        if path is None:
            continue
        if not path.is_file():
            raise ConfigError(key, f"file not found: {path}")
        if key in _PRIVATE_FILES and path.stat().st_mode & 0o007:
            raise ConfigError(key, f"{path} is open to others; chmod o-rwx it")
    if fleet.broker is not None and fleet.device_id is None and default_device_id() is None:
        problem = f"the hostname {socket.gethostname()!r} is not a valid device id; set one"
        raise ConfigError("fleet.device_id", problem)
    db = config.telemetry_db()
    if config.telemetry.enabled and os.path.isdir(db):  # never raises (not even EACCES)
        raise ConfigError("telemetry.db", f"{db} is a directory; name a file")


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
    except RecursionError:  # the YAML parsers recurse once per level of nesting
        raise ConfigError(str(path), "invalid YAML: nested too deeply") from None
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
        raise ConfigError(_join(prefix, exc.key), problem_of(exc)) from None


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


def _join(prefix: str, key: str) -> str:
    if not prefix:
        return key
    return f"{prefix}{key}" if key.startswith("[") else f"{prefix}.{key}"


def _tname(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _with_source(exc: ConfigError, sources: Mapping[str, str]) -> ConfigError:
    """Add where the value at fault (or its nearest parent) was set."""
    key = exc.key
    while key:
        if key in sources:
            return ConfigError(exc.key, f"{problem_of(exc)} ({sources[key]})")
        parent = re.sub(r"(\.[^.\[]*|\[\d+\])$", "", key)
        key = "" if parent == key else parent
    return exc
