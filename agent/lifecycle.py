"""The one interface that changes what is live: load, unload, set default, scale, restore.

Every change runs under one lock and follows load-new, flip, drain-old:
a version is loaded, warmed and self-checked *beside* what is live, and only then added
to the registry; a failure on the way leaves the registry exactly as it was. An unload
takes the version out of the index first (new requests go elsewhere or get NOT_FOUND),
waits until the requests it admitted have finished, then frees its memory.
After each change the live set is persisted atomically through the store, so a restart
(also after kill -9) comes back to the same set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import psutil

from edgeserve.archive.manifest import BatchingDefaults
from edgeserve.errors import ManagementError, NotFound, WarmupFailed
from edgeserve.serving.batching import AdaptiveBatcher, BatchSettings
from edgeserve.serving.registry import LiveModel, ModelRegistry, ModelState
from edgeserve.serving.runtime import LoadedModel, RuntimeOptions, load_model
from edgeserve.serving.thread_budget import choose_intra_op_threads, first_row, full_batch_of
from edgeserve.serving.warmup import representative_inputs
from edgeserve.serving.worker import (
    INLINE_MAX_BATCH_S,
    InlineExecutor,
    InstanceWorker,
    default_intra_op_threads,
)
from edgeserve.store.model_store import InstalledModel, LiveEntry, ModelStore
from edgeserve.telemetry.recorders import Recorders
from edgeserve.types import ModelSettings

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
    settings: ModelSettings


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
        on_change: Callable[[], None] | None = None,
        recorders: Recorders | None = None,
    ) -> None:
        self._store = store
        self._registry = registry
        self._runtime_options = runtime_options
        self._memory_budget = memory_budget_mb * 1024 * 1024
        self._drain_timeout = drain_timeout_s
        self._on_change = on_change
        self._recorders = recorders or Recorders()
        self._serving: dict[tuple[str, str], _Serving] = {}
        # Persisted entries that failed to restore: kept in the live set until unloaded.
        self._unrestored: dict[tuple[str, str], LiveEntry] = {}
        self._lock = asyncio.Lock()
        self._changes: set[asyncio.Task[Any]] = set()

    # -- queries --------------------------------------------------------------------------

    def settings(self, name: str, version: str) -> ModelSettings:
        serving = self._serving.get((name, version))
        if serving is None:
            raise NotFound.model(name, version)
        return serving.settings

    def live_entries(self) -> list[LiveEntry]:
        """What is live (and what should be, but failed to restore), as persisted."""
        pending = [
            replace(e, default=e.default and self._registry.default_version(e.name) is None)
            for e in self._unrestored.values()
        ]
        return pending + [
            LiveEntry(
                name=s.live.name,
                version=s.live.version,
                default=self._registry.default_version(s.live.name) == s.live.version,
                settings=s.settings.to_dict(),
            )
            for s in self._serving.values()
        ]

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
        settings: ModelSettings | None = None,
        *,
        make_default: bool = False,
    ) -> LiveModel:
        """Load a stored version beside what is live; flip the default when asked."""

        async def change() -> LiveModel:
            live = await self._load_locked(name, version, settings or ModelSettings())
            if make_default:
                self._registry.set_default(name, version)
            await self._persist()
            return live

        return await self._change(change)

    async def unload(self, name: str, version: str) -> None:
        """Take a version out of service; its admitted requests finish first."""

        async def change() -> None:
            if self._unrestored.pop((name, version), None) is not None:
                await self._persist()
                return
            serving = self._serving.pop((name, version), None)
            if serving is None:
                raise NotFound.model(name, version)
            self._registry.remove(name, version)
            await self._persist()  # before the drain: a crash meanwhile must not revive it
            await self._teardown(serving)
            self._recorders.forget(name, version)

        await self._change(change)

    async def set_default(self, name: str, version: str) -> None:
        async def change() -> None:
            self._registry.set_default(name, version)
            await self._persist()

        await self._change(change)

    async def scale(self, name: str, version: str, **changes: Any) -> ModelSettings:
        """Apply new serving settings by loading a fresh instance set, then swapping.

        The version keeps serving throughout: the new batcher and workers are built and
        warmed first, the registry entry is replaced, and the old set drains.
        """

        async def change() -> ModelSettings:
            serving = self._serving.get((name, version))
            if serving is None:
                raise NotFound.model(name, version)
            settings = replace(serving.settings, **changes)
            was_default = self._registry.default_version(name) == version
            fresh = await self._build(name, version, settings)
            self._registry.remove(name, version)
            self._registry.add(fresh.live, make_default=was_default)
            self._serving[(name, version)] = fresh
            await self._persist()
            await self._teardown(serving)
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
                try:
                    await self._load_locked(
                        entry.name, entry.version, ModelSettings.from_dict(entry.settings)
                    )
                    if entry.default:
                        self._registry.set_default(entry.name, entry.version)
                except Exception as exc:  # one bad entry must not keep the others down
                    log.error("could not restore %s/%s: %s", entry.name, entry.version, exc)
                    problems.append(f"{entry.name}/{entry.version}: {exc}")
                    self._unrestored[(entry.name, entry.version)] = entry
        return problems

    async def close(self) -> None:
        """Drain and unload everything (daemon shutdown); the persisted set is kept."""
        if self._changes:  # let changes already under way finish, whoever asked for them
            await asyncio.gather(*self._changes, return_exceptions=True)
        async with self._lock:
            for name, version in list(self._serving):
                await self._unload_locked(name, version)

    # -- internals ------------------------------------------------------------------------

    async def _load_locked(self, name: str, version: str, settings: ModelSettings) -> LiveModel:
        if (name, version) in self._serving:
            raise ManagementError(f"model '{name}' version '{version}' is already live")
        serving = await self._build(name, version, settings)
        self._registry.add(serving.live)
        self._serving[(name, version)] = serving
        self._unrestored.pop((name, version), None)
        return serving.live

    async def _build(self, name: str, version: str, settings: ModelSettings) -> _Serving:
        started = time.monotonic()
        installed = await asyncio.to_thread(self._store.get, name, version)
        self._check_memory(installed)
        options = self._runtime_options
        if settings.device:
            options = replace(options, device=settings.device)
        loaded = await asyncio.to_thread(load_model, installed.path, installed.manifest, options)
        try:
            if options.warmup:
                await asyncio.to_thread(loaded.warm_up)
            batch = resolve_batch_settings(installed.manifest.batching, settings)
            threads, inline = await asyncio.to_thread(self._execution, loaded, settings, batch)
            return self._assemble(
                installed, loaded, settings, batch, threads, inline, time.monotonic() - started
            )
        except WarmupFailed:
            self._recorders.for_model(name, version).observe_warmup_failure()
            await asyncio.to_thread(loaded.close)
            raise
        except BaseException:
            await asyncio.to_thread(loaded.close)
            raise

    def _execution(
        self, loaded: LoadedModel, settings: ModelSettings, batch: BatchSettings
    ) -> tuple[int, bool]:
        """(intra-op threads, run inline on the loop): configured, else measured here.

        A model whose full batch takes under ``INLINE_MAX_BATCH_S`` on one thread runs on
        the event loop itself (one instance, no thread hop); see ``thread_budget``.
        """
        if settings.intra_op_threads:
            return settings.intra_op_threads, False
        if loaded.device.type != "cpu":
            return 1, False  # the GPU does the work; one CPU thread feeds it
        share = default_intra_op_threads(batch.instances)
        sample = representative_inputs(loaded)
        if sample is None:
            log.info("%s: nothing to time the thread budget with: 1 thread", loaded.manifest.name)
            return 1, False
        batches = all(spec.shape[:1] == (-1,) for spec in loaded.inputs)
        one = first_row(sample) if batches else sample
        full = full_batch_of(sample, batch.max_batch_size) if batches else None
        choice = choose_intra_op_threads(loaded.run, one, full, share)
        slowest = choice.one_thread_s
        inline = (
            # Only the built-in tensor handler: a custom or image handler may cost far more
            # per real request than on the sample, and inline work holds the event loop.
            loaded.manifest.handler == "tensor"
            and batch.instances == 1
            and choice.threads == 1
            and slowest is not None
            and slowest < INLINE_MAX_BATCH_S
        )
        timings = ", ".join(f"{k} {v * 1e6:.0f}us" for k, v in choice.timings_s.items())
        log.info(
            "%s: %d intra-op thread(s)%s (%s)",
            loaded.manifest.name,
            choice.threads,
            ", inline on the event loop" if inline else "",
            timings,
        )
        return choice.threads, inline

    def _assemble(
        self,
        installed: InstalledModel,
        loaded: LoadedModel,
        settings: ModelSettings,
        batch: BatchSettings,
        threads: int,
        inline: bool,
        took: float,
    ) -> _Serving:
        manifest = installed.manifest
        instances = batch.instances
        label = f"{manifest.name}/{manifest.version}"
        workers: list[InstanceWorker | InlineExecutor] = (
            [InlineExecutor(loaded.run, label)]
            if inline
            else [
                InstanceWorker(loaded.run, threads, loaded.device, f"{label}#{i}")
                for i in range(instances)
            ]
        )
        recorder = self._recorders.for_model(manifest.name, manifest.version)
        batcher = AdaptiveBatcher(
            manifest.name, manifest.version, batch, workers, on_batch=recorder.observe_batch
        )
        recorder.set_queue_depth_source(lambda: batcher.queue_depth)
        recorder.observe_load(took)
        live = LiveModel(
            name=manifest.name,
            version=manifest.version,
            inputs=loaded.inputs,
            outputs=loaded.outputs,
            max_batch_size=batch.max_batch_size,
            submit=batcher.submit,
            recorder=recorder,
            device=str(loaded.device),
            state=ModelState.READY,
            info={
                "instances": instances,
                "intra_op_threads": threads,
                "execution": "inline" if inline else "threads",
                "max_batch_size": batch.max_batch_size,
                "max_queue_delay_ms": batch.max_queue_delay_s * 1000.0,
                "max_queue_size": batch.max_queue_size,
                "loaded_at": time.time(),
                "load_seconds": round(took, 3),
                "quantization": manifest.quantization,
            },
        )
        log.info("loaded %s on %s in %.2fs (%d instance(s))", label, loaded.device, took, instances)
        return _Serving(live, loaded, batcher, settings)

    async def _unload_locked(self, name: str, version: str) -> None:
        serving = self._serving.pop((name, version), None)
        if serving is None:
            raise NotFound.model(name, version)
        self._registry.remove(name, version)
        await self._teardown(serving)
        self._recorders.forget(name, version)

    async def _teardown(self, serving: _Serving) -> None:
        live = serving.live
        try:
            await asyncio.wait_for(live.wait_idle(), self._drain_timeout)
        except TimeoutError:
            log.warning("%s/%s: drain timed out, failing what is left", live.name, live.version)
        await serving.batcher.close()  # fails leftovers and joins the instance threads
        # No gc.collect() here: a full collection holds the GIL for 0.2-0.8 s under load
        # (measured in the hot-swap test) and the module is freed by reference counting.
        await asyncio.to_thread(serving.loaded.close)
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

    async def _persist(self) -> None:
        # write + fsync + rename + dir fsync: tens of ms on flash, so off the event loop.
        await asyncio.to_thread(self._store.write_live_state, self.live_entries())
        if self._on_change is not None:
            self._on_change()


def resolve_batch_settings(defaults: BatchingDefaults, settings: ModelSettings) -> BatchSettings:
    """Serving settings (config, already layered) over the archive's batching defaults."""
    delay_ms = (
        settings.max_queue_delay_ms
        if settings.max_queue_delay_ms is not None
        else defaults.max_queue_delay_ms
    )
    preferred = (
        settings.preferred_batch_sizes
        if settings.preferred_batch_sizes is not None
        else defaults.preferred_batch_sizes
    )
    return BatchSettings(
        max_batch_size=settings.max_batch_size or defaults.max_batch_size,
        max_queue_delay_s=delay_ms / 1000.0,
        max_queue_size=settings.max_queue_size,
        preferred_batch_sizes=preferred,
        instances=max(1, settings.instances),
    )
