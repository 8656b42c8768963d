"""Building the serving stack of one model version: ``build``.

A loaded (and warmed) model plus the batching asked for become a ``ServingStack``: the
settings resolved over the archive's and the built-ins (``resolve_batching``), the
execution chosen (intra-op threads and whether to run inline on the event loop,
configured or measured by ``thread_budget``), the executors, the ``AdaptiveBatcher``
and the ``LiveModel`` the registry will hold. ``lifecycle`` decides when to build and
when to swap; this module only builds.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from functools import partial

from edgeserve.serving.batching import AdaptiveBatcher
from edgeserve.serving.registry import LiveModel, ModelState
from edgeserve.serving.runtime import LoadedModel
from edgeserve.serving.thread_budget import choose_intra_op_threads, first_row, full_batch_of
from edgeserve.serving.warmup import representative_inputs
from edgeserve.serving.worker import (
    INLINE_MAX_BATCH_S,
    InlineExecutor,
    InstanceWorker,
    RunFn,
    Tensors,
    default_intra_op_threads,
)
from edgeserve.telemetry.recorders import ModelRecorder
from edgeserve.types import (
    BUILT_IN_BATCHING,
    BatchingSettings,
    TensorSpec,
    TensorValue,
)

log = logging.getLogger("edgeserve.serving")

# Runs the thread probe off the loop (it runs model code): ``asyncio.to_thread`` unless
# the caller bounds it in time (``lifecycle`` does, with ``bounded.run_bounded``).
Offload = Callable[[Callable[[], tuple[int, bool]]], Awaitable[tuple[int, bool]]]


@dataclass(frozen=True)
class ServingStack:
    """What serves one version: the registry's entry and the batcher behind it."""

    live: LiveModel
    batcher: AdaptiveBatcher


def resolve_batching(archive: BatchingSettings, requested: BatchingSettings) -> BatchingSettings:
    """``requested`` (config or management, already layered) over the archive's batching
    over the built-ins; checked as a whole, errors naming ``batching.*``."""
    return requested.over(archive).over(BUILT_IN_BATCHING).validate("batching")


async def build(
    loaded: LoadedModel,
    requested: BatchingSettings,
    recorder: ModelRecorder,
    *,
    started: float,
    offload: Offload | None = None,
) -> ServingStack:
    """The serving stack of ``loaded``; ``started`` is when its load began (monotonic).

    The execution is measured in a thread (it runs the model); the executors and the
    batcher are made here, on the loop.
    """
    settings = resolve_batching(loaded.manifest.batching, requested)
    if not loaded.batches:
        settings = _one_at_a_time(settings, loaded.manifest.label)
    measure = partial(_execution, loaded, settings)
    threads, inline = await (offload(measure) if offload else asyncio.to_thread(measure))
    return _assemble(loaded, replace(settings, intra_op_threads=threads), inline, recorder, started)


def _one_at_a_time(settings: BatchingSettings, label: str) -> BatchingSettings:
    """A model without a batch dimension runs each request alone, whatever the config
    says (a global ``batching.max_batch_size`` applies to every model)."""
    if settings.max_batch_size != 1 or settings.preferred_batch_sizes:
        log.info("%s has no batch dimension: one request per run, batch sizes ignored", label)
    return replace(settings, max_batch_size=1, preferred_batch_sizes=())


def _execution(loaded: LoadedModel, settings: BatchingSettings) -> tuple[int, bool]:
    """(intra-op threads, run inline on the loop): configured, else measured here.

    A model runs on the event loop itself (one instance, no thread hop) only when no
    request can cost more than what was timed: its inputs are bounded (``_bounded``) and
    its largest batch, timed on one thread, takes under ``INLINE_MAX_BATCH_S``. A cheap
    sample says nothing about a request whose shape it does not bound.
    """
    if settings.intra_op_threads:
        return settings.intra_op_threads, False
    if loaded.device.type != "cpu":
        return 1, False  # the GPU does the work; one CPU thread feeds it
    instances = settings.instances or 1
    share = default_intra_op_threads(instances)
    sample = representative_inputs(loaded)
    if sample is None:
        log.info("%s: nothing to time the thread budget with: 1 thread", loaded.manifest.name)
        return 1, False
    batches = loaded.batches
    one = first_row(sample) if batches else sample
    full = full_batch_of(sample, settings.max_batch_size or 1) if batches else None
    choice = choose_intra_op_threads(loaded.run, one, full, share)
    slowest = choice.one_thread_s
    inline = (
        # Only the built-in tensor handler: a custom or image handler may cost far more
        # per real request than on the sample, and inline work holds the event loop.
        loaded.manifest.handler == "tensor"
        and _bounded(loaded.inputs, batches)
        and instances == 1
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


def _bounded(inputs: tuple[TensorSpec, ...], batches: bool) -> bool:
    """Whether the signature bounds every request by the batch the probe times: numeric
    inputs whose dims are all fixed, but for dim 0 of a batching model (the codec bounds
    it by ``max_batch_size``). BYTES elements and ``-1`` dims have no upper bound."""
    return all(
        spec.datatype != "BYTES"
        and all(d >= 0 for d in (spec.shape[1:] if batches else spec.shape))
        for spec in inputs
    )


def _sketching(run: RunFn, recorder: ModelRecorder) -> RunFn:
    """``run`` that also feeds each batch it ran (batch tensors in and out) to the drift
    sketch; only served batches, as warm-up and the thread probe call ``loaded.run``."""
    observe = recorder.drift.observe_batch  # never raises

    def run_and_sketch(inputs: Tensors) -> Mapping[str, TensorValue]:
        outputs = run(inputs)
        observe(inputs, outputs)
        return outputs

    return run_and_sketch


def _assemble(
    loaded: LoadedModel,
    settings: BatchingSettings,
    inline: bool,
    recorder: ModelRecorder,
    started: float,
) -> ServingStack:
    manifest = loaded.manifest
    instances = settings.instances or 1
    label = f"{manifest.name}/{manifest.version}"
    run = _sketching(loaded.run, recorder)
    workers: list[InstanceWorker | InlineExecutor] = (
        [InlineExecutor(run, label)]
        if inline
        else [
            InstanceWorker(run, settings.intra_op_threads, loaded.device, f"{label}#{i}")
            for i in range(instances)
        ]
    )
    batcher = AdaptiveBatcher(
        manifest.name,
        manifest.version,
        settings,
        workers,
        on_batch=recorder.observe_batch,
        batches=loaded.batches,
    )
    recorder.set_queue_depth_source(lambda: batcher.queue_depth)
    took = time.monotonic() - started
    recorder.observe_load(took)
    live = LiveModel(
        name=manifest.name,
        version=manifest.version,
        inputs=loaded.inputs,
        outputs=loaded.outputs,
        max_batch_size=settings.max_batch_size or 1,
        submit=batcher.submit,
        recorder=recorder,
        device=str(loaded.device),
        state=ModelState.READY,
        settings=settings,
        loaded_at=time.time(),
        load_seconds=round(took, 3),
        quantization=manifest.quantization,
        batch_dim=loaded.batches,
    )
    log.info("loaded %s on %s in %.2fs (%d instance(s))", label, loaded.device, took, instances)
    return ServingStack(live, batcher)
