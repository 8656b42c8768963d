"""The front end's own bounds on what callers send: malformed messages and in-flight bytes.

``grpcio`` parses each request with the method's ``request_deserializer`` before any
servicer code runs; the generated one raises ``DecodeError`` on a corrupt message, which
grpcio answers UNKNOWN ("Unexpected <class DecodeError>"). ``bounded_handlers`` swaps in
``parse_request`` (a ``Received`` carrying the message, its wire size, or the parse
problem) and wraps each method so that a malformed message is answered INVALID_ARGUMENT.

``InflightBudget``: the bytes of the requests the server holds at once (parsed, being
decoded, queued, running), against ``factor x max_message_bytes``. A ModelInfer call is
charged when it arrives and credited when it is answered; a call that does not fit is
answered RESOURCE_EXHAUSTED at once (a call is always admitted when nothing is held, so
``factor < expansion`` does not refuse every maximum-size request). A call that cannot
fit even at the smallest expansion is refused before its message is parsed. The charge
is estimated from the wire size, which is free (reading a bytes field would copy it): a
request with raw contents holds about four times its wire size until it is answered
(measured: the message as received, the parsed message, the tensors decoded from it, and
the answer's copies), one with typed contents up to eight times (a one-byte varint
becomes an 8-byte int64). What grpc core buffers while a message is still arriving is
outside this budget; that is bounded by ``server.max_concurrent_rpcs x
max_message_bytes``.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, NamedTuple

import grpc
from google.protobuf.message import DecodeError, Message

from edgeserve.errors import Overloaded

RAW_EXPANSION = 4
"""Bytes held per wire byte of a request with raw contents, until it is answered."""
TYPED_EXPANSION = 8
"""Bytes held per wire byte of a request with typed contents (varints widen up to 8x)."""


class Received(NamedTuple):
    """One request message as parsed by ``parse_request``: ``message`` is None when the
    bytes were not a valid message, and ``problem`` says why."""

    message: Any
    wire_bytes: int
    problem: str | None = None
    busy: bool = False  # refused unparsed: over the in-flight budget


def parse_request(
    parse: Callable[[bytes], Message], budget: InflightBudget | None = None
) -> Callable[[bytes], Received]:
    """A request deserializer that never raises: a corrupt message becomes a problem; with
    ``budget``, one that cannot fit is not parsed at all (``busy``)."""

    def deserialize(data: bytes) -> Received:
        if budget is not None and not budget.fits(len(data) * RAW_EXPANSION):
            return Received(None, len(data), busy=True)
        try:
            return Received(parse(data), len(data))
        except DecodeError:
            return Received(None, len(data), "malformed request: not a valid protobuf message")

    return deserialize


def charge_of(received: Received) -> int:
    """Bytes a parsed request is expected to hold while it is served."""
    message = received.message
    if message is not None and len(getattr(message, "raw_input_contents", ())) == 0:
        return received.wire_bytes * TYPED_EXPANSION
    return received.wire_bytes * RAW_EXPANSION


class InflightBudget:
    """Bytes of requests held at once, across every call; ``take`` or refuse, ``give``."""

    def __init__(self, limit_bytes: int) -> None:
        if limit_bytes < 1:
            raise ValueError(f"limit_bytes must be >= 1, got {limit_bytes}")
        self.limit_bytes = limit_bytes
        self.held_bytes = 0

    def fits(self, nbytes: int) -> bool:
        held = self.held_bytes
        return not held or held + nbytes <= self.limit_bytes

    def take(self, nbytes: int) -> None:
        """Hold ``nbytes``; ``Overloaded`` (RESOURCE_EXHAUSTED) when they do not fit."""
        if not self.fits(nbytes):
            raise self.refusal()
        self.held_bytes += nbytes

    def refusal(self) -> Overloaded:
        return Overloaded(
            f"server busy: {self.held_bytes} request bytes in flight, limit "
            f"{self.limit_bytes} (server.inflight_bytes_factor x server.max_message_bytes); "
            "retry later"
        )

    def give(self, nbytes: int) -> None:
        self.held_bytes -= nbytes


# -- handler rewriting ----------------------------------------------------------------------


class _Capture:
    """Stands in for a server in a generated ``add_*_to_server``: keeps its handlers."""

    def __init__(self) -> None:
        self.service = ""
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        pass  # the same handlers arrive in add_registered_method_handlers

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler]
    ) -> None:
        self.service = service
        self.handlers = dict(handlers)


def captured_handlers(
    add_to_server: Callable[[Any, Any], None], servicer: Any
) -> tuple[str, dict[str, grpc.RpcMethodHandler]]:
    """(service name, method -> handler) as a generated ``add_*_to_server`` would add them."""
    capture = _Capture()
    add_to_server(servicer, capture)
    return capture.service, capture.handlers


def bounded_handlers(
    handlers: Mapping[str, grpc.RpcMethodHandler],
    *,
    budget: InflightBudget,
    charged: frozenset[str],
    stream_aware: frozenset[str],
) -> dict[str, grpc.RpcMethodHandler]:
    """``handlers`` with requests parsed by ``parse_request``: malformed messages answered
    INVALID_ARGUMENT; unary methods in ``charged`` held against ``budget``; methods in
    ``stream_aware`` get the ``Received`` items themselves (they answer problems) and
    yield serialized responses (registered without a response serializer)."""
    bounded: dict[str, grpc.RpcMethodHandler] = {}
    for name, handler in handlers.items():
        deserialize = parse_request(
            handler.request_deserializer, budget if name in charged else None
        )
        serialize = None if name in stream_aware else handler.response_serializer
        if handler.unary_unary is not None:
            behaviour = _unary(handler.unary_unary, budget if name in charged else None)
            bounded[name] = grpc.unary_unary_rpc_method_handler(
                behaviour, request_deserializer=deserialize, response_serializer=serialize
            )
        elif handler.unary_stream is not None:
            bounded[name] = grpc.unary_stream_rpc_method_handler(
                _unary_stream(handler.unary_stream),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
        elif handler.stream_unary is not None:
            bounded[name] = grpc.stream_unary_rpc_method_handler(
                handler.stream_unary
                if name in stream_aware
                else _stream_unary(handler.stream_unary),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
        else:
            bounded[name] = grpc.stream_stream_rpc_method_handler(
                handler.stream_stream
                if name in stream_aware
                else _stream_stream(handler.stream_stream),
                request_deserializer=deserialize,
                response_serializer=serialize,
            )
    return bounded


async def _refuse(context: grpc.aio.ServicerContext, problem: str) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)


def _unary(behaviour: Any, budget: InflightBudget | None) -> Any:
    if budget is None:

        async def plain(received: Received, context: grpc.aio.ServicerContext) -> Any:
            if received.problem is not None:
                await _refuse(context, received.problem)
            return await behaviour(received.message, context)

        return plain

    async def charged(received: Received, context: grpc.aio.ServicerContext) -> Any:
        if received.problem is not None:
            await _refuse(context, received.problem)
        cost = charge_of(received)
        if received.busy or not budget.fits(cost):
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, budget.refusal().message)
        budget.take(cost)
        try:
            return await behaviour(received.message, context)
        finally:
            budget.give(cost)

    return charged


def _unary_stream(behaviour: Any) -> Any:
    if not inspect.isasyncgenfunction(behaviour):  # writes with context.write()

        async def writer(received: Received, context: grpc.aio.ServicerContext) -> None:
            if received.problem is not None:
                await _refuse(context, received.problem)
            await behaviour(received.message, context)

        return writer

    async def checked(received: Received, context: grpc.aio.ServicerContext) -> Any:
        if received.problem is not None:
            await _refuse(context, received.problem)
        async for response in behaviour(received.message, context):
            yield response

    return checked


def _stream_unary(behaviour: Any) -> Any:
    async def checked(requests: AsyncIterator[Received], context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(_messages(requests, context), context)

    return checked


def _stream_stream(behaviour: Any) -> Any:
    if not inspect.isasyncgenfunction(behaviour):  # writes with context.write()

        async def writer(
            requests: AsyncIterator[Received], context: grpc.aio.ServicerContext
        ) -> None:
            await behaviour(_messages(requests, context), context)

        return writer

    async def checked(requests: AsyncIterator[Received], context: grpc.aio.ServicerContext) -> Any:
        async for response in behaviour(_messages(requests, context), context):
            yield response

    return checked


async def _messages(
    requests: AsyncIterator[Received], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for received in requests:
        if received.problem is not None:
            await _refuse(context, received.problem)
        yield received.message
