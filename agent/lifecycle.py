"""The one interface that changes what is live: load, unload, set default, scale, restore.

Every change runs under one lock and follows load-new, flip, drain-old:
a version is loaded, warmed and self-checked *beside* what is live, and only then added
to the registry; a failure on the way leaves the registry exactly as it was. Building
the serving stack itself is ``serving.build``. An unload takes the version out of the
index first (it is DRAINING: new requests go elsewhere or get NOT_FOUND), waits until
the requests it admitted have finished, then frees its memory (UNLOADED). A persisted
version that fails to restore is FAILED (``failed``) until it is loaded or unloaded.

Persist first, then change memory: each change computes the live set it will leave
(``_planned``), writes it atomically through the store, and only then touches the
registry; teardown of what it replaced comes last. A write that fails (state dir full:
``StoreFull``, read-only: ``StoreReadOnly``) leaves memory as it was (a fresh build is
closed again), so memory and ``live.json`` never disagree and a restart (also after
kill -9) comes back to the same set.

Model code run outside a request (load, thread probe, warm-up) has one time bound per
load, ``load_timeout_s`` (``serving.bounded``): past it the load fails with
``Expired.stage`` naming the stage, the lock is released, and the thread is abandoned
and counted (``abandoned()``, in status); a hung model cannot wedge every later change.

Each change is told to the fleet through ``events`` (an ``EventSink``, injected by the
daemon): ``deployment`` ``{action, model, version, source, ok}`` for every load
(``default`` too; ``error``: the error's type name when it failed), restore (action
``load``, source ``restore``), unload, default flip (``previous``) and scale; a failed
unload or flip changes nothing and is only the caller's error. A warm-up that fails is
also a ``warmup_failure`` ``{model, version, source, reason}`` (``reason`` never holds
the model's own error text or an output value). The unloads of a shutdown are no event:
the persisted set is kept, and the next start's ``restart`` and restores say the rest.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import psutil

from edgeserve.errors import Expired, ManagementError, NotFound, NotReady, WarmupFailed
from edgeserve.serving.batching import AdaptiveBatcher
from edgeserve.serving.bounded import AbandonedStage, AbandonedThreads, run_bounded
from edgeserve.serving.build import build
from edgeserve.serving.registry import LiveModel, ModelRegistry, ModelState, version_sort_key
from edgeserve.serving.runtime import LoadedModel, RuntimeOptions, load_model
from edgeserve.serving.warmup import WarmupCheckFailed
from edgeserve.store.model_store import InstalledModel, LiveEntry, ModelStore
from edgeserve.telemetry.recorders import Recorders
from edgeserve.types import BatchingSettings, DeploymentSource, EventSink

log = logging.getLogger("edgeserve.lifecycle")

_T = TypeVar("_T")

# A TorchScript module needs roughly its file size again while it loads (zip + tensors).
_LOAD_MEMORY_FACTOR = 2.0


@dataclass
class _Serving:
    """What lifecycle keeps per live version to tear it down again."""

    live: LiveModel
    loaded: LoadedModel
    batcher: AdaptiveBatcher
    settings: BatchingSettings
    """What was asked for (persisted as is); ``live.settings`` is what it resolved to."""
    device: str | None
    """The device asked for; None: the daemon's ``runtime.device``."""


class Lifecycle:
    """Loads, swaps and unloads model versions; the only writer of the registry."""

    def __init__(
        self,
        *,
        store: ModelStore,
        registry: ModelRegistry,
        runtime_options: RuntimeOptions,
        memory_budget_mb: int = 0,
        drain_timeout_s: float = 30.0,
        load_timeout_s: float = 120.0,
        recorders: Recorders | None = None,
        events: EventSink | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runtime_options = runtime_options
        self._memory_budget = memory_budget_mb * 1024 * 1024
        self._drain_timeout = drain_timeout_s
        self._load_timeout = load_timeout_s
        self._abandoned = AbandonedThreads()
        self._recorders = recorders or Recorders()
        self._events = events
        self._serving: dict[tuple[str, str], _Serving] = {}
        # Persisted entries that failed to restore: kept in the live set until unloaded.
        self._unrestored: dict[tuple[str, str], LiveEntry] = {}
        self._lock = asyncio.Lock()
        self._changes: set[asyncio.Task[Any]] = set()

    # -- queries --------------------------------------------------------------------------

    def entry(self, name: str, version: str) -> LiveEntry:
        """What was asked for a live version (settings, device), as persisted."""
        serving = self._serving.get((name, version))
        if serving is None:
            raise NotFound.model(name, version)
        return self._entry(serving)

    def failed(self) -> list[LiveEntry]:
        """Persisted versions that failed to restore (FAILED until loaded or unloaded)."""
        return list(self._unrestored.values())

    def abandoned(self) -> list[AbandonedStage]:
        """Threads left running model code past ``load_timeout_s`` (still running)."""
        return self._abandoned.list()

    def live_entries(self) -> list[LiveEntry]:
        """What is live (and what should be, but failed to restore), as persisted."""
        return self._planned()

    def _entry(self, serving: _Serving) -> LiveEntry:
        live = serving.live
        return LiveEntry(
            name=live.name,
            version=live.version,
            default=self._registry.default_version(live.name) == live.version,
            settings=serving.settings,
            device=serving.device,
        )

    def _planned(
        self,
        *,
        without: tuple[str, str] | None = None,
        adding: LiveEntry | None = None,
        default: tuple[str, str] | None = None,
    ) -> list[LiveEntry]:
        """The live set as it will be after a change, before memory changes: ``without``
        unloaded, ``adding`` loaded (or replacing the entry of its version), ``default``
        made the default; default versions move as ``ModelRegistry`` moves them."""
        rows = {key: self._entry(s) for key, s in self._serving.items()}
        defaults = {n: self._registry.default_version(n) for n in self._registry.names()}
        pending = dict(self._unrestored)
        if without is not None:
            name, version = without
            rows.pop(without, None)
            pending.pop(without, None)
            if defaults.get(name) == version:  # the newest remaining version takes over
                left = sorted((v for n, v in rows if n == name), key=version_sort_key)
                defaults[name] = left[-1] if left else None
        if adding is not None:
            key = (adding.name, adding.version)
            rows[key] = adding
            pending.pop(key, None)
            if defaults.get(adding.name) is None:
                defaults[adding.name] = adding.version
        if default is not None:
            defaults[default[0]] = default[1]
        return [
            replace(e, default=e.default and defaults.get(e.name) is None) for e in pending.values()
        ] + [replace(e, default=defaults.get(e.name) == e.version) for e in rows.values()]

    # -- changes --------------------------------------------------------------------------

    async def install(
        self, archive: Path, *, release: Callable[[], None] | None = None
    ) -> InstalledModel:
        """Verify an archive and add it to the store (nothing becomes live).

        ``release`` runs once the store is done with ``archive`` (management passes an
        open file descriptor's path and closes it there, not when its caller goes away).
        """

        async def change() -> InstalledModel:
            try:
                return await asyncio.to_thread(self._store.install, archive)
            finally:
                if release is not None:
                    release()

        return await self._change(change)

    async def load(
        self,
        name: str,
        version: str,
        settings: BatchingSettings | None = None,
        *,
        device: str | None = None,
        make_default: bool = False,
        source: DeploymentSource = "management",
    ) -> LiveModel:
        """Load a stored version beside what is live; flip the default when asked.

        ``settings``: the batching asked for (the archive's fills what is unset);
        ``device``: None runs it on the daemon's ``runtime.device``; ``source``: who
        asked (the ``deployment`` events say it).
        """

        async def change() -> LiveModel:
            asked = settings or BatchingSettings()
            previous = self._registry.default_version(name)
            try:
                if (name, version) in self._serving:
                    raise ManagementError(f"model '{name}' version '{version}' is already live")
                fresh = await self._build(name, version, asked, device, source)
                entry = LiveEntry(name, version, False, asked, device)
                planned = self._planned(
                    adding=entry, default=(name, version) if make_default else None
                )
                await self._persist_or_close(planned, fresh)
            except Exception as exc:
                self._deployed("load", name, version, source, exc)
                raise
            self._add(fresh, make_default=make_default)
            is_default = self._registry.default_version(name) == version
            self._deployed("load", name, version, source, default=is_default)
            if make_default and previous not in (None, version):  # a first version: no flip
                self._deployed("set_default", name, version, source, previous=previous)
            return fresh.live

        return await self._change(change)

    async def unload(
        self, name: str, version: str, *, source: DeploymentSource = "management"
    ) -> None:
        """Take a version out of service; its admitted requests finish first."""

        async def change() -> None:
            key = (name, version)
            if key not in self._unrestored and key not in self._serving:
                raise NotFound.model(name, version)
            # Persisted before the drain: a crash meanwhile must not revive it.
            await self._persist(self._planned(without=key))
            if self._unrestored.pop(key, None) is not None:
                self._deployed("unload", name, version, source)
                return
            serving = self._serving.pop(key)
            self._registry.remove(name, version)
            await self._teardown(serving, self._drain_timeout)
            self._recorders.forget(name, version)
            self._deployed("unload", name, version, source)

        await self._change(change)

    async def set_default(
        self, name: str, version: str, *, source: DeploymentSource = "management"
    ) -> None:
        async def change() -> None:
            previous = self._registry.default_version(name)
            live = self._registry.get(name, version)  # NotFound before anything is written
            if not live.ready:
                raise NotReady.model(name, version, live.state.value)
            await self._persist(self._planned(default=(name, version)))
            self._registry.set_default(name, version)
            self._deployed("set_default", name, version, source, previous=previous)

        await self._change(change)

    async def scale(
        self,
        name: str,
        version: str,
        changes: BatchingSettings,
        device: str | None = None,
        *,
        source: DeploymentSource = "management",
    ) -> BatchingSettings:
        """Apply new serving settings by loading a fresh instance set, then swapping.

        The fields set in ``changes`` (and ``device``, when given) replace what was asked
        for before. The version keeps serving throughout: the new batcher and workers are
        built and warmed first, the registry entry is replaced, and the old set drains.
        """

        async def change() -> BatchingSettings:
            serving = self._serving.get((name, version))
            if serving is None:
                raise NotFound.model(name, version)
            settings = changes.over(serving.settings)
            was_default = self._registry.default_version(name) == version
            wanted = device or serving.device
            try:
                fresh = await self._build(name, version, settings, wanted, source)
                entry = LiveEntry(name, version, was_default, settings, wanted)
                await self._persist_or_close(self._planned(adding=entry), fresh)
            except Exception as exc:
                self._deployed("scale", name, version, source, exc)
                raise
            self._deployed("scale", name, version, source, settings=settings.to_dict())
            self._registry.remove(name, version)
            self._add(fresh, make_default=was_default)
            await self._teardown(serving, self._drain_timeout)
            return settings

        return await self._change(change)

    async def _change(self, work: Callable[[], Awaitable[_T]]) -> _T:
        """Run one change under the lock to its end, even if the caller goes away.

        A management RPC is cancelled when its deadline passes or its client quits; a
        change cut off halfway would leave the registry, the instance threads and
        live.json disagreeing. So the change is a task of its own, kept here (``close``
        awaits it), and the caller only waits for it through a shield.
        """

        async def locked() -> _T:
            async with self._lock:
                return await work()

        task = asyncio.get_running_loop().create_task(locked())
        self._changes.add(task)
        task.add_done_callback(self._changes.discard)
        return await asyncio.shield(task)

    async def restore(
        self, entries: Sequence[LiveEntry], should_stop: Callable[[], bool] = lambda: False
    ) -> list[str]:
        """Bring back a persisted live set; returns one message per entry that failed.

        Restoring never rewrites the live set: a failure or a kill -9 halfway through
        startup must not forget the entries not yet restored. An entry that fails stays
        persisted (and is retried at the next start) until it is unloaded explicitly.
        """
        problems = []
        async with self._lock:
            for entry in entries:
                if should_stop():  # SIGTERM during startup: stop between models
                    break
                name, version = entry.name, entry.version
                try:
                    await self._load_locked(name, version, entry.settings, entry.device, "restore")
                    if entry.default:
                        self._registry.set_default(name, version)
                    is_default = self._registry.default_version(name) == version
                    self._deployed("load", name, version, "restore", default=is_default)
                except Exception as exc:  # one bad entry must not keep the others down
                    log.error("could not restore %s/%s: %s", entry.name, entry.version, exc)
                    self._deployed("load", name, version, "restore", exc)
                    problems.append(f"{entry.name}/{entry.version}: {exc}")
                    self._unrestored[(entry.name, entry.version)] = entry
        return problems

    async def close(self, timeout_s: float | None = None) -> None:
        """Drain and unload everything (daemon shutdown); the persisted set is kept.

        Changes under way may finish within ``timeout_s`` (None: no bound), whoever asked
        for them; then they are cancelled (a stage still running is abandoned). The drain
        of every version shares what is left of that time.
        """
        loop = asyncio.get_running_loop()
        deadline = None if timeout_s is None else loop.time() + timeout_s

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - loop.time())

        if self._changes:
            _, pending = await asyncio.wait(set(self._changes), timeout=left())
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        async with self._lock:
            for name, version in list(self._serving):
                await self._unload_locked(name, version, left())

    # -- internals ------------------------------------------------------------------------

    def _deployed(
        self,
        action: str,
        name: str,
        version: str,
        source: DeploymentSource,
        failure: BaseException | None = None,
        **facts: object,
    ) -> None:
        """One ``deployment`` event (nothing without an event sink); None facts are left out."""
        if self._events is None:
            return
        body: dict[str, object] = {
            "action": action,
            "model": name,
            "version": version,
            "source": source,
            "ok": failure is None,
        }
        body.update((k, v) for k, v in facts.items() if v is not None)
        if failure is not None:  # the type only: messages can quote model code
            body["error"] = type(failure).__name__
        self._events("deployment", **body)

    async def _load_locked(
        self,
        name: str,
        version: str,
        settings: BatchingSettings,
        device: str | None,
        source: DeploymentSource,
    ) -> LiveModel:
        if (name, version) in self._serving:
            raise ManagementError(f"model '{name}' version '{version}' is already live")
        serving = await self._build(name, version, settings, device, source)
        self._add(serving, make_default=False)
        return serving.live

    def _add(self, serving: _Serving, *, make_default: bool) -> None:
        live = serving.live
        self._registry.add(live, make_default=make_default)
        self._serving[(live.name, live.version)] = serving
        self._unrestored.pop((live.name, live.version), None)

    async def _build(
        self,
        name: str,
        version: str,
        settings: BatchingSettings,
        device: str | None,
        source: DeploymentSource,
    ) -> _Serving:
        started = time.monotonic()
        installed = await asyncio.to_thread(self._store.get, name, version)
        self._check_memory(installed)
        options = self._runtime_options
        if device:
            options = replace(options, device=device)
        deadline = started + self._load_timeout

        def bounded(
            stage: str, work: Callable[[], _T], close: Callable[[Any], None]
        ) -> Awaitable[_T]:
            return run_bounded(
                work,
                model=name,
                version=version,
                stage=stage,
                timeout_s=max(0.0, deadline - time.monotonic()),
                limit_s=self._load_timeout,
                abandoned=self._abandoned,
                on_late=close,
            )

        load = partial(load_model, installed.path, installed.manifest, options)
        loaded = await bounded("load", load, lambda late: late and late.close())
        close_loaded = lambda _: loaded.close()  # noqa: E731 (the stages after the load)
        try:
            if options.warmup:
                await bounded("warm-up", loaded.warm_up, close_loaded)
            recorder = self._recorders.for_model(name, version)
            stack = await build(
                loaded,
                settings,
                recorder,
                started=started,
                offload=lambda measure: bounded("thread probe", measure, close_loaded),
            )
            return _Serving(stack.live, loaded, stack.batcher, settings, device)
        except (Expired, asyncio.CancelledError):
            raise  # a stage's thread still holds the model: its on_late closes it
        except WarmupFailed as exc:
            self._recorders.for_model(name, version).observe_warmup_failure()
            if self._events is not None:
                reason = exc.reason if isinstance(exc, WarmupCheckFailed) else "failed"
                self._events(
                    "warmup_failure", model=name, version=version, source=source, reason=reason
                )
            await asyncio.to_thread(loaded.close)
            raise
        except BaseException:
            await asyncio.to_thread(loaded.close)
            raise

    async def _unload_locked(self, name: str, version: str, drain_s: float | None) -> None:
        serving = self._serving.pop((name, version), None)
        if serving is None:
            raise NotFound.model(name, version)
        self._registry.remove(name, version)
        limit = self._drain_timeout if drain_s is None else min(drain_s, self._drain_timeout)
        await self._teardown(serving, limit)
        self._recorders.forget(name, version)

    async def _teardown(self, serving: _Serving, drain_s: float) -> None:
        live = serving.live
        try:
            await asyncio.wait_for(live.wait_idle(), drain_s)
        except TimeoutError:
            log.warning("%s/%s: drain timed out, failing what is left", live.name, live.version)
        # Fails leftovers and joins the instance threads (one stuck in a batch is left).
        await serving.batcher.close(timeout=min(drain_s, 5.0))
        # No gc.collect() here: a full collection holds the GIL for 0.2-0.8 s under load
        # (measured in the hot-swap test) and the module is freed by reference counting.
        await asyncio.to_thread(serving.loaded.close)
        live.state = ModelState.UNLOADED
        log.info("unloaded %s/%s", live.name, live.version)

    def _check_memory(self, installed: InstalledModel) -> None:
        if not self._memory_budget:
            return
        model_bytes = (installed.path / installed.manifest.model_file).stat().st_size
        need = int(model_bytes * _LOAD_MEMORY_FACTOR)
        rss = psutil.Process().memory_info().rss
        if rss + need > self._memory_budget:
            raise ManagementError(
                f"model '{installed.name}' version '{installed.version}' needs about "
                f"{need / 2**20:.0f} MiB; {rss / 2**20:.0f} MiB in use of a "
                f"{self._memory_budget / 2**20:.0f} MiB budget (runtime.memory_budget_mb)"
            )

    async def _persist(self, entries: list[LiveEntry]) -> None:
        # write + fsync + rename + dir fsync: tens of ms on flash, so off the event loop.
        await asyncio.to_thread(self._store.write_live_state, entries)

    async def _persist_or_close(self, entries: list[LiveEntry], fresh: _Serving) -> None:
        """Persist; when that fails, the fresh stack nobody will serve is closed again."""
        try:
            await self._persist(entries)
        except BaseException:
            await fresh.batcher.close(timeout=0.0)
            await asyncio.to_thread(fresh.loaded.close)
            raise
