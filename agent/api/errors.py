"""The one table from ``errors.Kind`` to ``grpc.StatusCode``, applied at one place.

Unary servicer methods are wrapped with ``map_errors``: an ``EdgeserveError`` aborts the
call with the code of its kind and its own message (the core builds messages that name
the model, version or input at fault and never carry tensor data). Any other exception is
a bug or a handler's doing: it is logged with its traceback under a fresh correlation id,
and the reply says only "internal error" plus that id, never ``str(exc)``.

Streaming methods use ``describe_error`` to put the same text into a stream message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from types import MappingProxyType
from typing import TypeVar

import grpc

from edgeserve.errors import EdgeserveError, Kind

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

_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
UnaryMethod = Callable[[_S, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]


def status_of(kind: Kind) -> grpc.StatusCode:
    return STATUS_OF_KIND.get(kind, grpc.StatusCode.INTERNAL)


def new_correlation_id() -> str:
    return uuid.uuid4().hex[:12]


def describe_error(exc: Exception, where: str) -> tuple[grpc.StatusCode, str]:
    """The status code and the client-safe message for ``exc`` raised in ``where``.

    Unexpected exceptions are logged here (traceback, method name, correlation id): the
    one place they are recorded. The request itself is never logged.
    """
    if isinstance(exc, EdgeserveError):
        return status_of(exc.kind), exc.message
    correlation_id = new_correlation_id()
    log.exception("unexpected error in %s (correlation id %s)", where, correlation_id)
    return (
        grpc.StatusCode.INTERNAL,
        f"internal error (correlation id {correlation_id}; see the daemon log)",
    )


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
