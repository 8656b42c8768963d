"""The composition root: builds the object graph from ``Config`` and owns start and stop.

Start order: directories -> telemetry buffer (opened off the loop; a ``restart`` event)
-> fleet link (connects in the background) and the uploader -> store -> registry ->
lifecycle -> restore what was live -> configured archives -> gRPC server -> READY=1. Stop
order (SIGTERM/SIGINT): STOPPING=1 -> the server stops accepting and drains in-flight RPCs
within ``server.grace_period_s`` -> lifecycle drains and unloads every batcher -> the
telemetry schedule and the uploader stop -> ``offline`` is published and the link closes
-> a final collect goes into the buffer, which closes -> exit 0. Signal handlers only set
flags; the tick loop acts on them (and on SIGHUP's reload flag) and pets the systemd
watchdog.

Stopping is bounded whatever a model does: a signal during startup cancels it (a load
under way is abandoned, ``serving.bounded``); the drain steps share one deadline,
``grace_period_s``; a watchdog thread ends the process ``SHUTDOWN_MARGIN_S`` after that
(logs flushed, ``os._exit``); a second signal exits at once the same way. Threads left
running model code are never joined: when there are any, the process ends with
``os._exit`` once the shutdown is done, since the interpreter would wait for them.

A daemon that can serve starts, degraded rather than not at all: a ``live.json`` that
cannot be read is moved aside (``live.json.corrupt-<time>``) and the configured models
load; a read-only state dir serves what is persisted and configured (nothing can be
installed or persisted; changes answer FAILED_PRECONDITION). Both are problems in
status (DEGRADED). Temporary files of a live-set write cut short are removed at start.

Telemetry and the fleet link never stand in the way of serving: the buffer is opened and
written in worker threads, a buffer that cannot be opened leaves telemetry off for this
run, a broker that is down only leaves the rows in the buffer, and a link that cannot be
built (bad TLS files) is logged and left out. Without ``fleet.broker`` the buffer still
fills, within its byte budget, and ``edgeserve status`` shows the backlog.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgeserve import __version__
from edgeserve.api.management import ManagementServer
from edgeserve.api.server import InferenceServer, ServerBounds, raise_fd_limit
from edgeserve.archive.signing import TrustStore
from edgeserve.config import (
    Config,
    ModelConfig,
    default_device_id,
    parse_broker_url,
    parse_listen_address,
)
from edgeserve.errors import ConfigError, EdgeserveError, NotFound, StoreError
from edgeserve.fleet.deployer import STAGING, Deployer
from edgeserve.fleet.documents import parse_root
from edgeserve.fleet.fetcher import Fetcher
from edgeserve.fleet.link import FleetLink, LinkTls, Will
from edgeserve.fleet.reporter import Reporter
from edgeserve.fleet.roots import RootKeeper, root_topics
from edgeserve.lifecycle import Lifecycle
from edgeserve.logs import PayloadGuard
from edgeserve.sdnotify import Notifier
from edgeserve.serving.registry import ModelRegistry, version_sort_key
from edgeserve.serving.runtime import RuntimeOptions
from edgeserve.store.model_store import LiveEntry, LiveStateCorrupt, ModelStore
from edgeserve.telemetry.events import EventLog
from edgeserve.telemetry.pipeline import TelemetryPipeline
from edgeserve.telemetry.prometheus import MetricsServer, start_metrics_server
from edgeserve.telemetry.recorders import Recorders
from edgeserve.telemetry.rollup import Rollup
from edgeserve.telemetry.sampler import SystemSampler
from edgeserve.telemetry.status import LiveStatus, RecentErrors, fleet_section, telemetry_section
from edgeserve.telemetry.uploader import Uploader
from edgeserve.types import NetworkCounters

log = logging.getLogger("edgeserve.daemon")

TICK_SECONDS = 1.0
STARTUP_LOAD_TIMEOUT_S = 120.0  # EXTEND_TIMEOUT_USEC before each startup load (a model)
OFFLINE_PUBLISH_S = 2.0  # at shutdown, how long `offline` may take to be acknowledged
SHUTDOWN_MARGIN_S = 5.0  # after grace_period_s: telemetry close, offline, then os._exit


@dataclass
class _Flags:
    should_exit: bool = False
    reload: bool = False
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class Daemon:
    """One edgeserve process: serve until told to stop, then drain and exit."""

    def __init__(
        self,
        config: Config,
        *,
        notifier: Notifier | None = None,
        reload_config: Callable[[], Config] | None = None,
    ) -> None:
        self.config = config
        self._reload_config = reload_config
        self._reloading: asyncio.Task[None] | None = None
        self.notifier = notifier or Notifier.from_env()
        self.started_at = time.time()
        state_dir = Path(config.state_dir)
        trust = TrustStore.from_paths([Path(p) for p in config.trust.keys])
        self.store = ModelStore(
            state_dir / "models",
            trust if config.trust.require_signed else None,
            live_state_path=state_dir / "live.json",
        )
        self.registry = ModelRegistry()
        self.recorders = Recorders()
        # Events from where they happen: lifecycle (deployment, warmup_failure) and the
        # inference servicer (error) get the log's ``record``; telemetry off: nobody does.
        self.events = EventLog()
        sink = self.events.record if config.telemetry.enabled else None
        self.lifecycle = Lifecycle(
            store=self.store,
            registry=self.registry,
            runtime_options=RuntimeOptions(device=config.runtime.device, fp16=config.runtime.fp16),
            memory_budget_mb=config.runtime.memory_budget_mb,
            drain_timeout_s=config.server.grace_period_s,
            load_timeout_s=config.runtime.load_timeout_s,
            recorders=self.recorders,
            events=sink,
        )
        self.server = InferenceServer(
            registry=self.registry,
            listen=list(config.server.listen),
            max_message_bytes=config.server.max_message_bytes,
            allow_non_loopback=config.server.allow_non_loopback,
            server_version=__version__,
            is_ready=self.is_ready,
            events=sink,
            bounds=ServerBounds(
                max_connections=config.server.max_connections,
                connection_idle_s=config.server.connection_idle_s,
                connection_max_age_s=config.server.connection_max_age_s,
                max_concurrent_rpcs=config.server.max_concurrent_rpcs,
                inflight_bytes_factor=config.server.inflight_bytes_factor,
                stream_max_pending_bytes=config.server.stream_max_pending_bytes,
            ),
        )
        # -- telemetry and the fleet link (built here, started in _start_telemetry) ---------
        self.boot_id = uuid.uuid4().hex
        self.device_id = config.fleet.device_id or default_device_id()
        self.telemetry: TelemetryPipeline | None = None
        if config.telemetry.enabled:
            rollup = Rollup(self.recorders, SystemSampler(state_dir), self.events, time.time)
            self.telemetry = TelemetryPipeline(
                db=config.telemetry_db(),
                max_bytes=config.telemetry.max_bytes,
                rollup=rollup,
                interval_s=config.telemetry.interval_s,
                sample_every_s=config.telemetry.sample_every_s,
            )
        self.link: FleetLink | None = None
        self.uploader: Uploader | None = None
        self.deployer: Deployer | None = None  # only with fleet.broker and fleet.root
        self.reporter: Reporter | None = None
        self.network = NetworkCounters()
        self._link_since: float | None = None
        self._link_error: str | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # -- management API and status (api/management.py, status.py) ---------------------
        self.recent_errors = RecentErrors()
        self.recent_errors.addFilter(PayloadGuard())
        self.status = LiveStatus(
            registry=self.registry,
            lifecycle=self.lifecycle,
            version=__version__,
            started_at=self.started_at,
            is_ready=self.is_ready,
            recorders=self.recorders,
            sampler=SystemSampler(state_dir),
            errors=self.recent_errors,
            telemetry=self._telemetry_facts,
            fleet=self._fleet_facts,
            notes=self._degraded_notes,
        )
        self.management = ManagementServer(
            lifecycle=self.lifecycle,
            registry=self.registry,
            status=self.status.document,
            listen=list(config.management.listen),
            archive_dir=config.management.archive_dir or state_dir / "incoming",
            state_dir=state_dir,
            allowed_group=config.management.allowed_group,
            token_file=config.management.token_file,
            socket_mode=config.management.socket_mode,
            max_connections=config.management.max_connections,
            idle_timeout_s=config.management.idle_timeout_s,
        )
        # -- end management ------------------------------------------------------------------
        self.metrics: MetricsServer | None = None
        self._flags = _Flags()
        self._ready = False
        self._start_problems: list[str] = []  # why it started degraded (status notes)
        self._startup_task: asyncio.Task[None] | None = None

    def is_ready(self) -> bool:
        return self._ready and self.registry.all_ready()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the process exit code."""
        restore = self._install_signal_handlers()
        try:
            # A task of its own, so that a signal can cut a startup load short.
            self._startup_task = asyncio.get_running_loop().create_task(self._startup())
            try:
                await self._startup_task
            except asyncio.CancelledError:
                if not self._flags.should_exit:
                    raise
                log.info("stopping during startup")
            await self._tick_loop()
        finally:
            await self._shutdown()
            restore()
        if self.lifecycle.abandoned():  # the interpreter would wait for those threads
            _exit_now(0, "exiting; threads still running model code are left behind")
        return 0

    # -- startup --------------------------------------------------------------------------

    async def _startup(self) -> None:
        raise_fd_limit()  # idle clients must not starve the daemon of descriptors
        for key in ("state_dir", "run_dir"):
            path = Path(getattr(self.config, key))
            try:
                path.mkdir(parents=True, exist_ok=True, mode=0o750)
            except OSError as exc:
                raise ConfigError(key, f"cannot create '{path}': {exc.strerror}") from None
        logging.getLogger("edgeserve").addHandler(self.recent_errors)  # management/status
        writable = await asyncio.to_thread(self._check_state_dir)
        await self._start_telemetry()
        if writable:
            await asyncio.to_thread(self.store.collect_garbage)
            await asyncio.to_thread(self.store.remove_live_leftovers)
        # Management first, so a technician sees "starting" rather than "down" while
        # models load; changes it asks for queue behind the restore on lifecycle's lock.
        for address in await self.management.start():
            log.info("serving management on %s", address)
        persisted = await asyncio.to_thread(self._read_live_state, writable)
        problems = await self.lifecycle.restore(persisted, self._next_load)
        configured = self.config.models
        if configured and self.deployer is not None and self.deployer.owns_live_set:
            log.info(
                "fleet: the deployed set is live; %d configured model(s) not loaded",
                len(configured),
            )
            configured = ()
        for model in configured:
            if self._next_load():
                return
            if writable:
                await self._load_configured(model)
                continue
            try:  # degraded: load what is already in the store, skip what is not
                await self._load_configured(model)
            except (EdgeserveError, OSError) as exc:
                what = model.archive or model.name
                log.error("configured model %s not loaded (state dir read-only): %s", what, exc)
        if self._flags.should_exit:
            return
        await self.server.start()
        self._ready = True
        await self.server.refresh_health()
        self._start_metrics()
        for address in self.server.addresses:
            log.info("serving inference on %s", address)
        self.notifier.ready()
        self.notifier.status(self._status_line(problems))
        if self.deployer is not None:  # after the restore: it may resume a deployment
            self._spawn(self.deployer.run(), "fleet deployer")

    def _check_state_dir(self) -> bool:
        """Whether the state dir can be written; a read-only one is a start problem."""
        probe = Path(self.config.state_dir) / f".write-probe-{secrets.token_hex(4)}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
            return True
        except OSError as exc:
            problem = f"state dir '{self.config.state_dir}' is read-only ({exc.strerror})"
            log.error(
                "%s: serving what is persisted and configured; no change can be saved", problem
            )
            self._start_problems.append(f"{problem}: no change can be saved")
            return False

    def _read_live_state(self, writable: bool) -> list[LiveEntry]:
        """The persisted live set; one that cannot be read is moved aside and the
        configured models start without it (a start problem, never a refusal to start)."""
        try:
            return self.store.read_live_state()
        except LiveStateCorrupt as exc:
            problem = exc.message
        except StoreError as exc:  # cannot be read at all (permissions, I/O error)
            log.error("%s; starting without it", exc.message)
            self._start_problems.append(f"{exc.message}; started without it")
            return []
        where = "left in place (state dir read-only)"
        if writable:
            try:
                where = f"moved aside to {self.store.quarantine_live_state()}"
            except StoreError as exc:
                where = f"left in place ({exc.message})"
        log.error("%s; %s; serving the configured models", problem, where)
        self._start_problems.append(f"{problem}; {where}; serving the configured models")
        return []

    def _degraded_notes(self) -> list[str]:
        """Problems status reports besides the models' own (the daemon is DEGRADED)."""
        notes = list(self._start_problems)
        stuck = self.lifecycle.abandoned()
        if stuck:
            which = ", ".join(f"{s.stage} of {s.model}/{s.version}" for s in stuck[:5])
            notes.append(
                f"{len(stuck)} thread(s) abandoned running model code past "
                f"runtime.load_timeout_s ({which}); their memory is not reclaimable "
                "until the daemon restarts"
            )
        return notes

    def _next_load(self) -> bool:
        """Between two startup loads: True when a signal asked to stop; else give the next
        load its own start timeout (``EXTEND_TIMEOUT_USEC``), so many models or a slow
        warm-up do not run into ``TimeoutStartSec``."""
        if self._flags.should_exit:
            return True
        self.notifier.extend_timeout(STARTUP_LOAD_TIMEOUT_S)
        return False

    async def _start_telemetry(self) -> None:
        """Buffer and schedule, then the link and the uploader; none of it can stop serving."""
        pipeline = self.telemetry
        if pipeline is not None and await pipeline.open() is not None:
            self.events.record(
                "restart", boot_id=self.boot_id, version=__version__, pid=os.getpid()
            )
            self._spawn(pipeline.run(), "telemetry schedule")
        fleet = self.config.fleet
        if fleet.broker is None:
            return
        self.link = await self._make_link()
        if self.link is None:
            return
        if pipeline is not None and pipeline.buffer is not None and self.device_id:
            self.uploader = Uploader(
                pipeline.buffer,
                self.link,
                topic=fleet.topic(self.device_id, "telemetry"),
                device_id=self.device_id,
                boot_id=self.boot_id,
                batch_bytes=self.config.telemetry.batch_bytes,
                bytes_per_s=self.config.telemetry.upload_bytes_per_s,
            )
            pipeline.on_interval = self.uploader.live_from
            self._spawn(self.uploader.run(), "telemetry upload")
        self._link_since = time.time()  # not connected since now
        await self.link.start()
        log.info("fleet: connecting to %s as %s", fleet.broker, self.device_id)
        if fleet.root is not None:
            await self._start_deployer(self.link)

    async def _start_deployer(self, link: FleetLink) -> None:
        """Deployer and reporter (``fleet.root`` set); before the restore, so that a crash
        loop's rollback rewrites live.json first. A root that cannot be read is logged
        and the device follows nothing."""
        fleet, device_id = self.config.fleet, self.device_id or ""
        state_dir = Path(self.config.state_dir)
        try:
            root = parse_root(await asyncio.to_thread(Path(fleet.root or "").read_bytes))
            fetcher = Fetcher(
                state_dir / "fleet" / STAGING,
                state_dir=state_dir,
                counters=self.network,
                max_bytes=fleet.max_artifact_bytes,
                link=link,
                http_ca_file=str(fleet.tls.ca_file) if fleet.tls.ca_file else None,
            )
        except (EdgeserveError, OSError) as exc:
            log.error("fleet: not following deployments: fleet.root %s: %s", fleet.root, exc)
            return
        accelerator = "cuda" if self.config.runtime.device.startswith("cuda") else "none"
        roots = RootKeeper(root, state_dir / "fleet", trusted_time=lambda: deployer.trusted_time())
        self.deployer = deployer = Deployer(
            fleet=fleet,
            root=lambda: roots.current,
            device_id=device_id,
            state_dir=state_dir,
            lifecycle=self.lifecycle,
            recorders=self.recorders,
            fetcher=fetcher,
            write_live_state=self.store.write_live_state,
            accelerator=accelerator,
        )
        self.reporter = Reporter(
            link=link,
            topic=fleet.topic(device_id, "reported"),
            device_id=device_id,
            agent_version=__version__,
            state=deployer.report,
            counters=self.network,
        )
        deployer.on_change = self.reporter.changed
        roots.on_change = deployer.root_changed
        await asyncio.to_thread(deployer.prepare_boot)
        await asyncio.to_thread(roots.load)
        self._spawn(self.reporter.run(), "fleet reporter")
        for topic in root_topics(fleet.topic_prefix):  # rotations before the documents
            await link.subscribe(topic, roots.offer)
        topics = [fleet.topic(device_id, "desired")]
        topics += [f"{fleet.topic_prefix}/groups/{g}/desired" for g in fleet.groups]
        for topic in topics:
            await link.subscribe(topic, deployer.offer)

    async def _make_link(self) -> FleetLink | None:
        """The link as ``fleet`` says, or None (logged) when it cannot be built."""
        fleet = self.config.fleet
        try:
            if not self.device_id:
                raise ConfigError("fleet.device_id", "the hostname is not a valid id; set one")
            scheme, host, port = parse_broker_url(fleet.broker or "", "fleet.broker")
            password = None
            if fleet.password_file is not None:
                text = await asyncio.to_thread(fleet.password_file.read_text, encoding="utf-8")
                password = text.strip()
            files = fleet.tls
            tls = None
            if scheme == "mqtts":
                paths = (files.ca_file, files.cert_file, files.key_file)
                tls = LinkTls(*(str(p) if p is not None else None for p in paths))
            return FleetLink(
                host=host,
                port=port,
                client_id=self.device_id,
                tls=tls,
                username=fleet.username,
                password=password,
                will=Will(fleet.topic(self.device_id, "online"), b"offline"),
                on_connection_change=self._on_link_change,
            )
        except (EdgeserveError, OSError) as exc:
            self._link_error = str(exc)
            log.error("fleet: no link to %s: %s", fleet.broker, exc)
            return None

    def _on_link_change(self, connected: bool, reason: str) -> None:
        self._link_since = time.time()
        self.events.record("link", connected=connected, reason=reason)
        if self.uploader is not None:
            self.uploader.wake()
        if connected:
            self._spawn(self._announce(b"online"), "presence")
            if self.reporter is not None:
                self.reporter.changed()

    async def _announce(self, presence: bytes) -> None:
        """``online`` / ``offline``, retained, on ``P/devices/<id>/online``."""
        if self.link is None or not self.device_id:
            return
        topic = self.config.fleet.topic(self.device_id, "online")
        try:
            await self.link.publish(topic, presence, qos=1, retain=True)
        except EdgeserveError as exc:
            log.info("fleet: presence %s not published: %s", presence.decode(), exc)

    def _spawn(self, work: Coroutine[Any, Any, None], what: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=f"edgeserve {what}")
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("%s ended: %s: %s", task.get_name(), type(exc).__name__, exc)

    def _telemetry_facts(self) -> dict[str, Any]:
        stats = self.telemetry.stats() if self.telemetry is not None else None
        enabled, db = self.config.telemetry.enabled, self.config.telemetry_db()
        return telemetry_section(stats, enabled=enabled, db=db, now=time.time())

    def _fleet_facts(self) -> dict[str, Any]:
        link = self.link
        connected = link is not None and link.connected
        error = self._link_error if link is None else None if connected else link.last_failure
        report = self.deployer.report() if self.deployer is not None else {}
        return fleet_section(
            device_id=self.device_id,
            broker=self.config.fleet.broker,
            connected=connected,
            since=self._link_since,
            last_error=error if self.config.fleet.broker else None,
            committed_serial=report.get("committed_serial"),
            root_version=report.get("root_version"),
            deployment=report.get("deployment"),
            network_bytes=self.network.snapshot() if self.link is not None else None,
        )

    def _start_metrics(self) -> None:
        listen = self.config.metrics.prometheus_listen
        if not listen:
            return
        address = parse_listen_address(listen, "metrics.prometheus_listen")
        if address[0] != "tcp":  # Config refuses a Unix address here; this narrows the type
            raise ConfigError(
                "metrics.prometheus_listen", f"must be a TCP host:port, got {listen!r}"
            )
        _, host, port = address
        self.metrics = start_metrics_server(
            host,
            port,
            self.recorders,
            Path(self.config.state_dir),
            allow_non_loopback=self.config.server.allow_non_loopback,
        )
        log.info("serving Prometheus metrics on %s:%d", self.metrics.host, self.metrics.port)

    async def _load_configured(self, model: ModelConfig) -> None:
        if model.archive is not None:
            installed = await self.lifecycle.install(Path(model.archive))
            name, version = installed.name, installed.version
        elif model.name:
            name, version = model.name, model.version or await self._newest_stored(model.name)
        else:  # config validation guarantees one of the two; keep mypy honest
            raise EdgeserveError("models[]: needs 'archive' or 'name'")
        settings = model.batching.over(self.config.batching)  # the archive's fills the rest
        if self.registry.find(name, version) is None:
            await self.lifecycle.load(
                name,
                version,
                settings,
                device=model.device,
                make_default=model.default,
                source="config",
            )
        elif model.default:
            await self.lifecycle.set_default(name, version, source="config")

    async def _newest_stored(self, name: str) -> str:
        """A configured model named without a version gets the newest one in the store."""
        stored = await asyncio.to_thread(self.store.list)
        versions = [m.version for m in stored if m.name == name]
        if not versions:
            raise NotFound(f"model '{name}' (config 'models'): no version in the store")
        return max(versions, key=version_sort_key)

    def _status_line(self, problems: list[str]) -> str:
        live = ", ".join(f"{m.name}/{m.version}" for m in self.registry.all()) or "no models"
        text = f"serving {live}"
        return text + (f"; {len(problems)} failed to restore" if problems else "")

    # -- running --------------------------------------------------------------------------

    async def _tick_loop(self) -> None:
        watchdog = self.notifier.watchdog_interval()
        tick = min(TICK_SECONDS, watchdog / 2) if watchdog else TICK_SECONDS
        while not self._flags.should_exit:
            try:
                await asyncio.wait_for(self._flags.wake.wait(), tick)
            except TimeoutError:
                pass
            self._flags.wake.clear()
            self.notifier.watchdog()
            if self._flags.reload and (self._reloading is None or self._reloading.done()):
                self._flags.reload = False
                # A task of its own: model loads take seconds and the watchdog must go on.
                self._reloading = asyncio.get_running_loop().create_task(self._reload())

    async def _reload(self) -> None:
        """SIGHUP: re-read the config file and load the models it gained.

        Only ``models`` is applied (addresses, trust and the rest need a restart), and
        only entries that are new: a model a technician unloaded stays unloaded.
        """
        self.notifier.reloading()
        try:
            if self._reload_config is None:
                log.warning("reload: no config file to re-read")
                return
            fresh = await asyncio.to_thread(self._reload_config)
            added = [m for m in fresh.models if m not in self.config.models]
            self.config = replace(self.config, models=fresh.models)
            for model in added:
                await self._load_configured(model)
            log.info("reload: %d new model entr%s", len(added), "y" if len(added) == 1 else "ies")
        except EdgeserveError as exc:
            log.error("reload failed: %s", exc)
        finally:
            self.notifier.ready()

    # -- shutdown -------------------------------------------------------------------------

    async def _shutdown(self) -> None:
        self._ready = False
        if self._reloading is not None and not self._reloading.done():
            self._reloading.cancel()
            await asyncio.gather(self._reloading, return_exceptions=True)
        self.notifier.stopping()
        grace = self.config.server.grace_period_s
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace

        def left() -> float:  # the drain steps share grace_period_s
            return max(0.0, deadline - loop.time())

        log.info("stopping: draining in-flight requests (up to %.0fs)", grace)
        # Both stop accepting at once (no change starts while draining), then drain side
        # by side: a slow management call must not eat the inference drain's time.
        await asyncio.gather(self.management.stop(left()), self.server.stop(left()))
        await self.lifecycle.close(left())
        await self._stop_telemetry()
        if self.metrics is not None:
            self.metrics.close()
        log.info("stopped")
        logging.getLogger("edgeserve").removeHandler(self.recent_errors)  # management/status

    async def _stop_telemetry(self) -> None:
        """Schedule and uploader, then ``offline`` and the link, then the final collect."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.link is not None:
            if self.link.connected:  # a clean stop sends no Will: say it ourselves
                try:
                    await asyncio.wait_for(self._announce(b"offline"), OFFLINE_PUBLISH_S)
                except TimeoutError:
                    log.info("fleet: offline not acknowledged within %.0f s", OFFLINE_PUBLISH_S)
            await self.link.close()
        if self.telemetry is not None:
            await self.telemetry.close()

    def _install_signal_handlers(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()

        def on_exit() -> None:
            if self._flags.should_exit:
                _exit_now(1, "second signal: exiting without waiting for the drain")
            self._flags.should_exit = True
            self._flags.wake.set()
            limit = self.config.server.grace_period_s + SHUTDOWN_MARGIN_S
            watchdog = threading.Timer(limit, _exit_now, (1, f"shutdown took over {limit:g} s"))
            watchdog.daemon = True
            watchdog.start()
            if self._startup_task is not None and not self._startup_task.done():
                self._startup_task.cancel()  # a load under way is abandoned, not awaited

        def on_hup() -> None:
            self._flags.reload = True
            self._flags.wake.set()

        handled = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_exit)
        loop.add_signal_handler(signal.SIGHUP, on_hup)

        def restore() -> None:
            for sig in handled:
                loop.remove_signal_handler(sig)

        return restore


def _exit_now(code: int, why: str) -> None:
    """End the process now, without joining threads (one may be stuck in model code):
    log why, flush every log handler and the standard streams, then ``os._exit``."""
    (log.warning if code == 0 else log.error)("%s", why)
    for handler in logging.getLogger().handlers + logging.getLogger("edgeserve").handlers:
        try:
            handler.flush()
        except Exception:  # noqa: S110 (exiting: a broken handler must not stop it)
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: S110
            pass
    os._exit(code)
