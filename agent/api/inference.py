"""The KServe v2 ``inference.GRPCInferenceService`` servicer: thin, codec -> registry -> codec.

Choices worth knowing (each matches what Triton does, so stock clients behave):

* ModelReady for an unknown model or version answers ``ready: false`` (no error), so
  ``tritonclient``'s ``is_model_ready("nope")`` returns False; ModelMetadata and
  ModelInfer answer NOT_FOUND for them.
* ModelMetadata lists every live version of the name in ``versions`` and describes the
  version asked for (the default one when ``version`` is empty); ModelConfig (Triton's
  model-configuration extension) answers for the same version.
* ModelStatistics (Triton's statistics extension): an empty ``name`` selects every live
  version of every model, a name without ``version`` every live version of that name (as
  Triton does); an unknown name or version is NOT_FOUND, a version without a name
  INVALID_ARGUMENT. What the figures mean: ``api.triton_extensions``.
* ServerMetadata lists the Triton extensions implemented (``triton_extensions.EXTENSIONS``)
  and nothing else.
* ModelStreamInfer answers each request with one ``ModelStreamInferResponse`` that
  carries the request's ``id``. Requests on one stream run concurrently (each is its own
  task, so the batcher can put them into one batch); responses are written as they
  complete, not in request order. A failed request puts the same text a unary call would
  return into ``error_message`` (with ``infer_response`` holding the model, version and
  id) and the stream goes on, as does a malformed message (no id). At most
  ``max_stream_in_flight`` requests and ``stream_max_pending_bytes`` (requests running, as
  the in-flight budget counts them, plus responses not yet read by the client) of one
  stream are pending at a time: reading pauses beyond that, so a client that never reads
  pins a bounded amount. When the client half-closes, the in-flight requests finish and
  the stream ends; when it cancels, they are cancelled.
* A request answered INTERNAL (model code raised, or a bug) may become a telemetry
  ``error`` event through ``events`` (``api.errors.ErrorEvents``: the policy, the body).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TypeAlias

import grpc

from edgeserve.api.bounds import Charged, InflightBudget, Refused, charge_of
from edgeserve.api.codec import (
    decode_infer_request,
    encode_infer_response,
    encode_model_metadata,
    request_uses_raw,
)
from edgeserve.api.errors import ErrorEvents, describe_error, internal, map_errors, status_of
from edgeserve.api.triton_extensions import EXTENSIONS, model_config, model_statistics
from edgeserve.errors import EdgeserveError, InvalidArgument, NotFound
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc
from edgeserve.serving.registry import LiveModel, ModelRegistry
from edgeserve.types import EventSink

DEFAULT_MAX_STREAM_IN_FLIGHT = 1024
DEFAULT_STREAM_MAX_PENDING_BYTES = 16 << 20

_Context: TypeAlias = grpc.aio.ServicerContext
_now = time.perf_counter  # four reads per request: one global lookup each, not two


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
        extensions: Sequence[str] = EXTENSIONS,
        max_stream_in_flight: int = DEFAULT_MAX_STREAM_IN_FLIGHT,
        max_request_bytes: int | None = None,
        events: EventSink | None = None,
        stream_max_pending_bytes: int = DEFAULT_STREAM_MAX_PENDING_BYTES,
        inflight: InflightBudget | None = None,
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
        self._stream_max_pending_bytes = stream_max_pending_bytes
        self._inflight = inflight

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

    @map_errors
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: _Context
    ) -> pb.ModelConfigResponse:
        return model_config(self._registry.get(request.name, request.version or None))

    @map_errors
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: _Context
    ) -> pb.ModelStatisticsResponse:
        return model_statistics(self._statistics_selection(request.name, request.version))

    def _statistics_selection(self, name: str, version: str) -> list[LiveModel]:
        if not name:
            if version:
                raise InvalidArgument(f"version '{version}' given without a model name")
            return self._registry.all()
        if version:
            return [self._registry.get(name, version)]
        versions = self._registry.versions(name)
        if not versions:
            raise NotFound.model(name)
        return [self._registry.get(name, v) for v in versions]

    # -- inference --------------------------------------------------------------------

    @map_errors
    def ModelInfer(
        self, request: pb.ModelInferRequest, context: _Context
    ) -> Awaitable[pb.ModelInferResponse]:
        # Hands back _infer's coroutine for map_errors to await: one frame less per call.
        return self._infer(request, _deadline(context), "ModelInfer")

    async def _infer(
        self, msg: pb.ModelInferRequest, deadline: float | None, where: str
    ) -> pb.ModelInferResponse:
        model = self._registry.get(msg.model_name, msg.model_version or None)
        started = _now()
        try:
            request = decode_infer_request(msg, model, deadline, max_bytes=self._max_request_bytes)
            decoded = _now()
            result = await model.infer(request)
            inferred = _now()
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
                model.recorder.observe_request(_code_name(failure), _now() - started, None, None)
            if self._errors is not None:
                self._errors.failed(failure, model.name, model.version)
            if failure is exc:
                raise
            raise failure from exc
        recorder = model.recorder
        if recorder is not None:
            timings = result.timings
            finished = _now()
            recorder.observe_request(
                "OK",
                finished - started,
                timings.get("queue_s"),
                timings.get("compute_s"),
                decoded - started,
                finished - inferred,
            )
        return response

    async def ModelStreamInfer(
        self,
        request_iterator: AsyncIterator[Charged | Refused | pb.ModelInferRequest],
        context: _Context,
    ) -> AsyncIterator[bytes]:
        """Yields serialized responses: the server registers this method with no response
        serializer and with ``bounds.parse_charged`` items, so each response's size is
        known exactly (and counted) before it waits for the client to read it."""
        stream = _Stream(
            self,
            _deadline(context),
            self._max_stream_in_flight,
            self._stream_max_pending_bytes,
            self._inflight,
        )
        async for response in stream.run(request_iterator):
            yield response

    async def _stream_one(self, msg: pb.ModelInferRequest, deadline: float | None) -> bytes:
        try:
            response = await self._infer(msg, deadline, "ModelStreamInfer")
            return pb.ModelStreamInferResponse(infer_response=response).SerializeToString()
        except Exception as exc:
            _, message = describe_error(exc, "ModelStreamInfer")
            return _stream_error(message, msg)


def _stream_error(message: str, msg: pb.ModelInferRequest | None) -> bytes:
    """A stream message for a request that failed (same text as a unary call's status)."""
    header = pb.ModelInferResponse()
    if msg is not None:
        header = pb.ModelInferResponse(
            model_name=msg.model_name, model_version=msg.model_version, id=msg.id
        )
    return pb.ModelStreamInferResponse(
        error_message=message, infer_response=header
    ).SerializeToString()


class _Stream:
    """One ModelStreamInfer call: a reader task fans requests out, the caller writes.

    Reading pauses while ``limit`` requests are unanswered or ``max_pending_bytes`` are
    pending: requests still running, counted as the in-flight budget counts them
    (``bounds.charge_of``: their wire size times what decoding and answering add), plus
    the serialized responses the client has not read yet (one request is always let in
    when nothing is pending). So a client that writes and never reads pins about that
    much. Each request also holds its charge against the server-wide ``inflight`` budget
    while it runs; one that does not fit is answered at once with a RESOURCE_EXHAUSTED
    message.
    """

    def __init__(
        self,
        servicer: InferenceServicer,
        deadline: float | None,
        limit: int,
        max_pending_bytes: int,
        inflight: InflightBudget | None,
    ) -> None:
        self._servicer = servicer
        self._deadline = deadline
        self._slots = asyncio.Semaphore(limit)
        self._max_pending_bytes = max_pending_bytes
        self._pending_bytes = 0
        self._freed = asyncio.Event()
        self._inflight = inflight
        self._tasks: set[asyncio.Task[bytes]] = set()
        self._done: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def run(
        self, requests: AsyncIterator[Charged | Refused | pb.ModelInferRequest]
    ) -> AsyncIterator[bytes]:
        reader = asyncio.create_task(self._read(requests))
        try:
            while (response := await self._done.get()) is not None:
                yield response
                # Released once the response has been written.
                self._pending_bytes -= len(response)
                self._slots.release()
                self._freed.set()
            await reader  # surfaces a failed read
        finally:
            reader.cancel()
            for task in list(self._tasks):
                task.cancel()

    async def _read(
        self, requests: AsyncIterator[Charged | Refused | pb.ModelInferRequest]
    ) -> None:
        try:
            async for item in requests:
                await self._slots.acquire()
                if isinstance(item, Refused):
                    self._answer_now(_stream_error(item.problem, None))
                    continue
                if isinstance(item, tuple):
                    msg, charge = item
                else:  # a servicer registered without bounds.parse_charged
                    msg, charge = item, charge_of(item, item.ByteSize())
                await self._room_for(charge)
                self._start(msg, charge)
            if self._tasks:
                await asyncio.wait(list(self._tasks))
        finally:
            self._done.put_nowait(None)

    async def _room_for(self, nbytes: int) -> None:
        while self._pending_bytes and self._pending_bytes + nbytes > self._max_pending_bytes:
            self._freed.clear()
            await self._freed.wait()

    def _answer_now(self, response: bytes) -> None:
        self._pending_bytes += len(response)
        self._done.put_nowait(response)

    def _start(self, msg: pb.ModelInferRequest, charge: int) -> None:
        if self._inflight is not None:
            try:
                self._inflight.take(charge)
            except EdgeserveError as exc:
                self._answer_now(_stream_error(exc.message, msg))
                return
        self._pending_bytes += charge
        task = asyncio.create_task(self._servicer._stream_one(msg, self._deadline))
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._finished(done, charge))

    def _finished(self, task: asyncio.Task[bytes], charge: int) -> None:
        self._tasks.discard(task)
        self._pending_bytes -= charge
        if self._inflight is not None:
            self._inflight.give(charge)
        if not task.cancelled():
            self._answer_now(task.result())
        self._freed.set()
