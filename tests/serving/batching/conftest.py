"""Real batchers over real instance threads, with run functions that record what they see.

``Recorder`` is the model: a plain function run on the instance thread that records the
batches it receives and can be held at a gate (a ``threading.Event``) so a test can keep
the only instance busy while it queues more work. Nothing here sleeps a fixed time: tests
wait on conditions with a deadline (``until``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import torch

from edgeserve.serving.batching import AdaptiveBatcher
from edgeserve.serving.worker import InstanceWorker
from edgeserve.types import BatchingSettings, InferRequest, TensorValue

T = TypeVar("T")
GATE_TIMEOUT_S = 10.0


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    """Run one test coroutine on a fresh loop, bounded in time."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``predicate()`` holds, polling the loop; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.001)


def double(inputs: Mapping[str, TensorValue]) -> dict[str, TensorValue]:
    x = inputs["x"]
    assert isinstance(x, torch.Tensor)
    return {"y": x * 2}


class Recorder:
    """The run function: records batch sizes, shapes and the markers (x[:, 0]) it saw."""

    def __init__(self, fn: Callable[[Mapping[str, TensorValue]], dict[str, TensorValue]] = double):
        self.fn = fn
        self.sizes: list[int] = []
        self.shapes: list[tuple[int, ...]] = []
        self.markers: list[float] = []
        self.calls = 0
        self._lock = threading.Lock()
        self._gate = threading.Event()
        self._gate.set()

    def hold(self) -> None:
        """Batches that start from now on block until ``release``."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    def __call__(self, inputs: Mapping[str, TensorValue]) -> dict[str, TensorValue]:
        x = inputs["x"]
        with self._lock:
            self.calls += 1
            if isinstance(x, torch.Tensor):
                self.sizes.append(int(x.shape[0]))
                self.shapes.append(tuple(x.shape))
                self.markers.extend(float(v) for v in x.reshape(x.shape[0], -1)[:, 0])
        if not self._gate.wait(GATE_TIMEOUT_S):
            raise RuntimeError("test gate never opened")
        return self.fn(inputs)


def request(marker: float, rows: int = 1, width: int = 4, deadline: float | None = None):
    """A request whose every value is ``marker`` (so results can be traced to callers)."""
    x = torch.full((rows, width), float(marker))
    return InferRequest("m", "1", {"x": x}, request_id=f"r{marker}", deadline=deadline)


@contextlib.asynccontextmanager
async def serving(
    recorder: Recorder | Callable[[Mapping[str, TensorValue]], dict[str, TensorValue]],
    *,
    instances: int = 1,
    max_batch_size: int = 32,
    max_queue_delay_s: float = 0.002,
    max_queue_size: int = 64,
    preferred_batch_sizes: tuple[int, ...] = (),
    on_batch: Callable[[int, float], None] | None = None,
) -> AsyncIterator[AdaptiveBatcher]:
    """A batcher over ``instances`` real instance threads, closed (gates opened) after."""
    settings = BatchingSettings(
        max_batch_size=max_batch_size,
        max_queue_delay_ms=max_queue_delay_s * 1000.0,
        max_queue_size=max_queue_size,
        preferred_batch_sizes=preferred_batch_sizes,
        instances=instances,
    )
    workers = [
        InstanceWorker(recorder, intra_op_threads=1, name=f"test-instance-{i}")
        for i in range(instances)
    ]
    batcher = AdaptiveBatcher("m", "1", settings, workers, on_batch=on_batch)
    try:
        yield batcher
    finally:
        if isinstance(recorder, Recorder):
            recorder.release()
        await batcher.close(timeout=GATE_TIMEOUT_S)
