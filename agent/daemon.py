"""The composition root: builds the object graph from ``Config`` and owns start and stop.

Start order: directories -> store -> registry -> lifecycle -> restore what was live ->
configured archives -> gRPC server -> READY=1. Stop order (SIGTERM/SIGINT): STOPPING=1 ->
the server stops accepting and drains in-flight RPCs within ``server.grace_period_s`` ->
lifecycle drains and unloads every batcher -> exit 0. Signal handlers only set flags; the
tick loop acts on them (and on SIGHUP's reload flag) and pets the systemd watchdog.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from edgeserve import __version__
from edgeserve.api.management import ManagementServer
from edgeserve.api.server import InferenceServer
from edgeserve.archive.signing import TrustStore
from edgeserve.config import Config, ModelConfig, parse_listen_address
from edgeserve.errors import ConfigError, EdgeserveError, NotFound
from edgeserve.lifecycle import Lifecycle
from edgeserve.logs import PayloadGuard
from edgeserve.sdnotify import Notifier
from edgeserve.serving.registry import ModelRegistry, version_sort_key
from edgeserve.serving.runtime import RuntimeOptions
from edgeserve.store.model_store import ModelStore
from edgeserve.telemetry.prometheus import MetricsServer, start_metrics_server
from edgeserve.telemetry.recorders import Recorders
from edgeserve.telemetry.sampler import SystemSampler
from edgeserve.telemetry.status import LiveStatus, RecentErrors

log = logging.getLogger("edgeserve.daemon")

TICK_SECONDS = 1.0


@dataclass
class _Flags:
    should_exit: bool = False
    force_exit: bool = False
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
        self.lifecycle = Lifecycle(
            store=self.store,
            registry=self.registry,
            runtime_options=RuntimeOptions(device=config.runtime.device, fp16=config.runtime.fp16),
            memory_budget_mb=config.runtime.memory_budget_mb,
            drain_timeout_s=config.server.grace_period_s,
            recorders=self.recorders,
        )
        self.server = InferenceServer(
            registry=self.registry,
            listen=list(config.server.listen),
            max_message_bytes=config.server.max_message_bytes,
            allow_non_loopback=config.server.allow_non_loopback,
            server_version=__version__,
            is_ready=self.is_ready,
        )
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
        )
        # -- end management ------------------------------------------------------------------
        self.metrics: MetricsServer | None = None
        self._flags = _Flags()
        self._ready = False

    def is_ready(self) -> bool:
        return self._ready and self.registry.all_ready()

    async def run(self) -> int:
        """Serve until SIGTERM/SIGINT; return the process exit code."""
        restore = self._install_signal_handlers()
        try:
            await self._startup()
            await self._tick_loop()
        finally:
            await self._shutdown()
            restore()
        return 0

    # -- startup --------------------------------------------------------------------------

    async def _startup(self) -> None:
        for path in (Path(self.config.state_dir), Path(self.config.run_dir)):
            path.mkdir(parents=True, exist_ok=True, mode=0o750)
        logging.getLogger("edgeserve").addHandler(self.recent_errors)  # management/status
        await asyncio.to_thread(self.store.collect_garbage)
        # Management first, so a technician sees "starting" rather than "down" while
        # models load; changes it asks for queue behind the restore on lifecycle's lock.
        for address in await self.management.start():
            log.info("serving management on %s", address)
        stopping = lambda: self._flags.should_exit  # noqa: E731
        problems = await self.lifecycle.restore(self.store.read_live_state(), stopping)
        for model in self.config.models:
            if stopping():
                return
            await self._load_configured(model)
        if stopping():
            return
        await self.server.start()
        self._ready = True
        await self.server.refresh_health()
        self._start_metrics()
        for address in self.server.addresses:
            log.info("serving inference on %s", address)
        self.notifier.ready()
        self.notifier.status(self._status_line(problems))

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
                name, version, settings, device=model.device, make_default=model.default
            )
        elif model.default:
            await self.lifecycle.set_default(name, version)

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
        await self.management.stop(grace)  # management API first: no changes while draining
        log.info("stopping: draining in-flight requests (up to %.0fs)", grace)
        await self.server.stop(grace)
        await self.lifecycle.close()
        if self.metrics is not None:
            self.metrics.close()
        log.info("stopped")
        logging.getLogger("edgeserve").removeHandler(self.recent_errors)  # management/status

    def _install_signal_handlers(self) -> Callable[[], None]:
        loop = asyncio.get_running_loop()

        def on_exit() -> None:
            if self._flags.should_exit:
                self._flags.force_exit = True
                log.warning("second signal: exiting without waiting for the drain")
                raise SystemExit(1)
            self._flags.should_exit = True
            self._flags.wake.set()

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
