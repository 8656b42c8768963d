"""The device side of a fleet update: a persisted state machine over signed deployments.

States (``deployment.json``, written atomically at every step)::

    received -> verified -> downloading -> downloaded -> (deferred) -> installing
             -> warming -> probation -> committed
    any of them -> rejected (nothing went live) | rolled_back (the previous set is back)

``committed.json`` holds what a restart trusts: the committed serial (fsynced before the
commit is reported, so a replay stays refused after kill -9), the committed set, the
root version and the newest trusted time. ``previous`` in ``deployment.json`` is the set
to come back to: the committed set, or before any commit the set that was live when the
deployment began (models from ``--model`` and ``models:``).

A restart at each state (``resume``), and why that is safe:

- ``received``, ``verified``, ``downloading``, ``downloaded``, ``deferred``: resumed. The
  stored document is verified again (it may have expired meanwhile: then ``rejected``);
  the fetcher resumes partial downloads. Nothing was live yet.
- ``installing``: resumed; installing a version already in the store is a no-op.
- ``warming``: resumed; versions already loaded (live.json restored them) are kept, the
  rest are loaded and the defaults flipped.
- ``probation``: resumed with a fresh probation window over the restored new set.
- a rollback under way (``rollback`` set): finished (undo).
- ``installing``/``warming``/``probation`` count restarts (``boots``); the third restart
  rewrites live.json to ``previous`` *before* the daemon restores it, then reports
  ``rolled_back: crash loop`` (undo).
- ``committed``, ``rejected``, ``rolled_back``: final; the same serial is never retried.

Documents with a serial at or below the committed one or the last one acted on are
ignored (duplicates and replays of retained messages). Payloads are never logged.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import platform
import secrets
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from edgeserve.archive.format import fsync_dir
from edgeserve.config import FleetConfig, parse_activation_window
from edgeserve.errors import DocumentRefused, EdgeserveError
from edgeserve.fleet.canonical import parse_envelope
from edgeserve.fleet.documents import Deployment, DeviceFacts, ModelEntry, Root, parse_time
from edgeserve.fleet.fetcher import Artifact, Fetcher
from edgeserve.fleet.verifier import advance_trusted_time, verify_deployment
from edgeserve.lifecycle import Lifecycle
from edgeserve.store.model_store import LiveEntry
from edgeserve.telemetry.recorders import LATENCY_BOUNDS_S, OK, Recorders, quantile
from edgeserve.types import BatchingSettings

log = logging.getLogger("edgeserve.fleet")

FINAL = ("committed", "rejected", "rolled_back")
COUNTED = ("installing", "warming", "probation")  # the candidate may be live: count boots
MAX_BOOTS = 3
STAGING = "staging"  # <state_dir>/fleet/staging: the fetcher's dir
NOT_ERRORS = {OK, "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT"}
_TICK_S = 1.0


class Deployer:
    """Follows the highest-serial signed deployment for this device; see the module doc."""

    def __init__(
        self,
        *,
        fleet: FleetConfig,
        root: Root,
        device_id: str,
        state_dir: Path,
        lifecycle: Lifecycle,
        recorders: Recorders,
        fetcher: Fetcher,
        write_live_state: Callable[[Sequence[LiveEntry]], None],
        accelerator: str = "none",
        on_change: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._fleet = fleet
        self._root = root
        self._device_id = device_id
        self._dir = Path(state_dir) / "fleet"
        self._state_dir = Path(state_dir)
        self._lifecycle = lifecycle
        self._recorders = recorders
        self._fetcher = fetcher
        self._write_live_state = write_live_state
        self._accelerator = accelerator
        self.on_change = on_change
        """Called after every change of the reported state (the reporter's ``changed``)."""
        self._clock = clock
        self._committed: dict[str, Any] = {"serial": 0, "models": None, "trusted_time": None}
        self._record: dict[str, Any] | None = None
        self._pending: bytes | None = None
        self._seen: set[str] = set()
        self._wake = asyncio.Event()
        self._progress = (0, 0)

    # -- before the daemon restores live.json ----------------------------------------------

    def prepare_boot(self) -> None:
        """Read the persisted state; count a boot of a candidate; on the third, put the
        previous set into live.json so the restore brings that back (crash-loop guard)."""
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        self._committed.update(_read(self._dir / "committed.json") or {})
        self._record = _read(self._dir / "deployment.json")
        record = self._record
        if record is None or record.get("state") in FINAL:
            return
        if record.get("state") in COUNTED and not record.get("rollback"):
            record["boots"] = int(record.get("boots", 0)) + 1
            if record["boots"] >= MAX_BOOTS:
                log.error(
                    "fleet: deployment %s: %d starts without finishing probation; "
                    "coming back on the previous set",
                    record.get("serial"),
                    MAX_BOOTS,
                )
                record["rollback"] = "crash loop"
                self._write_live_state(_entries(record["previous"]))
            self._persist()

    @property
    def owns_live_set(self) -> bool:
        """True once a deployment committed or while a candidate may be live: then the
        persisted set, not the configured models (``--model``, ``models:``), is live."""
        record = self._record or {}
        in_flight = record.get("state") in COUNTED or bool(record.get("rollback"))
        return self._committed.get("models") is not None or in_flight

    # -- what the reporter shows -----------------------------------------------------------

    def report(self) -> dict[str, Any]:
        record = self._record or {}
        shas = {(m["name"], m["version"]): m.get("sha256") for m in self._known_models()}
        deployment = None
        if record:
            total = int(record.get("bytes_total") or 0)
            done = total if _is_past_download(record) else 0
            if record.get("state") == "downloading":
                done = self._progress[0]
            deployment = {
                "serial": record.get("serial"),
                "state": record.get("state"),
                "reason": record.get("reason"),
                "bytes_done": done,
                "bytes_total": total,
            }
        return {
            "committed_serial": self._committed.get("serial", 0),
            "root_version": self._root.version,
            "live": [
                {
                    "name": e.name,
                    "version": e.version,
                    "sha256": shas.get((e.name, e.version)),
                    "default": e.default,
                }
                for e in self._lifecycle.live_entries()
            ],
            "deployment": deployment,
        }

    def _known_models(self) -> list[dict[str, Any]]:
        record = self._record or {}
        return list(self._committed.get("models") or []) + list(record.get("models") or [])

    # -- incoming documents ------------------------------------------------------------------

    def offer(self, topic: str, payload: bytes, retained: bool) -> None:
        """A desired document arrived (link handler; never blocks, never raises)."""
        digest = hashlib.sha256(payload).hexdigest()
        if digest in self._seen or not payload:
            return
        self._seen.add(digest)
        serial = _peek_serial(payload)
        if serial is not None and serial <= self._floor():
            log.info(
                "fleet: ignoring deployment %s on %s: not above %d", serial, topic, self._floor()
            )
            return
        current = _peek_serial(self._pending) if self._pending else None
        if self._pending is None or (serial or 0) > (current or 0):
            self._pending = payload
            self._wake.set()

    def _floor(self) -> int:
        record = self._record or {}
        floor = int(self._committed.get("serial", 0))
        if record.get("verified"):
            floor = max(floor, int(record.get("serial") or 0))
        return floor

    async def run(self) -> None:
        """Resume what a restart interrupted, then act on documents as they come."""
        await self._resume()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending is not None:
                data, self._pending = self._pending, None
                await self._handle(data)

    # -- the steps ---------------------------------------------------------------------------

    async def _handle(self, data: bytes) -> None:
        serial = _peek_serial(data)
        if serial is not None and serial <= self._floor():
            return
        committed = self._committed.get("models")
        previous = committed if committed is not None else _dump(self._lifecycle.live_entries())
        self._record = {
            "serial": serial,
            "state": "received",
            "reason": None,
            "document": base64.b64encode(data).decode("ascii"),
            "previous": previous,
            "boots": 0,
            "rollback": None,
        }
        self._persist()
        await self._advance()

    async def _resume(self) -> None:
        record = self._record
        if record is None or record.get("state") in FINAL:
            return
        log.info("fleet: resuming deployment %s at %s", record.get("serial"), record["state"])
        await self._advance()

    async def _advance(self) -> None:
        """Drive the current record from its state to a final one; every failure ends in
        ``rejected`` (nothing of it went live) or ``rolled_back``."""
        record = self._record
        assert record is not None  # noqa: S101 - the callers set it
        try:
            if record.get("rollback"):
                await self._roll_back(record["rollback"])
                return
            deployment = self._verify(base64.b64decode(record["document"]))
            await self._fetch(deployment)
            await self._wait_for_window(deployment)
            await self._install(deployment)
            await self._warm(deployment)
            await self._probation(deployment)
            await self._commit(deployment)
        except _Refused as refusal:
            if record.get("state") in COUNTED:
                await self._roll_back(refusal.reason)
            else:
                self._finish("rejected", refusal.reason)
        except DocumentRefused as exc:
            log.warning("fleet: deployment %s refused: %s", record.get("serial"), exc.detail)
            self._finish("rejected", exc.reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - any bug here must end in a known state
            log.error(
                "fleet: deployment %s failed at %s: %s: %s",
                record.get("serial"),
                record.get("state"),
                type(exc).__name__,
                exc,
            )
            if record.get("state") in COUNTED:
                await self._roll_back(f"internal: {type(exc).__name__}")
            else:
                self._finish("rejected", f"internal: {type(exc).__name__}")

    def _verify(self, data: bytes) -> Deployment:
        record = self._record
        assert record is not None  # noqa: S101
        if record["state"] in COUNTED:  # verified before; its set may be live: no re-check
            return Deployment.from_signed(parse_envelope(data).signed)
        now = datetime.fromtimestamp(self._clock(), UTC)
        stored = self._committed.get("trusted_time")
        trusted = advance_trusted_time(parse_time(stored) if stored else None, now)
        self._committed["trusted_time"] = trusted.isoformat().replace("+00:00", "Z")
        _write(self._dir / "committed.json", self._committed)
        deployment = verify_deployment(
            data,
            root=self._root,
            committed_serial=int(self._committed.get("serial", 0)),
            trusted_time=trusted,
            device_id=self._device_id,
            groups=self._fleet.groups,
            facts=self._facts(),
            max_length=self._fleet.max_artifact_bytes,
        )
        if record["state"] == "received":
            record.update(
                verified=True,
                models=[_model(m) for m in deployment.models],
                bytes_total=sum(m.length for m in deployment.models),
            )
            self._step("verified")
        return deployment

    async def _fetch(self, deployment: Deployment) -> None:
        if self._state() not in ("verified", "downloading"):
            return
        self._step("downloading")
        done = 0
        total = sum(m.length for m in deployment.models)
        for entry in deployment.models:
            artifact = Artifact(entry.name, entry.version, entry.sha256, entry.length, entry.url)

            def progress(now: int, _total: int, base: int = done) -> None:
                self._progress = (base + now, total)
                self.on_change()

            try:
                await self._fetcher.fetch(artifact, self._fleet.topic_prefix, progress=progress)
            except EdgeserveError as exc:
                log.warning("fleet: deployment %s: %s", deployment.serial, exc)
                raise _Refused("fetch") from None
            done += entry.length
        self._progress = (0, 0)
        self._step("downloaded")

    async def _wait_for_window(self, deployment: Deployment) -> None:
        if self._state() not in ("downloaded", "deferred"):
            return
        window = deployment.activation_window or parse_activation_window(
            self._fleet.activation_window, "fleet.activation_window"
        )
        while window is not None and not _inside(window, self._clock()):
            if self._state() != "deferred":
                self._step("deferred")
            await asyncio.sleep(30.0)
        self._step("installing")

    async def _install(self, deployment: Deployment) -> None:
        if self._state() != "installing":
            return
        for entry in deployment.models:
            path = self._fetcher_path(entry)
            try:
                installed = await self._lifecycle.install(path)
            except EdgeserveError as exc:
                log.warning("fleet: deployment %s: %s", deployment.serial, exc)
                raise _Refused("install") from None
            if (installed.name, installed.version) != (entry.name, entry.version):
                raise _Refused("mix_and_match")
        self._step("warming")

    async def _warm(self, deployment: Deployment) -> None:
        if self._state() != "warming":
            return
        live = {(e.name, e.version) for e in self._lifecycle.live_entries()}
        for entry in deployment.models:
            if (entry.name, entry.version) in live:
                continue
            try:
                await self._lifecycle.load(
                    entry.name,
                    entry.version,
                    BatchingSettings.from_dict(dict(entry.batching)),
                    source="fleet",
                )
            except EdgeserveError as exc:
                log.warning(
                    "fleet: deployment %s: %s/%s did not load: %s",
                    deployment.serial,
                    entry.name,
                    entry.version,
                    exc,
                )
                raise _Refused("warmup") from None
        record = self._record
        assert record is not None  # noqa: S101
        record["baseline_p99_s"] = self._baseline_p99(record["previous"])
        for entry in deployment.models:
            if entry.default:
                await self._lifecycle.set_default(entry.name, entry.version, source="fleet")
        self._step("probation")

    async def _probation(self, deployment: Deployment) -> None:
        if self._state() != "probation":
            return
        record = self._record
        assert record is not None  # noqa: S101
        asked = deployment.probation_s
        seconds = float(self._fleet.probation_s if asked is None else asked)
        old = {(m["name"], m["version"]) for m in record["previous"]}
        new = [(m.name, m.version) for m in deployment.models if (m.name, m.version) not in old]
        deadline = time.monotonic() + seconds
        while True:
            breach = self._breach(new, record.get("baseline_p99_s"))
            if breach is not None:
                log.warning(
                    "fleet: deployment %s breached probation: %s", deployment.serial, breach
                )
                raise _Refused(breach)
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(_TICK_S, max(0.0, deadline - time.monotonic())))

    def _breach(self, new: list[tuple[str, str]], baseline: float | None) -> str | None:
        limits = self._fleet.probation
        for name, version in new:
            snap = self._recorders.for_model(name, version).snapshot()
            codes: Mapping[str, int] = snap["requests"]
            total = sum(codes.values())
            errors = sum(n for code, n in codes.items() if code not in NOT_ERRORS)
            if total >= limits.min_requests and errors / total > limits.max_error_rate:
                return f"error_rate {name}/{version} {errors}/{total}"
            counts = snap["latency_s"]["total"]["counts"]
            p99 = quantile(LATENCY_BOUNDS_S, counts, 0.99)
            if (
                p99 is not None
                and baseline
                and sum(counts) >= limits.min_requests
                and p99 > limits.max_p99_ratio * baseline
                and p99 * 1000 > limits.p99_floor_ms
            ):
                return f"p99 {name}/{version} {p99 * 1000:.1f} ms"
        return None

    def _baseline_p99(self, previous: list[dict[str, Any]]) -> float | None:
        worst = None
        for m in previous:
            if m.get("default"):
                p99 = self._recorders.for_model(m["name"], m["version"]).snapshot()["window"][
                    "p99_s"
                ]
                if p99 is not None:
                    worst = p99 if worst is None else max(worst, p99)
        return worst

    async def _commit(self, deployment: Deployment) -> None:
        wanted = {(m.name, m.version) for m in deployment.models}
        for entry in self._lifecycle.live_entries():
            if (entry.name, entry.version) not in wanted:
                await self._lifecycle.unload(entry.name, entry.version, source="fleet")
        shas = {(m.name, m.version): m.sha256 for m in deployment.models}
        models = _dump(self._lifecycle.live_entries())
        for m in models:
            m["sha256"] = shas.get((m["name"], m["version"]))
        self._committed.update(
            serial=deployment.serial, models=models, root_version=self._root.version
        )
        await asyncio.to_thread(_write, self._dir / "committed.json", self._committed)
        self._finish("committed", None)
        log.info("fleet: deployment %s committed", deployment.serial)

    async def _roll_back(self, reason: str) -> None:
        """Bring back ``previous`` exactly; idempotent (a restart finishes it)."""
        record = self._record
        assert record is not None  # noqa: S101
        record["rollback"] = reason
        self._persist()
        previous = _entries(record["previous"])
        live = {(e.name, e.version) for e in self._lifecycle.live_entries()}
        for entry in previous:
            if (entry.name, entry.version) not in live:
                await self._lifecycle.load(
                    entry.name,
                    entry.version,
                    entry.settings,
                    device=entry.device,
                    make_default=entry.default,
                    source="fleet",
                )
            elif entry.default:
                await self._lifecycle.set_default(entry.name, entry.version, source="fleet")
        keep = {(e.name, e.version) for e in previous}
        for entry in self._lifecycle.live_entries():
            if (entry.name, entry.version) not in keep:
                await self._lifecycle.unload(entry.name, entry.version, source="fleet")
        log.warning("fleet: deployment %s rolled back: %s", record.get("serial"), reason)
        self._finish("rolled_back", reason)

    # -- helpers -----------------------------------------------------------------------------

    def _fetcher_path(self, entry: ModelEntry) -> Path:
        return self._dir / STAGING / f"{entry.sha256}.esar"

    def _facts(self) -> DeviceFacts:
        disk = shutil.disk_usage(self._state_dir).free // (1 << 20)
        memory = psutil.virtual_memory().available // (1 << 20)
        return DeviceFacts(platform.machine(), int(disk), int(memory), self._accelerator)

    def _state(self) -> str:
        return str((self._record or {}).get("state"))

    def _step(self, state: str) -> None:
        record = self._record
        assert record is not None  # noqa: S101
        record["state"] = state
        self._persist()

    def _finish(self, state: str, reason: str | None) -> None:
        record = self._record
        assert record is not None  # noqa: S101
        record.update(state=state, reason=reason, rollback=None, boots=0)
        self._persist()
        for m in record.get("models") or []:
            (self._dir / STAGING / f"{m['sha256']}.esar").unlink(missing_ok=True)

    def _persist(self) -> None:
        _write(self._dir / "deployment.json", self._record or {})
        self.on_change()


class _Refused(Exception):
    """A step refused the candidate; ``reason`` goes into the reported state."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _is_past_download(record: Mapping[str, Any]) -> bool:
    before = ("received", "verified", "downloading")
    return bool(record.get("verified")) and record.get("state") not in before


def _inside(window: tuple[int, int], now: float) -> bool:
    local = time.localtime(now)
    minute = local.tm_hour * 60 + local.tm_min
    start, end = window
    return start <= minute < end if start < end else minute >= start or minute < end


def _peek_serial(data: bytes | None) -> int | None:
    """The serial a document claims, unverified (only to order and de-duplicate)."""
    try:
        serial = json.loads(data or b"")["signed"]["serial"]
    except (ValueError, KeyError, TypeError):
        return None
    return serial if isinstance(serial, int) and not isinstance(serial, bool) else None


def _model(entry: ModelEntry) -> dict[str, Any]:
    return {"name": entry.name, "version": entry.version, "sha256": entry.sha256}


def _dump(entries: Sequence[LiveEntry]) -> list[dict[str, Any]]:
    return [
        {
            "name": e.name,
            "version": e.version,
            "default": e.default,
            "settings": e.settings.to_dict(),
            "device": e.device,
        }
        for e in entries
    ]


def _entries(raw: Sequence[Mapping[str, Any]]) -> list[LiveEntry]:
    return [
        LiveEntry(
            str(m["name"]),
            str(m["version"]),
            bool(m["default"]),
            BatchingSettings.from_dict(dict(m.get("settings") or {})),
            m.get("device"),
        )
        for m in raw
    ]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("fleet: %s unreadable (%s); ignoring it", path, type(exc).__name__)
        return None
    return data if isinstance(data, dict) else None


def _write(path: Path, data: Mapping[str, Any]) -> None:
    """Replace ``path`` atomically: temporary file, fsync, rename, fsync the directory."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    try:
        with open(tmp, "xb") as out:
            out.write(json.dumps(data, sort_keys=True).encode() + b"\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
