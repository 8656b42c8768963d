"""One execution thread per model instance.

An ``InstanceWorker`` owns one OS thread that runs every batch of its instance, so the
asyncio loop never runs torch. The thread, once at start:

- sets its own intra-op thread budget (``torch.set_num_threads`` sets the OpenMP
  thread count of the calling thread only, so each instance has its own budget);
- on a CUDA device, makes the device current and enters its own ``torch.cuda.Stream``;
- enters ``torch.inference_mode()`` for its whole life, so stacking and splitting run
  under it too (``LoadedModel.run`` enters it again for each batch, for its callers on
  other threads: warm-up and the thread probe; nested, it costs little).

Jobs reach the thread through a ``queue.SimpleQueue`` (C-implemented, the cheapest hop
measured here; a ``ThreadPoolExecutor`` adds a Python work item and two futures per
call) and come back with ``loop.call_soon_threadsafe``.

Stacking and splitting happen here, on the instance thread, so the loop never copies a
tensor and this is the only core module below ``runtime`` that needs torch: one
``torch.cat`` per input (``BytesTensor.concat`` for BYTES), one ``torch.split`` per
output (views, no copies; ``BytesTensor.split`` for BYTES). A batch of one request
passes through untouched, with no copy at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import torch

from edgeserve.errors import EdgeserveError, Kind
from edgeserve.types import BytesTensor, TensorValue

log = logging.getLogger("edgeserve.serving")

Tensors = dict[str, TensorValue]
RunFn = Callable[[Tensors], Mapping[str, TensorValue]]
# ``serving.build`` runs a model inline on the event loop (an ``InlineExecutor``) when its
# slowest one-thread time in the thread probe (its full batch, when that was timed) is
# under this, and it also has one instance, one intra-op thread and the tensor handler.
INLINE_MAX_BATCH_S = 100e-6

# Called on the loop: (per-request outputs, None) or (None, the batch's exception); an
# entry of the list is a request's own error when the batch had to be run apart.
PartsDone = Callable[[list[Tensors | BaseException] | None, BaseException | None], None]


def default_intra_op_threads(instances: int) -> int:
    """The cores this process may use, split across instances; at least one each."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // max(1, instances))


def run_isolating(
    run: Callable[[Any], Mapping[str, TensorValue]],
    parts: Sequence[Mapping[str, TensorValue]],
    sizes: Sequence[int],
) -> list[Tensors | BaseException]:
    """Run the stacked batch and split it; if the batch is refused as an invalid input,
    run each request alone, so that only the request at fault fails (error path only)."""
    try:
        return list(split_outputs(dict(run(stack_parts(parts))), sizes))
    except EdgeserveError as exc:
        if len(parts) == 1 or exc.kind is not Kind.INVALID_ARGUMENT:
            raise
    results: list[Tensors | BaseException] = []
    for part in parts:
        try:
            results.append(dict(run(dict(part))))
        except Exception as exc:  # this request's own error
            results.append(exc)
    return results


def stack_parts(parts: Sequence[Mapping[str, TensorValue]]) -> Tensors:
    """Concatenate requests along dim 0: one ``torch.cat`` per input, none for one part."""
    if len(parts) == 1:
        return dict(parts[0])
    stacked: Tensors = {}
    for name, first in parts[0].items():
        values = [part[name] for part in parts]
        if isinstance(first, BytesTensor):
            stacked[name] = BytesTensor.concat(values)  # type: ignore[arg-type]
        else:
            stacked[name] = torch.cat(values)  # type: ignore[arg-type]
    return stacked


def split_outputs(outputs: Mapping[str, TensorValue], sizes: Sequence[int]) -> list[Tensors]:
    """Split batched outputs back per request (dim 0 sizes ``sizes``) as views."""
    if len(sizes) == 1:
        return [dict(outputs)]
    per_request: list[Tensors] = [{} for _ in sizes]
    size_list = list(sizes)
    for name, value in outputs.items():
        pieces: Sequence[TensorValue]
        if isinstance(value, BytesTensor):
            if value.batch_size != sum(size_list):
                raise ValueError(
                    f"output '{name}' has {value.batch_size} rows, the batch had {sum(size_list)}"
                )
            pieces = value.split(size_list)
        else:
            pieces = torch.split(value, size_list)
        for index, result in enumerate(per_request):
            result[name] = pieces[index]
    return per_request


class InstanceWorker:
    """One instance's execution thread; see the module docstring.

    ``run`` takes a dict of batched inputs and returns a dict of batched outputs (it will
    be ``LoadedModel.run`` from ``runtime``). ``close`` stops and joins the thread.
    """

    def __init__(
        self,
        run: RunFn,
        intra_op_threads: int | None = None,
        device: torch.device | None = None,
        name: str = "edgeserve-instance",
    ) -> None:
        if intra_op_threads is not None and intra_op_threads < 1:
            raise ValueError(
                f"instance '{name}': intra_op_threads must be >= 1, got {intra_op_threads}"
            )
        self._run = run
        self.intra_op_threads = intra_op_threads or default_intra_op_threads(1)
        self.device = device
        self.name = name
        self._stream: Any = None
        self._broken: BaseException | None = None
        self._jobs: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        self._closed = False
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    # -- loop side ----------------------------------------------------------------------

    def submit_parts(
        self,
        parts: Sequence[Mapping[str, TensorValue]],
        sizes: Sequence[int],
        loop: asyncio.AbstractEventLoop,
        done: PartsDone,
    ) -> None:
        """Stack ``parts``, run them, split the outputs by ``sizes``; ``done`` on ``loop``."""
        self._put(partial(self._execute_parts, parts, sizes, loop, done))

    def close(self, timeout: float | None = None) -> bool:
        """Stop the thread after the jobs already queued; True once it has exited."""
        if not self._closed:
            self._closed = True
            self._jobs.put(None)
        if self._thread is threading.current_thread():
            return False
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _put(self, job: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError(f"instance worker '{self.name}' is closed")
        self._jobs.put(job)

    # -- instance thread ----------------------------------------------------------------

    def _main(self) -> None:
        with contextlib.ExitStack() as stack:
            try:
                self._setup(stack)
            except Exception as exc:  # every job will fail with it, none hangs
                log.exception("instance '%s': thread setup failed", self.name)
                self._broken = exc
            jobs = self._jobs
            while (job := jobs.get()) is not None:
                job()

    def _setup(self, stack: contextlib.ExitStack) -> None:
        # torch sizes a thread's OpenMP team at its first parallel op, from whatever
        # set_num_threads() ran last in *any* thread; run one first, so that a model loaded
        # later with another budget cannot overwrite this instance's.
        torch.ones(1 << 17).add_(1)  # above the parallel grain size: really parallel
        torch.set_num_threads(self.intra_op_threads)
        device = self.device
        if device is not None and device.type == "cuda" and torch.cuda.is_available():
            torch.cuda.set_device(device)
            self._stream = torch.cuda.Stream(device=device)
            stack.enter_context(torch.cuda.stream(self._stream))
        stack.enter_context(torch.inference_mode())

    def _run_once(self, inputs: Mapping[str, TensorValue]) -> Tensors:
        if self._broken is not None:
            raise RuntimeError(f"instance '{self.name}' failed to start") from self._broken
        outputs = dict(self._run(dict(inputs)))
        if self._stream is not None:
            # Results leave this thread: make them safe to read from any stream.
            self._stream.synchronize()
        return outputs

    def _stack_run_split(
        self, parts: Sequence[Mapping[str, TensorValue]], sizes: Sequence[int]
    ) -> list[Tensors | BaseException]:
        return run_isolating(self._run_once, parts, sizes)

    def _execute_parts(
        self,
        parts: Sequence[Mapping[str, TensorValue]],
        sizes: Sequence[int],
        loop: asyncio.AbstractEventLoop,
        done: PartsDone,
    ) -> None:
        try:
            results = self._stack_run_split(parts, sizes)
        except BaseException as exc:  # handed to the loop as the batch error
            _post(loop, done, None, exc)
        else:
            _post(loop, done, results, None)


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[..., None], *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:
        log.warning("event loop closed before a batch result could be delivered")


class InlineExecutor:
    """Runs batches on the event loop's own thread: for models so small that the hop to
    an instance thread and back (~60 us here) costs more than the model itself.

    ``serving.build`` picks it only under the conditions beside ``INLINE_MAX_BATCH_S``,
    so the loop is held about that long per batch. Through ``submit_parts`` (a batch
    formed from the queue), ``done`` is still called on a later loop iteration, as a
    thread would; ``run_now`` is the batcher's direct path for a request that finds the
    model idle and nothing queued.
    """

    def __init__(self, run: RunFn, name: str = "edgeserve-inline") -> None:
        # Built on the loop's thread: no OpenMP team spinning between tiny ops there.
        torch.set_num_threads(1)
        self._run = run
        self.name = name
        self.intra_op_threads = 1
        self.device = None

    def submit_parts(
        self,
        parts: Sequence[Mapping[str, TensorValue]],
        sizes: Sequence[int],
        loop: asyncio.AbstractEventLoop,
        done: PartsDone,
    ) -> None:
        try:
            results = self.run_now(parts, sizes)
        except Exception as exc:  # handed to the batcher as the batch error
            loop.call_soon(done, None, exc)
        else:
            loop.call_soon(done, results, None)

    def run_now(
        self, parts: Sequence[Mapping[str, TensorValue]], sizes: Sequence[int]
    ) -> list[Tensors | BaseException]:
        """Run the batch here and now (the batcher's path for a request that finds the
        model idle and nothing queued); raises what the batch raised. ``run`` enters
        inference mode itself (``LoadedModel.run``); stacking and splitting need none."""
        return run_isolating(self._run, parts, sizes)

    def close(self, timeout: float | None = None) -> bool:
        return True
