"""The one table from ``errors.Kind`` to ``grpc.StatusCode``, applied at one place.

Unary servicer methods are wrapped with ``map_errors``: an ``EdgeserveError`` aborts the
call with the code of its kind and its own message (the core builds messages that name
the model, version or input at fault and never carry tensor data). Any other exception is
a bug or a handler's doing: it is logged with its traceback under a fresh correlation id,
and the reply says only "internal error" plus that id, never ``str(exc)``.

Streaming methods use ``describe_error`` to put the same text into a stream message.

``ErrorEvents`` turns failed inference requests into telemetry ``error`` events
``{code, model, version, correlation_id, exception}`` (``exception``: the type name of
what model code raised, never its text; no payload). Only server-side failures, those
answered INTERNAL, become events: one per correlation id (a failed batch fails all its
requests under one id), at most ``burst`` in a row per model version and then one per
``1 / per_s`` seconds; the next event says how many were ``suppressed`` before it.
Client-caused codes (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED,
CANCELLED, UNAVAILABLE while a version drains) become no event at all: the rollups count
every request by code per model version and interval already, and an event per request
would let a misbehaving client fill the buffer's never-dropped event class.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

import grpc

from edgeserve.errors import EdgeserveError, HandlerFailed, Kind, clip
from edgeserve.types import EventSink

log = logging.getLogger("edgeserve.api")

STATUS_OF_KIND: Mapping[Kind, grpc.StatusCode] = MappingProxyType(
    {
        Kind.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
        Kind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
        Kind.OVERLOADED: grpc.StatusCode.RESOURCE_EXHAUSTED,
        Kind.EXPIRED: grpc.StatusCode.DEADLINE_EXCEEDED,
        Kind.CANCELLED: grpc.StatusCode.CANCELLED,
        Kind.NOT_READY: grpc.StatusCode.UNAVAILABLE,
        Kind.INTERNAL: grpc.StatusCode.INTERNAL,
        Kind.TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
        Kind.PERMISSION_DENIED: grpc.StatusCode.PERMISSION_DENIED,
        Kind.FAILED_PRECONDITION: grpc.StatusCode.FAILED_PRECONDITION,
        Kind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    }
)

MAX_STATUS_MESSAGE = 512
"""Characters of a status message at most. Client strings in it are clipped where they
are echoed (``errors.clip``); this bound holds whatever a message lists (a model's many
inputs, say): percent-encoded on the wire (up to 9 bytes per character), still under
gRPC's 8 KiB metadata limit."""

_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
UnaryMethod = Callable[[_S, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]


def status_of(kind: Kind) -> grpc.StatusCode:
    return STATUS_OF_KIND.get(kind, grpc.StatusCode.INTERNAL)


def new_correlation_id() -> str:
    return uuid.uuid4().hex[:12]


class InternalFailure(EdgeserveError):
    """An unexpected exception, already logged under ``correlation_id`` (``internal``)."""

    kind = Kind.INTERNAL

    def __init__(self, correlation_id: str) -> None:
        super().__init__(f"internal error (correlation id {correlation_id}; see the daemon log)")
        self.correlation_id = correlation_id


def internal(exc: BaseException, where: str) -> InternalFailure:
    """Log an unexpected ``exc`` raised in ``where`` (traceback, method name, a fresh
    correlation id: the one place it is recorded) and return what the client gets."""
    failure = InternalFailure(new_correlation_id())
    failure.__cause__ = exc  # what an event names (its type, never its text)
    log.error(
        "unexpected error in %s (correlation id %s)", where, failure.correlation_id, exc_info=exc
    )
    return failure


def describe_error(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    """The status code and the client-safe message for ``exc`` raised in ``where``.

    Unexpected exceptions are logged here (``internal``). The request is never logged.
    """
    if isinstance(exc, EdgeserveError):
        return status_of(exc.kind), clip(exc.message, MAX_STATUS_MESSAGE)
    return grpc.StatusCode.INTERNAL, internal(exc, where).message


ERROR_EVENT_BURST = 20
"""``error`` events one model version may record in a row before the rate applies."""
ERROR_EVENTS_PER_S = 0.1
"""Then one per 10 s per model version (about 2 MB a day of a model that always fails)."""
_SEEN_IDS = 256  # correlation ids remembered: a failed batch's requests fail together


class ErrorEvents:
    """Server-side inference failures as ``error`` events (see the module docstring).

    Called on the event loop only (the servicer's failure path), so it holds no lock.
    """

    def __init__(
        self,
        record: EventSink,
        *,
        burst: int = ERROR_EVENT_BURST,
        per_s: float = ERROR_EVENTS_PER_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._record = record
        self._burst = float(burst)
        self._per_s = per_s
        self._clock = clock
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tokens: dict[tuple[str, str], tuple[float, float]] = {}  # (tokens, at)
        self._suppressed: dict[tuple[str, str], int] = {}

    def failed(self, exc: BaseException, model: str, version: str) -> None:
        """A request to ``model``/``version`` failed with ``exc``; maybe one event."""
        if not isinstance(exc, EdgeserveError) or exc.kind is not Kind.INTERNAL:
            return  # client-caused or cancelled: counted by the rollups only
        correlation_id = None
        if isinstance(exc, HandlerFailed | InternalFailure):
            correlation_id = exc.correlation_id
            if correlation_id in self._seen:
                return
            self._seen[correlation_id] = None
            if len(self._seen) > _SEEN_IDS:
                self._seen.popitem(last=False)
        key = (model, version)
        if not self._take(key):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        cause = exc.__cause__
        body: dict[str, object] = {
            "code": status_of(exc.kind).name,
            "model": model,
            "version": version,
            "correlation_id": correlation_id,
            "exception": type(cause if cause is not None else exc).__name__,
        }
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            body["suppressed"] = suppressed
        self._record("error", **body)

    def _take(self, key: tuple[str, str]) -> bool:
        now = self._clock()
        tokens, at = self._tokens.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._per_s)
        if tokens < 1.0:
            self._tokens[key] = (tokens, now)
            return False
        self._tokens[key] = (tokens - 1.0, now)
        return True


def map_errors(method: UnaryMethod[_S, _Req, _Resp]) -> UnaryMethod[_S, _Req, _Resp]:
    """Wrap an async unary servicer method so that errors become gRPC statuses."""
    where = method.__name__

    @functools.wraps(method)
    async def wrapper(self: _S, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            code, message = describe_error(exc, where)
        await context.abort(code, message)
        raise AssertionError("context.abort returned")  # it always raises

    return wrapper
