"""The front end's own bounds on what callers send: malformed messages and in-flight bytes.

``grpcio`` parses each request with the method's ``request_deserializer`` before any
servicer code runs; the generated one raises ``DecodeError`` on a corrupt message, which
grpcio answers UNKNOWN ("Unexpected <class DecodeError>"). ``bounded_handlers`` swaps in
deserializers that never raise (``parse_request``: the message or ``MALFORMED``;
``parse_charged`` for inference requests: the message and its charge, or a ``Refused``)
and wraps each method so that a malformed message is answered INVALID_ARGUMENT. What
this adds per request is a tuple and a few comparisons: the hot path stays the same.

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
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

from edgeserve.errors import Overloaded

RAW_EXPANSION = 4
"""Bytes held per wire byte of a request with raw contents, until it is answered."""
TYPED_EXPANSION = 8
"""Bytes held per wire byte of a request with typed contents (varints widen up to 8x)."""


class Refused:
    """What a request deserializer gives for bytes it will not hand on: ``problem`` says
    why (INVALID_ARGUMENT), or ``busy`` (RESOURCE_EXHAUSTED: over the in-flight budget)."""

    __slots__ = ("busy", "problem")

    def __init__(self, problem: str, *, busy: bool = False) -> None:
        self.problem = problem
        self.busy = busy


MALFORMED = Refused("malformed request: not a valid protobuf message")
BUSY = Refused("over the in-flight budget", busy=True)

Charged = tuple[Any, int]
"""A parsed request and the bytes it is charged (``charge_of``)."""


def charge_of(message: Any, wire_bytes: int) -> int:
    """Bytes a parsed inference request is expected to hold while it is served."""
    if len(message.raw_input_contents):
        return wire_bytes * RAW_EXPANSION
    return wire_bytes * TYPED_EXPANSION


def parse_request(parse: Callable[[bytes], Message]) -> Callable[[bytes], Any]:
    """A request deserializer that never raises: the message, or ``MALFORMED``."""

    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError:
            return MALFORMED

    return deserialize


def parse_charged(
    parse: Callable[[bytes], Message], budget: InflightBudget | None
) -> Callable[[bytes], Charged | Refused]:
    """For inference requests: (message, charge), ``MALFORMED``, or ``BUSY`` when even
    the smallest charge would not fit (then the bytes are not parsed at all)."""

    def deserialize(data: bytes) -> Charged | Refused:
        size = len(data)
        if budget is not None:
            held = budget.held_bytes
            if held and held + size * RAW_EXPANSION > budget.limit_bytes:
                return BUSY
        try:
            message = parse(data)
        except DecodeError:
            return MALFORMED
        return message, charge_of(message, size)

    return deserialize


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
    budget: InflightBudget | None = None,
    charged: frozenset[str] = frozenset(),
    stream_aware: frozenset[str] = frozenset(),
) -> dict[str, grpc.RpcMethodHandler]:
    """``handlers`` whose requests are parsed without raising: malformed messages answered
    INVALID_ARGUMENT; unary methods in ``charged`` held against ``budget``; methods in
    ``stream_aware`` get the ``parse_charged`` items themselves (they answer a
    ``Refused``) and yield serialized responses (registered without a response
    serializer)."""
    if charged and budget is None:
        raise ValueError("charged methods need a budget")
    bounded: dict[str, grpc.RpcMethodHandler] = {}
    for name, handler in handlers.items():
        if name in charged:
            deserialize = parse_charged(handler.request_deserializer, budget)
        elif name in stream_aware:
            deserialize = parse_charged(handler.request_deserializer, None)
        else:
            deserialize = parse_request(handler.request_deserializer)
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


async def _refuse(context: grpc.aio.ServicerContext, refused: Refused) -> None:
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, refused.problem)


def _unary(behaviour: Any, budget: InflightBudget | None) -> Any:
    if budget is None:

        async def plain(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if type(request) is Refused:
                await _refuse(context, request)
            return await behaviour(request, context)

        return plain

    async def charged(request: Charged | Refused, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Refused):
            if not request.busy:
                await _refuse(context, request)
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, budget.refusal().message)
            raise AssertionError("abort returned")  # it raises; this tells mypy
        message, cost = request
        held = budget.held_bytes  # take(), inlined: this runs once per request
        if held and held + cost > budget.limit_bytes:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, budget.refusal().message)
        budget.held_bytes = held + cost
        try:
            return await behaviour(message, context)
        finally:
            budget.held_bytes -= cost

    return charged


def _unary_stream(behaviour: Any) -> Any:
    if not inspect.isasyncgenfunction(behaviour):  # writes with context.write()

        async def writer(request: Any, context: grpc.aio.ServicerContext) -> None:
            if type(request) is Refused:
                await _refuse(context, request)
            await behaviour(request, context)

        return writer

    async def checked(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if type(request) is Refused:
            await _refuse(context, request)
        async for response in behaviour(request, context):
            yield response

    return checked


def _stream_unary(behaviour: Any) -> Any:
    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        return await behaviour(_messages(requests, context), context)

    return checked


def _stream_stream(behaviour: Any) -> Any:
    if not inspect.isasyncgenfunction(behaviour):  # writes with context.write()

        async def writer(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> None:
            await behaviour(_messages(requests, context), context)

        return writer

    async def checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
        async for response in behaviour(_messages(requests, context), context):
            yield response

    return checked


async def _messages(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext
) -> AsyncIterator[Any]:
    async for request in requests:
        if type(request) is Refused:
            await _refuse(context, request)
        yield request
