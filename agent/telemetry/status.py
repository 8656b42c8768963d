"""The status document of ``edgeserve status``: one builder, two renderers, one verdict.

``build_status`` is the only function that shapes the document (a plain, JSON-able dict).
Its inputs come from one of two places:

* the running daemon: ``LiveStatus.document()`` reads the registry, the lifecycle's
  failed restores (state FAILED), the recorders and the system sampler, and the
  ``RecentErrors`` ring; the management API's GetStatus returns that document;
* the state files, when the daemon is down: ``offline_models`` turns the persisted live
  set into the same model entries, and the daemon is reported down.

Two top-level objects describe the telemetry buffer and the fleet link, from either
source: ``telemetry`` (``telemetry_section``: backlog rows and bytes, the oldest unsent
row's age, drops by class, the last upload, write failures; the daemon passes the stats
of its last tick, the offline path opens the file read-only with ``buffer.read_stats``)
and ``fleet`` (``fleet_section``: device id, broker, connected and since when, the last
link error; never connected when the daemon is down). Neither makes the daemon degraded:
offline is the normal state of a device.

Figures that a source cannot give (recorders not wired, no GPU, daemon down) are None,
never guessed. ``render_table`` and ``render_json`` print the document;
``exit_code`` turns its verdict into 0 healthy, 1 degraded, 3 daemon unreachable.
"""

from __future__ import annotations

import collections
import datetime
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from edgeserve.telemetry.rows import CLASSES, BufferStats
from edgeserve.types import BatchingSettings

if TYPE_CHECKING:  # status must stay importable without torch (the CLI's offline path)
    from edgeserve.lifecycle import Lifecycle
    from edgeserve.serving.registry import ModelRegistry

SCHEMA = 1
HEALTHY, DEGRADED, DOWN = "healthy", "degraded", "down"
EXIT_HEALTHY, EXIT_DEGRADED, EXIT_UNREACHABLE = 0, 1, 3
ERROR_WINDOW_S = 600.0
"""Errors logged this recently make the daemon degraded."""
_SERVER_FAULTS = ("INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNKNOWN")


@dataclass(frozen=True)
class ModelFacts:
    """One model version as a source sees it; None where it cannot tell."""

    name: str
    version: str
    state: str
    default: bool
    settings: Mapping[str, Any] = field(default_factory=dict)
    instances: int | None = None
    device: str | None = None
    loaded_at: float | None = None
    load_seconds: float | None = None
    in_flight: int | None = None


@dataclass(frozen=True)
class DaemonFacts:
    up: bool
    ready: bool = False
    pid: int | None = None
    version: str | None = None
    started_at: float | None = None
    address: str | None = None


class RecentErrors(logging.Handler):
    """A small ring of recent WARNING+ log events, for ``status`` (never payloads: the
    log guard redacts them before any handler formats a record)."""

    def __init__(self, capacity: int = 32, level: int = logging.WARNING) -> None:
        super().__init__(level)
        self._ring: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)
        self._ring_lock = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not break logging
            message = str(record.msg)
        with self._ring_lock:
            self._ring.append(
                {
                    "time": record.created,
                    "level": record.levelname,
                    "logger": record.name,
                    "message": message[:500],
                }
            )

    def entries(self) -> list[dict[str, Any]]:
        with self._ring_lock:
            return list(self._ring)


def build_status(
    *,
    daemon: DaemonFacts,
    models: Sequence[ModelFacts],
    recorders: Mapping[str, Any] | None = None,
    system: Mapping[str, Any] | None = None,
    recent_errors: Sequence[Mapping[str, Any]] = (),
    notes: Sequence[str] = (),
    telemetry: Mapping[str, Any] | None = None,
    fleet: Mapping[str, Any] | None = None,
    now: float | None = None,
) -> dict[str, Any]:
    """The status document. ``recorders`` is ``Recorders.snapshot()``, ``system`` a sampler
    sample; ``notes`` are problems the source already knows (restore failures...);
    ``telemetry`` and ``fleet`` come from ``telemetry_section`` and ``fleet_section``."""
    now = time.time() if now is None else now
    figures = {(m.get("model"), m.get("version")): m for m in (recorders or {}).get("models", [])}
    entries = [_model_entry(m, figures.get((m.name, m.version))) for m in models]
    recent = [dict(e) for e in recent_errors]
    problems = _problems(daemon, entries, recent, notes, now)
    health = DOWN if not daemon.up else (DEGRADED if problems else HEALTHY)
    uptime = now - daemon.started_at if daemon.up and daemon.started_at else None
    return {
        "schema": SCHEMA,
        "generated_at": now,
        "health": health,
        "problems": problems,
        "daemon": {
            "up": daemon.up,
            "ready": daemon.ready,
            "pid": daemon.pid,
            "version": daemon.version,
            "started_at": daemon.started_at,
            "uptime_s": uptime,
            "address": daemon.address,
        },
        "models": entries,
        "system": dict(system) if system is not None else None,
        "recent_errors": recent,
        "telemetry": dict(telemetry) if telemetry is not None else None,
        "fleet": dict(fleet) if fleet is not None else None,
    }


def telemetry_section(
    stats: BufferStats | None, *, enabled: bool, db: str | os.PathLike[str], now: float
) -> dict[str, Any]:
    """The ``telemetry`` object; figures are None when the buffer could not be read."""
    oldest = stats.oldest_unsent_time if stats is not None else None
    return {
        "enabled": enabled,
        "db": os.fspath(db),
        "backlog_rows": stats.backlog_rows if stats is not None else None,
        "backlog_bytes": stats.backlog_bytes if stats is not None else None,
        "oldest_unsent_time": oldest,
        "oldest_unsent_age_s": _age(oldest, now),
        "dropped": dict(stats.dropped) if stats is not None else dict.fromkeys(CLASSES, None),
        "last_upload": stats.last_upload if stats is not None else None,
        "write_failures": stats.write_failures if stats is not None else None,
    }


def fleet_section(
    *,
    device_id: str | None,
    broker: str | None,
    connected: bool = False,
    since: float | None = None,
    last_error: str | None = None,
    committed_serial: int | None = None,
    root_version: int | None = None,
    deployment: Mapping[str, Any] | None = None,
    network_bytes: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """The ``fleet`` object; ``since`` is when ``connected`` last changed (epoch s).
    ``committed_serial``, ``root_version`` and ``deployment`` (serial, state, reason,
    bytes_done, bytes_total: the reported state's) come from the deployer, None when the
    device follows no deployments; ``network_bytes`` counts bytes per purpose."""
    return {
        "device_id": device_id,
        "broker": broker,
        "connected": connected,
        "since": since,
        "last_error": last_error,
        "committed_serial": committed_serial,
        "root_version": root_version,
        "deployment": dict(deployment) if deployment is not None else None,
        "network_bytes": dict(network_bytes) if network_bytes is not None else None,
    }


def _age(iso: str | None, now: float) -> float | None:
    if iso is None:
        return None
    try:
        moment = datetime.datetime.fromisoformat(iso)
    except ValueError:
        return None
    return round(max(0.0, now - moment.timestamp()), 3)


def _problems(
    daemon: DaemonFacts,
    entries: Sequence[Mapping[str, Any]],
    recent: Sequence[Mapping[str, Any]],
    notes: Sequence[str],
    now: float,
) -> list[str]:
    """What makes a running daemon degraded; empty when healthy."""
    problems = list(notes)
    if daemon.up and not daemon.ready:
        problems.append("daemon is not ready")
    problems += [
        f"model {e['name']} version {e['version']} is {e['state']}"
        for e in entries
        if daemon.up and e["state"] != "READY"
    ]
    problems += [
        f"model {e['name']} version {e['version']}: {n} {code} in the last minute"
        for e in entries
        for code, n in sorted((e["errors"] or {}).items())
        if code in _SERVER_FAULTS
    ]
    errors = [e for e in recent if e["level"] in ("ERROR", "CRITICAL")]
    if any(now - e["time"] < ERROR_WINDOW_S for e in errors):
        problems.append(f"{len(errors)} error(s) logged recently (see recent_errors)")
    return problems


def _model_entry(model: ModelFacts, figures: Mapping[str, Any] | None) -> dict[str, Any]:
    window = (figures or {}).get("window") or {}
    return {
        "name": model.name,
        "version": model.version,
        "state": model.state,
        "default": model.default,
        "instances": model.instances,
        "device": model.device,
        "settings": dict(model.settings),
        "loaded_at": model.loaded_at,
        "load_seconds": model.load_seconds,
        "in_flight": model.in_flight,
        "queue_depth": (figures or {}).get("queue_depth"),
        "requests_per_s": window.get("requests_per_s"),
        "p50_ms": _ms(window.get("p50_s")),
        "p99_ms": _ms(window.get("p99_s")),
        "errors": window.get("errors") if figures else None,
        "requests_total": (figures or {}).get("requests"),
        "last_load_at": (figures or {}).get("last_load_at") or model.loaded_at,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


def exit_code(document: Mapping[str, Any]) -> int:
    health = document.get("health")
    if health == HEALTHY:
        return EXIT_HEALTHY
    return EXIT_UNREACHABLE if health == DOWN else EXIT_DEGRADED


# -- sources --------------------------------------------------------------------------------


class _Snapshot(Protocol):
    def snapshot(self) -> dict[str, Any]: ...


class _Sampler(Protocol):
    def sample(self) -> dict[str, Any]: ...


class LiveStatus:
    """Collects the running daemon's facts and builds the document from them."""

    def __init__(
        self,
        *,
        registry: ModelRegistry,
        lifecycle: Lifecycle,
        version: str,
        started_at: float,
        is_ready: Callable[[], bool],
        recorders: _Snapshot | None = None,
        sampler: _Sampler | None = None,
        errors: RecentErrors | None = None,
        notes: Callable[[], Sequence[str]] | None = None,
        telemetry: Callable[[], Mapping[str, Any]] | None = None,
        fleet: Callable[[], Mapping[str, Any]] | None = None,
    ) -> None:
        self._registry = registry
        self._lifecycle = lifecycle
        self._version = version
        self._started_at = started_at
        self._is_ready = is_ready
        self._recorders = recorders
        self._sampler = sampler
        self._errors = errors
        self._notes = notes
        self._telemetry = telemetry
        self._fleet = fleet

    def models(self) -> list[ModelFacts]:
        """The live versions (settings as resolved at load), then those that failed to
        restore (FAILED, settings as asked for)."""
        facts = [
            ModelFacts(
                name=live.name,
                version=live.version,
                state=live.state.value,
                default=self._registry.default_version(live.name) == live.version,
                settings={**live.settings.to_dict(), "device": live.device},
                instances=live.settings.instances,
                device=live.device,
                loaded_at=live.loaded_at,
                load_seconds=live.load_seconds,
                in_flight=live.in_flight,
            )
            for live in self._registry.all()
        ]
        return facts + [_entry_facts(e, "FAILED") for e in self._lifecycle.failed()]

    def document(self) -> dict[str, Any]:
        return build_status(
            daemon=DaemonFacts(
                up=True,
                ready=self._is_ready(),
                pid=os.getpid(),
                version=self._version,
                started_at=self._started_at,
            ),
            models=self.models(),
            recorders=self._recorders.snapshot() if self._recorders is not None else None,
            system=self._sampler.sample() if self._sampler is not None else None,
            recent_errors=self._errors.entries() if self._errors is not None else (),
            notes=list(self._notes()) if self._notes is not None else (),
            telemetry=self._telemetry() if self._telemetry is not None else None,
            fleet=self._fleet() if self._fleet is not None else None,
        )


class _PersistedEntry(Protocol):
    """What ``store.LiveEntry`` carries."""

    @property
    def name(self) -> str: ...
    @property
    def version(self) -> str: ...
    @property
    def default(self) -> bool: ...
    @property
    def settings(self) -> BatchingSettings: ...
    @property
    def device(self) -> str | None: ...


def offline_models(entries: Iterable[_PersistedEntry]) -> list[ModelFacts]:
    """Model entries from the persisted live set, for a daemon that is down."""
    return [_entry_facts(e, "NOT_RUNNING") for e in entries]


def _entry_facts(entry: _PersistedEntry, state: str) -> ModelFacts:
    """A persisted entry (what was asked for) as a model that is not running."""
    device = {"device": entry.device} if entry.device else {}
    return ModelFacts(
        name=entry.name,
        version=entry.version,
        state=state,
        default=entry.default,
        settings={**entry.settings.to_dict(), **device},
        instances=entry.settings.instances,
        device=entry.device,
    )


# -- renderers ------------------------------------------------------------------------------


def render_json(document: Mapping[str, Any]) -> str:
    return json.dumps(document, indent=2, sort_keys=True, default=str)


def render_table(document: Mapping[str, Any]) -> str:
    lines = [_headline(document)]
    lines += _model_table(document.get("models") or [])
    lines += _system_lines(document.get("system"))
    lines += _telemetry_lines(document.get("telemetry"), document.get("fleet"))
    problems = document.get("problems") or []
    if problems:
        lines.append("problems:")
        lines += [f"  - {p}" for p in problems]
    errors = document.get("recent_errors") or []
    if errors:
        lines.append("recent errors:")
        for e in errors[-10:]:
            lines.append(f"  {_clock(e['time'])} {e['level']:<8} {e['logger']}: {e['message']}")
    return "\n".join(lines)


def _headline(doc: Mapping[str, Any]) -> str:
    d = doc.get("daemon") or {}
    health = str(doc.get("health", "?")).upper()
    if not d.get("up"):
        where = f" at {d['address']}" if d.get("address") else ""
        return f"edgeserve: daemon is DOWN (not reachable{where}); live set from the state files"
    ready = "ready" if d.get("ready") else "NOT READY"
    return (
        f"edgeserve {d.get('version')}: daemon up, {ready}, uptime {_duration(d.get('uptime_s'))}"
        f" (pid {d.get('pid')})  health: {health}"
    )


_COLUMNS = tuple(
    "MODEL VERSION DEFAULT STATE INST DEVICE QUEUE REQ/S P50_MS P99_MS ERRORS LOADED".split()
)


def _model_table(models: Sequence[Mapping[str, Any]]) -> list[str]:
    if not models:
        return ["no models live"]
    rows = [_COLUMNS] + [
        (
            m["name"],
            m["version"],
            "*" if m["default"] else "",
            m["state"],
            _cell(m.get("instances")),
            _cell(m.get("device")),
            _cell(m.get("queue_depth")),
            _cell(m.get("requests_per_s"), "{:.1f}"),
            _cell(m.get("p50_ms"), "{:.2f}"),
            _cell(m.get("p99_ms"), "{:.2f}"),
            _errors_cell(m.get("errors")),
            _clock(m.get("last_load_at")),
        )
        for m in models
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(_COLUMNS))]
    return [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    ]


def _system_lines(system: Mapping[str, Any] | None) -> list[str]:
    if not system:
        return ["system: -"]
    proc, sys_ = system.get("process") or {}, system.get("system") or {}
    disk = system.get("disk") or {}
    parts = [
        f"cpu {_cell(sys_.get('cpu_percent'), '{:.0f}%')}"
        f" (daemon {_cell(proc.get('cpu_percent'), '{:.0f}%')})",
        f"rss {_mib(proc.get('rss_bytes'))}",
        f"state dir free {_mib(disk.get('free_bytes'))}",
    ]
    temps = system.get("temperatures") or []
    if temps:
        hottest = max(temps, key=lambda t: t.get("celsius") or 0)
        parts.append(f"hottest {hottest['label']} {hottest['celsius']:.0f}°C")
    for gpu in system.get("gpus") or []:
        parts.append(f"gpu{gpu['index']} {_mib(gpu.get('memory_allocated_bytes'))} allocated")
    return ["system: " + ", ".join(parts)]


def _telemetry_lines(
    telemetry: Mapping[str, Any] | None, fleet: Mapping[str, Any] | None
) -> list[str]:
    lines = []
    if telemetry is not None and not telemetry.get("enabled"):
        lines.append("telemetry: off (telemetry.enabled: false)")
    elif telemetry is not None and telemetry.get("backlog_rows") is None:
        lines.append(f"telemetry: no readable buffer at {telemetry.get('db')}")
    elif telemetry is not None:
        dropped = {c: n for c, n in (telemetry.get("dropped") or {}).items() if n}
        drops = ", ".join(f"{c} {n}" for c, n in dropped.items()) or "none"
        age = telemetry.get("oldest_unsent_age_s")
        oldest = f"oldest unsent {_duration(age)} ago" if age is not None else "nothing unsent"
        lines.append(
            f"telemetry: backlog {telemetry['backlog_rows']} rows"
            f" ({_kib(telemetry.get('backlog_bytes'))}), {oldest};"
            f" last upload {telemetry.get('last_upload') or 'never'}; dropped: {drops};"
            f" write failures {telemetry.get('write_failures')}"
        )
    if fleet is not None:
        lines.append(_link_line(fleet))
        lines += _deployment_lines(fleet)
    return lines


def _deployment_lines(fleet: Mapping[str, Any]) -> list[str]:
    """The fleet update lines: committed serial, the deployment's stage, bytes by purpose."""
    lines = []
    if fleet.get("committed_serial") is not None:
        d = fleet.get("deployment") or {}
        stage = "none yet"
        if d:
            stage = f"serial {d.get('serial')} {d.get('state')}"
            if d.get("reason"):
                stage += f" ({d['reason']})"
            if d.get("state") == "downloading" and d.get("bytes_total"):
                stage += f", {_kib(d.get('bytes_done'))} of {_kib(d.get('bytes_total'))}"
        lines.append(
            f"updates: committed serial {fleet['committed_serial']}, root v"
            f"{fleet.get('root_version')}; deployment {stage}"
        )
    counts = fleet.get("network_bytes")
    if counts:
        lines.append("network: " + ", ".join(f"{k} {_kib(v)}" for k, v in sorted(counts.items())))
    return lines


def _link_line(fleet: Mapping[str, Any]) -> str:
    device = fleet.get("device_id") or "-"
    if not fleet.get("broker"):
        return f"mqtt: no broker configured (device {device})"
    since = fleet.get("since")
    when = f" since {_clock(since)}" if since is not None else ""
    if fleet.get("connected"):
        return f"mqtt: connected to {fleet['broker']} as {device}{when}"
    error = f" ({fleet['last_error']})" if fleet.get("last_error") else ""
    return f"mqtt: NOT connected to {fleet['broker']} as {device}{when}{error}"


def _kib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n} B" if n < 1024 else _mib(n) if n >= 10 * 2**20 else f"{n / 1024:.0f} KiB"


def _cell(value: Any, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def _errors_cell(errors: Mapping[str, int] | None) -> str:
    if errors is None:
        return "-"
    return ",".join(f"{code}:{n}" for code, n in sorted(errors.items())) or "0"


def _mib(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f} GiB" if n >= 10 * 2**30 else f"{n / 2**20:.0f} MiB"


def _clock(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
