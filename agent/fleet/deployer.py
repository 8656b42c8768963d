"""The device side of a fleet update: a persisted state machine over signed deployments.

States (``deployment.json``, written atomically at every step)::

    received -> verified -> downloading -> downloaded -> (deferred) -> installing
             -> warming -> probation -> committed
    up to installing -> rejected (nothing went live: a refusal there is a rejection)
    warming, probation -> rolled_back (the previous set is back)

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
ignored (duplicates and replays of retained messages), except that one replacing the
device's *own* desired document is reported ``rejected: rollback`` (replay or rollback
of that topic) when no deployment is in flight. A newer serial arriving while a
deployment downloads or waits for its window supersedes it (``rejected: superseded``;
partial downloads are kept); once a set may be live, it finishes first. A document
refused for its signatures is looked at again when the trust root rotates
(``fleet/roots.py``). Payloads are never logged.

Crash tests stop the deployer at an exact step with ``EDGESERVE_FLEET_HOLD_AT=<state>``
(or ``rolling_back``) in the daemon's environment: once that state is persisted it waits
for good while the daemon serves on, and the test kills it (``_hold``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import os
import platform
import shutil
import time
from collections.abc import Callable, Coroutine, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from edgeserve.archive.format import read_manifest
from edgeserve.config import FleetConfig, parse_activation_window
from edgeserve.errors import DocumentRefused, EdgeserveError
from edgeserve.fleet.canonical import parse_envelope
from edgeserve.fleet.deploy_record import (
    entries_from_json,
    entries_to_json,
    inside_window,
    model_summary,
    peek_serial,
    reported_state,
)
from edgeserve.fleet.documents import (
    Deployment,
    DeviceFacts,
    ModelEntry,
    Root,
    format_time,
    parse_time,
)
from edgeserve.fleet.fetcher import Artifact, ArtifactRejected, Fetcher
from edgeserve.fleet.probation import baseline_p99, breach
from edgeserve.fleet.state_files import read_json as _read
from edgeserve.fleet.state_files import write_json as _write
from edgeserve.fleet.verifier import advance_trusted_time, verify_deployment
from edgeserve.lifecycle import Lifecycle
from edgeserve.store.model_store import LiveEntry
from edgeserve.telemetry.recorders import Recorders
from edgeserve.types import BatchingSettings

log = logging.getLogger("edgeserve.fleet")

FINAL = ("committed", "rejected", "rolled_back")
COUNTED = ("installing", "warming", "probation")  # the candidate may be live: count boots
MAY_BE_LIVE = ("warming", "probation")  # a refusal here rolls back; earlier, it rejects
MAX_BOOTS = 3
HOLD_ENV = "EDGESERVE_FLEET_HOLD_AT"
PROGRESS_EVERY_S = 1.0  # download progress is reported at most this often
SIGNATURE_REASONS = ("unknown_key", "threshold", "bad_signature")
STAGING = "staging"  # <state_dir>/fleet/staging: the fetcher's dir
_TICK_S = 1.0


class Deployer:
    """Follows the highest-serial signed deployment for this device; see the module doc."""

    def __init__(
        self,
        *,
        fleet: FleetConfig,
        root: Callable[[], Root],
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
        """The current trust root (``RootKeeper.current``: rotations change it)."""
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
        self._stale: bytes | None = None
        self._own_topic = fleet.topic(device_id, "desired")
        self._wake = asyncio.Event()
        self._newer = asyncio.Event()  # a document arrived while one is in flight
        self._hold_at = os.environ.get(HOLD_ENV)
        self._progress = (0, 0)
        self._progress_reported = 0.0

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
                self._write_live_state(entries_from_json(record["previous"]))
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
        """The deployer's part of the reported state (and of ``edgeserve status``)."""
        return reported_state(
            self._record or {},
            self._committed,
            self._lifecycle.live_entries(),
            downloaded=self._progress[0],
            root_version=self._root().version,
        )

    # -- incoming documents ------------------------------------------------------------------

    def offer(self, topic: str, payload: bytes, retained: bool) -> None:
        """A desired document arrived (link handler; never blocks, never raises)."""
        digest = hashlib.sha256(payload).hexdigest()
        if digest in self._seen or not payload:
            return
        self._seen.add(digest)
        serial = peek_serial(payload)
        if serial is not None and serial <= self._floor():
            log.info(
                "fleet: ignoring deployment %s on %s: not above %d", serial, topic, self._floor()
            )
            if topic == self._own_topic and digest != self._record_digest():
                self._stale = payload  # the device's own desired state went back: say so
                self._wake.set()
            return
        current = peek_serial(self._pending) if self._pending else None
        if self._pending is None or (serial or 0) > (current or 0):
            self._pending = payload
            self._wake.set()
            self._newer.set()

    def _record_digest(self) -> str | None:
        document = (self._record or {}).get("document")
        return hashlib.sha256(base64.b64decode(document)).hexdigest() if document else None

    def root_changed(self) -> None:
        """The trust root rotated: a document refused for its signatures gets another look
        (it may be signed by keys that only the new root knows)."""
        record = self._record or {}
        if record.get("state") == "rejected" and record.get("reason") in SIGNATURE_REASONS:
            data = base64.b64decode(record["document"])
            self._seen.discard(hashlib.sha256(data).hexdigest())
            self.offer(self._own_topic, data, retained=True)
        self.on_change()

    def _floor(self) -> int:
        record = self._record or {}
        floor = int(self._committed.get("serial", 0))
        if record.get("verified"):
            floor = max(floor, int(record.get("serial") or 0))
        return floor

    async def run(self) -> None:
        """Resume what a restart interrupted, then act on documents as they come."""
        self.on_change()  # the restore is done: report the live set it brought back
        await self._resume()
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending is not None:
                data, self._pending = self._pending, None
                await self._handle(data)
            if self._stale is not None:
                data, self._stale = self._stale, None
                self._refuse_stale(data)

    def _refuse_stale(self, data: bytes) -> None:
        """A document at or below the committed serial replaced the device's own desired
        state (replay or rollback): report it refused, unless a deployment is in flight."""
        if (self._record or {}).get("state") not in (None, *FINAL):
            return
        reason = "rollback"
        try:
            self._verify_now(data)
        except DocumentRefused as exc:
            reason = exc.reason
        self._record = {
            "serial": peek_serial(data),
            "state": "rejected",
            "reason": reason,
            "document": base64.b64encode(data).decode("ascii"),
        }
        log.warning("fleet: deployment %s refused: %s", self._record["serial"], reason)
        self._persist()

    # -- the steps ---------------------------------------------------------------------------

    async def _handle(self, data: bytes) -> None:
        serial = peek_serial(data)
        if serial is not None and serial <= self._floor():
            return
        committed = self._committed.get("models")
        previous = (
            committed if committed is not None else entries_to_json(self._lifecycle.live_entries())
        )
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
            await self._hold()
            deployment = self._verify(base64.b64decode(record["document"]))
            await self._hold()
            await self._unless_superseded(self._fetch(deployment))
            await self._hold()
            await self._unless_superseded(self._wait_for_window(deployment))
            for step in (self._install, self._warm, self._probation, self._commit):
                await self._hold()
                await step(deployment)
            await self._hold()
        except _Refused as refusal:
            if record.get("state") in MAY_BE_LIVE:
                await self._roll_back(refusal.reason)
            else:
                log.warning("fleet: deployment %s rejected: %s", record.get("serial"), refusal)
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
            if record.get("state") in MAY_BE_LIVE:
                await self._roll_back(f"internal: {type(exc).__name__}")
            else:
                self._finish("rejected", f"internal: {type(exc).__name__}")

    def trusted_time(self) -> datetime:
        """The newest trustworthy time seen (the clock, never earlier than before), kept in
        committed.json so a clock reset after a restart does not go back either."""
        now = datetime.fromtimestamp(int(self._clock()), UTC)
        try:
            stored: datetime | None = parse_time(self._committed.get("trusted_time"))
        except DocumentRefused:  # none yet
            stored = None
        trusted = advance_trusted_time(stored, now)
        if trusted != stored:
            self._committed["trusted_time"] = format_time(trusted)
            _write(self._dir / "committed.json", self._committed)
        return trusted

    def _verify_now(self, data: bytes) -> Deployment:
        return verify_deployment(
            data,
            root=self._root(),
            committed_serial=int(self._committed.get("serial", 0)),
            trusted_time=self.trusted_time(),
            device_id=self._device_id,
            groups=self._fleet.groups,
            facts=self._facts(),
            max_length=self._fleet.max_artifact_bytes,
        )

    def _verify(self, data: bytes) -> Deployment:
        record = self._record
        assert record is not None  # noqa: S101
        if record["state"] in COUNTED:  # verified before; its set may be live: no re-check
            return Deployment.from_signed(parse_envelope(data).signed)
        deployment = self._verify_now(data)
        if record["state"] == "received":
            record.update(
                verified=True,
                models=[model_summary(m) for m in deployment.models],
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
                if time.monotonic() - self._progress_reported >= PROGRESS_EVERY_S:
                    self._progress_reported = time.monotonic()
                    self.on_change()  # a report per chunk would cost serving CPU for nothing

            try:
                await self._fetcher.fetch(artifact, self._fleet.topic_prefix, progress=progress)
            except ArtifactRejected as exc:  # the source sent something else: say what
                log.warning("fleet: deployment %s: %s", deployment.serial, exc)
                raise _Refused(exc.reason) from None
            except EdgeserveError as exc:
                log.warning("fleet: deployment %s: %s", deployment.serial, exc)
                raise _Refused("fetch") from None
            done += entry.length
            await self._hold()
        self._progress = (0, 0)
        self._step("downloaded")

    async def _wait_for_window(self, deployment: Deployment) -> None:
        if self._state() not in ("downloaded", "deferred"):
            return
        window = deployment.activation_window or parse_activation_window(
            self._fleet.activation_window, "fleet.activation_window"
        )
        while window is not None and not inside_window(window, self._clock()):
            if self._state() != "deferred":
                self._step("deferred")
            # Look again at the next local minute (the window's resolution), at most 30 s on.
            await asyncio.sleep(min(30.0, 60.05 - time.localtime(self._clock()).tm_sec))
        self._step("installing")

    async def _unless_superseded(self, work: Coroutine[Any, Any, None]) -> None:
        """Run a step that put nothing live (fetch, wait for the window); a newer serial
        arriving meanwhile cancels it (partial downloads are kept for a later document
        naming the same artifact) and rejects this deployment as ``superseded``."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                self._newer.clear()
                if self._superseded():
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    raise _Refused("superseded")
                newer = asyncio.ensure_future(self._newer.wait())
                await asyncio.wait({task, newer}, return_when=asyncio.FIRST_COMPLETED)
                newer.cancel()
        except asyncio.CancelledError:
            task.cancel()
            raise
        task.result()

    def _superseded(self) -> bool:
        pending = peek_serial(self._pending) if self._pending is not None else None
        return pending is not None and pending > int((self._record or {}).get("serial") or 0)

    async def _hold(self) -> None:
        """Crash tests only: with ``EDGESERVE_FLEET_HOLD_AT=<state>`` in the environment the
        deployer stops for good once that state is persisted (serving goes on), so a test
        can kill -9 the daemon at exactly that step. Unset in production: a no-op."""
        if self._hold_at is not None and self._hold_at == self._hold_state():
            log.warning("fleet: holding at %s (%s is set)", self._hold_at, HOLD_ENV)
            await asyncio.Event().wait()

    def _hold_state(self) -> str:
        record = self._record or {}
        return "rolling_back" if record.get("rollback") else self._state()

    async def _install(self, deployment: Deployment) -> None:
        if self._state() != "installing":
            return
        for entry in deployment.models:  # every artifact is what the document names...
            path = self._fetcher_path(entry)
            try:
                named = await asyncio.to_thread(read_manifest, path, trust=None)
            except EdgeserveError as exc:
                log.warning("fleet: deployment %s: %s", deployment.serial, exc)
                raise _Refused("install") from None
            if (named.name, named.version) != (entry.name, entry.version):
                log.warning(
                    "fleet: deployment %s: %s is %s %s, not %s %s",
                    deployment.serial,
                    entry.sha256[:12],
                    named.name,
                    named.version,
                    entry.name,
                    entry.version,
                )
                raise _Refused("mix_and_match")
        for entry in deployment.models:  # ...before any of them enters the store
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
        record["baseline_p99_s"] = baseline_p99(self._recorders, record["previous"])
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
            why = breach(self._recorders, self._fleet.probation, new, record.get("baseline_p99_s"))
            if why is not None:
                log.warning("fleet: deployment %s breached probation: %s", deployment.serial, why)
                raise _Refused(why)
            if time.monotonic() >= deadline:
                return
            await asyncio.sleep(min(_TICK_S, max(0.0, deadline - time.monotonic())))

    async def _commit(self, deployment: Deployment) -> None:
        wanted = {(m.name, m.version) for m in deployment.models}
        for entry in self._lifecycle.live_entries():
            if (entry.name, entry.version) not in wanted:
                await self._lifecycle.unload(entry.name, entry.version, source="fleet")
        shas = {(m.name, m.version): m.sha256 for m in deployment.models}
        models = entries_to_json(self._lifecycle.live_entries())
        for m in models:
            m["sha256"] = shas.get((m["name"], m["version"]))
        self._committed.update(
            serial=deployment.serial, models=models, root_version=self._root().version
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
        await self._hold()
        previous = entries_from_json(record["previous"])
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
