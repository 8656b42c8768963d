"""The KServe v2 ``inference.GRPCInferenceService`` servicer: thin, codec -> registry -> codec.

Choices worth knowing (each matches what Triton does, so stock clients behave):

* ModelReady for an unknown model or version answers ``ready: false`` (no error), so
  ``tritonclient``'s ``is_model_ready("nope")`` returns False; ModelMetadata and
  ModelInfer answer NOT_FOUND for them.
* ModelMetadata lists every live version of the name in ``versions`` and describes the
  version asked for (the default one when ``version`` is empty).
* ModelStreamInfer answers each request with one ``ModelStreamInferResponse`` that
  carries the request's ``id``. Requests on one stream run concurrently (each is its own
  task, so the batcher can put them into one batch); responses are written as they
  complete, not in request order. A failed request puts the same text a unary call would
  return into ``error_message`` (with ``infer_response`` holding the model, version and
  id) and the stream goes on. At most ``max_stream_in_flight`` requests of one stream are
  unanswered at a time (reading pauses beyond that). When the client half-closes, the
  in-flight requests finish and the stream ends; when it cancels, they are cancelled.
* A request answered INTERNAL (model code raised, or a bug) may become a telemetry
  ``error`` event through ``events`` (``api.errors.ErrorEvents``: the policy, the body).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import TypeAlias

import grpc

from edgeserve.api.codec import (
    decode_infer_request,
    encode_infer_response,
    encode_model_metadata,
    request_uses_raw,
)
from edgeserve.api.errors import ErrorEvents, describe_error, internal, map_errors, status_of
from edgeserve.errors import EdgeserveError
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc
from edgeserve.serving.registry import ModelRegistry
from edgeserve.types import EventSink

DEFAULT_MAX_STREAM_IN_FLIGHT = 1024

_Context: TypeAlias = grpc.aio.ServicerContext


def _code_name(exc: BaseException) -> str:
    """The status code name a failed request is counted under."""
    if isinstance(exc, EdgeserveError):
        return status_of(exc.kind).name
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "INTERNAL"


def _deadline(context: _Context) -> float | None:
    """The call's deadline as an absolute ``time.monotonic()``, or None without one."""
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """Answers the KServe v2 RPCs from a ``ModelRegistry``."""

    def __init__(
        self,
        registry: ModelRegistry,
        server_name: str,
        server_version: str,
        is_ready: Callable[[], bool],
        *,
        extensions: Sequence[str] = (),
        max_stream_in_flight: int = DEFAULT_MAX_STREAM_IN_FLIGHT,
        max_request_bytes: int | None = None,
        events: EventSink | None = None,
    ) -> None:
        if max_stream_in_flight < 1:
            raise ValueError(f"max_stream_in_flight must be >= 1, got {max_stream_in_flight}")
        self._registry = registry
        self._metadata = pb.ServerMetadataResponse(
            name=server_name, version=server_version, extensions=list(extensions)
        )
        self._is_ready = is_ready
        self._max_stream_in_flight = max_stream_in_flight
        self._max_request_bytes = max_request_bytes
        self._errors = ErrorEvents(events) if events is not None else None

    # -- server and model state -------------------------------------------------------

    @map_errors
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: _Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @map_errors
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: _Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=bool(self._is_ready()))

    @map_errors
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: _Context
    ) -> pb.ServerMetadataResponse:
        return self._metadata

    @map_errors
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: _Context
    ) -> pb.ModelReadyResponse:
        live = self._registry.find(request.name, request.version or None)
        return pb.ModelReadyResponse(ready=live is not None and live.ready)

    @map_errors
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: _Context
    ) -> pb.ModelMetadataResponse:
        live = self._registry.get(request.name, request.version or None)
        return encode_model_metadata(live, self._registry.versions(request.name))

    # -- inference --------------------------------------------------------------------

    @map_errors
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: _Context
    ) -> pb.ModelInferResponse:
        return await self._infer(request, _deadline(context), "ModelInfer")

    async def _infer(
        self, msg: pb.ModelInferRequest, deadline: float | None, where: str
    ) -> pb.ModelInferResponse:
        model = self._registry.get(msg.model_name, msg.model_version or None)
        started = time.perf_counter()
        try:
            request = decode_infer_request(msg, model, deadline, max_bytes=self._max_request_bytes)
            result = await model.infer(request)
            response = encode_infer_response(
                result,
                model,
                raw=request_uses_raw(msg),
                requested=request.requested_outputs,
                request_id=msg.id,
            )
        except BaseException as exc:
            failure = exc
            if isinstance(exc, Exception) and not isinstance(exc, EdgeserveError):
                failure = internal(exc, where)  # logged once, here, under a correlation id
            if model.recorder is not None:
                model.recorder.observe_request(
                    _code_name(failure), time.perf_counter() - started, None, None
                )
            if self._errors is not None:
                self._errors.failed(failure, model.name, model.version)
            if failure is exc:
                raise
            raise failure from exc
        if model.recorder is not None:
            timings = result.timings
            model.recorder.observe_request(
                "OK",
                time.perf_counter() - started,
                timings.get("queue_s"),
                timings.get("compute_s"),
            )
        return response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: _Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        stream = _Stream(self, _deadline(context), self._max_stream_in_flight)
        async for response in stream.run(request_iterator):
            yield response

    async def _stream_one(
        self, msg: pb.ModelInferRequest, deadline: float | None
    ) -> pb.ModelStreamInferResponse:
        try:
            response = await self._infer(msg, deadline, "ModelStreamInfer")
            return pb.ModelStreamInferResponse(infer_response=response)
        except Exception as exc:
            _, message = describe_error(exc, "ModelStreamInfer")
            header = pb.ModelInferResponse(
                model_name=msg.model_name, model_version=msg.model_version, id=msg.id
            )
            return pb.ModelStreamInferResponse(error_message=message, infer_response=header)


class _Stream:
    """One ModelStreamInfer call: a reader task fans requests out, the caller writes."""

    def __init__(self, servicer: InferenceServicer, deadline: float | None, limit: int) -> None:
        self._servicer = servicer
        self._deadline = deadline
        self._slots = asyncio.Semaphore(limit)
        self._tasks: set[asyncio.Task[pb.ModelStreamInferResponse]] = set()
        self._done: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()

    async def run(
        self, requests: AsyncIterator[pb.ModelInferRequest]
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (response := await self._done.get()) is not None:
                yield response
                self._slots.release()  # released once the response has been written
            await reader  # surfaces a failed read
        finally:
            reader.cancel()
            for task in list(self._tasks):
                task.cancel()

    async def _read(self, requests: AsyncIterator[pb.ModelInferRequest]) -> None:
        try:
            async for msg in requests:
                await self._slots.acquire()
                task = asyncio.create_task(self._servicer._stream_one(msg, self._deadline))
                self._tasks.add(task)
                task.add_done_callback(self._finished)
            if self._tasks:
                await asyncio.wait(list(self._tasks))
        finally:
            self._done.put_nowait(None)

    def _finished(self, task: asyncio.Task[pb.ModelStreamInferResponse]) -> None:
        self._tasks.discard(task)
        if not task.cancelled():
            self._done.put_nowait(task.result())
