"""Helpers for the api tests: tiny scripted models, live models, a loop thread, the server.

The server runs on its own event loop in a background thread, so that synchronous stock
clients (tritonclient) can call it from the test thread. Models are ``LiveModel``s whose
``submit`` runs a scripted module in a worker thread, standing in for the batcher.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import torch
import tritonclient.grpc as triton

from edgeserve.api.server import InferenceServer
from edgeserve.errors import Expired, Overloaded
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc
from edgeserve.serving.registry import LiveModel, ModelRegistry, ModelState
from edgeserve.types import BytesTensor, InferRequest, InferResult, TensorSpec

T = TypeVar("T")
MAX_MESSAGE_BYTES = 1 << 20
WAIT_S = 10.0
NUMERIC = ("BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64")


class Twice(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bool:
            return ~x
        return x + x


class Thrice(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3


class Upper(torch.nn.Module):
    def forward(self, xs: list[str]) -> list[str]:
        return [s.upper() for s in xs]


class Pair(torch.nn.Module):
    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return a + b.unsqueeze(1).to(a.dtype), b * 2


SCRIPTED: dict[str, torch.jit.ScriptModule] = {
    "twice": torch.jit.script(Twice()),
    "thrice": torch.jit.script(Thrice()),
    "upper": torch.jit.script(Upper()),
    "pair": torch.jit.script(Pair()),
}


def run_scripted(
    module: torch.jit.ScriptModule, request: InferRequest, inputs: list[str], outputs: list[str]
):
    """Run ``module`` on the named inputs (BYTES as UTF-8 strings); name the outputs."""
    values = [request.inputs[name] for name in inputs]
    args: list[Any] = []
    for value in values:
        if isinstance(value, BytesTensor):
            args.append([item.decode() for item in value.items])
        else:
            args.append(value)
    with torch.inference_mode():
        produced = module(*args)
    if not isinstance(produced, tuple):
        produced = (produced,)
    result: dict[str, Any] = {}
    for name, value, arg in zip(outputs, produced, values, strict=False):
        if isinstance(value, list):
            value = BytesTensor([s.encode() for s in value], arg.shape)
        result[name] = value
    return result


def scripted_submit(module_name: str, inputs: list[str], outputs: list[str]):
    module = SCRIPTED[module_name]

    async def submit(request: InferRequest) -> InferResult:
        values = await asyncio.to_thread(run_scripted, module, request, inputs, outputs)
        return InferResult(request.model, request.version or "", values, request.request_id)

    return submit


def live_model(
    name: str,
    inputs: list[tuple[str, str, tuple[int, ...]]],
    outputs: list[tuple[str, str, tuple[int, ...]]],
    submit: Callable[[InferRequest], Awaitable[InferResult]],
    *,
    version: str = "1",
    max_batch_size: int = 8,
) -> LiveModel:
    return LiveModel(
        name=name,
        version=version,
        inputs=tuple(TensorSpec(*spec) for spec in inputs),
        outputs=tuple(TensorSpec(*spec) for spec in outputs),
        max_batch_size=max_batch_size,
        submit=submit,
        state=ModelState.READY,
    )


def twice_model(datatype: str, name: str | None = None, **kwargs: Any) -> LiveModel:
    return live_model(
        name or f"twice_{datatype.lower()}",
        [("x", datatype, (-1, -1))],
        [("y", datatype, (-1, -1))],
        scripted_submit("twice", ["x"], ["y"]),
        **kwargs,
    )


@dataclass
class Recorder:
    """What the behaviour models saw."""

    deadlines: list[float | None] = field(default_factory=list)
    entered: threading.Event = field(default_factory=threading.Event)
    cancelled: threading.Event = field(default_factory=threading.Event)


def behaviour_models(recorder: Recorder) -> list[LiveModel]:
    inputs: list[tuple[str, str, tuple[int, ...]]] = [("x", "FP32", (-1, -1))]
    outputs: list[tuple[str, str, tuple[int, ...]]] = [("y", "FP32", (-1, -1))]

    async def overloaded(request: InferRequest) -> InferResult:
        raise Overloaded.queue_full(request.model, request.version or "", 4)

    async def expired(request: InferRequest) -> InferResult:
        raise Expired.while_queued(request.model, request.version or "")

    async def leaky(request: InferRequest) -> InferResult:
        values = request.inputs["x"].tolist()  # type: ignore[union-attr]
        raise RuntimeError(f"model choked on input {values}")

    twice = scripted_submit("twice", ["x"], ["y"])

    async def deadline(request: InferRequest) -> InferResult:
        recorder.deadlines.append(request.deadline)
        return await twice(request)

    async def hang(request: InferRequest) -> InferResult:
        recorder.entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            recorder.cancelled.set()
            raise
        raise AssertionError("hang model woke up")

    return [
        live_model(name, inputs, outputs, submit)
        for name, submit in [
            ("overloaded", overloaded),
            ("expired", expired),
            ("leaky", leaky),
            ("deadline", deadline),
            ("hang", hang),
        ]
    ]


def standard_models(recorder: Recorder) -> list[tuple[LiveModel, bool]]:
    """(model, make_default) in the order they are added."""
    models = [twice_model(dt) for dt in NUMERIC]
    models.append(twice_model("FP32", name="flaky"))
    models.append(
        live_model(
            "upper",
            [("text", "BYTES", (-1,))],
            [("upper", "BYTES", (-1,))],
            scripted_submit("upper", ["text"], ["upper"]),
        )
    )
    models.append(
        live_model(
            "pair",
            [("a", "FP32", (-1, 4)), ("b", "INT64", (-1,))],
            [("sum", "FP32", (-1, 4)), ("double", "INT64", (-1,))],
            scripted_submit("pair", ["a", "b"], ["sum", "double"]),
        )
    )
    models.append(
        live_model(
            "fixed",
            [("x", "FP32", (2, 3))],
            [("y", "FP32", (2, 3))],
            scripted_submit("twice", ["x"], ["y"]),
            max_batch_size=1,
        )
    )
    models += behaviour_models(recorder)
    pairs = [(m, False) for m in models]
    pairs.append((twice_model("FP32", name="versioned", version="1"), False))
    v2 = live_model(
        "versioned",
        [("x", "FP32", (-1, 5))],
        [("y", "FP32", (-1, 5))],
        scripted_submit("thrice", ["x"], ["y"]),
        version="2",
    )
    pairs.append((v2, True))
    return pairs


class LoopThread:
    """An asyncio loop in a daemon thread; ``run`` executes a coroutine there and waits."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Awaitable[T], timeout: float = 30.0) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(_as_coroutine(coro), self.loop)
        return future.result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def invoke() -> T:
            return fn(*args)

        return self.run(invoke())

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


@dataclass
class Api:
    """A running server and what the tests need to drive it."""

    loop: LoopThread
    registry: ModelRegistry
    server: InferenceServer
    socket_path: Path
    tcp: str
    recorder: Recorder
    ready: list[bool]

    @property
    def uds(self) -> str:
        return f"unix://{self.socket_path}"

    def triton(self, url: str | None = None) -> triton.InferenceServerClient:
        return triton.InferenceServerClient(url=url or self.tcp)

    def channel(self, address: str | None = None) -> grpc.Channel:
        return grpc.insecure_channel(address or self.tcp)

    def stub(self, channel: grpc.Channel) -> pb_grpc.GRPCInferenceServiceStub:
        return pb_grpc.GRPCInferenceServiceStub(channel)

    def set_state(self, name: str, version: str, state: ModelState) -> None:
        """Put a registered version in ``state`` (lifecycle never leaves one registered
        but not READY; a request that found it before its removal sees the same)."""
        live = self.registry.get(name, version)
        self.loop.call(setattr, live, "state", state)
        self.loop.run(self.server.refresh_health())


def start_api(
    loop: LoopThread, registry: ModelRegistry, folder: Path, ready: list[bool], **kwargs: Any
) -> tuple[InferenceServer, Path, str]:
    socket_path = folder / "run" / "inference.sock"
    server = InferenceServer(
        registry=registry,
        listen=[f"unix://{socket_path}", "127.0.0.1:0"],
        max_message_bytes=kwargs.pop("max_message_bytes", MAX_MESSAGE_BYTES),
        is_ready=lambda: ready[0],
        server_version="9.9.9-test",
        **kwargs,
    )
    addresses = loop.run(server.start())
    tcp = next(a for a in addresses if not a.startswith("unix:"))
    return server, socket_path, tcp


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_S) -> None:
    """Poll ``condition`` until true; fail naming ``what`` after ``timeout`` seconds."""
    pause = threading.Event()  # never set: its wait is an interruptible pause
    deadline = time.monotonic() + timeout
    step = 0.002
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        pause.wait(step)
        step = min(step * 2, 0.05)
