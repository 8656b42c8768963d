"""Structured logging: one event per line on stdout, where journald (or a shipper) takes it.

``json`` lines look like::

    {"ts":"2025-01-02T03:04:05.678Z","level":"info","logger":"edgeserve.api","event":"listening on unix:///run/edgeserve/inference.sock","addr":"..."}

``event`` is the %-formatted message; any ``extra={...}`` fields follow. ``text`` is the
same for humans. When stdout is journald's stream (``$JOURNAL_STREAM`` names it), each line
starts with a ``<N>`` syslog priority that journald strips and keeps as the entry's
priority, so ``journalctl -p warning -u edgeserve`` works.

A ``PayloadGuard`` filter sits on the handler, so it sees every record, whichever logger
emitted it: extra fields named like request data (``PAYLOAD_FIELDS``) and arguments that
are raw bytes, tensors, arrays or protobuf messages are replaced with a short description
(type, size, shape), never their contents. A careless ``log.debug("%s", request)`` cannot
leak inputs into the journal.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Mapping
from typing import Any, TextIO

from edgeserve.config import LogFormat, LogLevel
from edgeserve.errors import ConfigError, EdgeserveError

PAYLOAD_FIELDS = frozenset(
    {
        "payload",
        "inputs",
        "outputs",
        "raw_input_contents",
        "raw_output_contents",
        "contents",
        "data",
        "tensor",
        "tensors",
        "body",
        "request",
        "response",
    }
)
_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_SYSLOG_PRIORITY = {10: 7, 20: 6, 30: 4, 40: 3, 50: 2}
_STANDARD_ATTRS = frozenset(
    {*logging.LogRecord("", 0, "", 0, "", (), None).__dict__, "message", "asctime", "taskName"}
)
_TENSOR_TYPES = frozenset({"Tensor", "Parameter", "ndarray", "BytesTensor"})


class PayloadGuard(logging.Filter):
    """Redacts payload-like extras and arguments in place; never drops the event itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name in PAYLOAD_FIELDS.intersection(record.__dict__):
            record.__dict__[name] = "<redacted>"
        if _is_payload(record.msg):
            record.msg, record.args = _describe(record.msg), None
        if isinstance(record.args, tuple):
            record.args = tuple(_redact(a) for a in record.args)
        elif isinstance(record.args, Mapping):
            record.args = {k: _redact(v) for k, v in record.args.items()}
        for name in set(record.__dict__) - _STANDARD_ATTRS:
            if _is_payload(record.__dict__[name]):
                record.__dict__[name] = _describe(record.__dict__[name])
        return True


def format_exception_safely(exc_info: Any) -> str:
    """A traceback whose exception *messages* are withheld, except our own.

    Model and handler code may put input values into an exception's text (``ValueError:
    bad pixel 0.1234``); frames and exception types are what debugging needs, and the
    messages of ``EdgeserveError`` are built from names, never from request data.
    """
    _, exc, _ = exc_info
    lines: list[str] = []
    chain: list[BaseException] = []
    while exc is not None and exc not in chain:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for i, item in enumerate(reversed(chain)):
        if i:
            lines.append("\nwhich led to:\n")
        lines.extend(traceback.format_tb(item.__traceback__))
        name = type(item).__qualname__
        if isinstance(item, EdgeserveError):
            lines.append(f"{name}: {item}")
        else:
            lines.append(f"{name}: (message withheld: it may carry request data)")
    return "Traceback (most recent call last):\n" + "".join(lines)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        event: dict[str, Any] = {
            "ts": _timestamp(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name, value in _extras(record).items():
            event[name if name not in event else f"extra_{name}"] = value
        if record.exc_info:
            event["exc"] = format_exception_safely(record.exc_info)
        if record.stack_info:
            event["stack"] = self.formatStack(record.stack_info)
        return json.dumps(event, default=str, ensure_ascii=False, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """``ts level logger: event key=value ...``; tracebacks follow on their own lines."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(f"{k}={v!r}" for k, v in _extras(record).items())
        line = (
            f"{_timestamp(record.created)} {record.levelname.lower():<8} {record.name}: "
            f"{record.getMessage()}{' ' + extras if extras else ''}"
        )
        if record.exc_info:
            line += "\n" + format_exception_safely(record.exc_info)
        return line


class _JournalPrefix(logging.Formatter):
    """Wraps a formatter and puts journald's ``<N>`` priority before each line."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self._inner = inner

    def format(self, record: logging.LogRecord) -> str:
        prio = _SYSLOG_PRIORITY.get(record.levelno - record.levelno % 10, 6)
        return "\n".join(f"<{prio}>{line}" for line in self._inner.format(record).split("\n"))


class EventHandler(logging.StreamHandler[TextIO]):
    """The handler ``setup_logging`` installs on the root logger (one at a time)."""


def setup_logging(
    level: LogLevel | str,
    fmt: LogFormat | str,
    *,
    stream: TextIO | None = None,
    env: Mapping[str, str] = os.environ,
) -> EventHandler:
    """Send every logger's events to ``stream`` (default stdout), guarded and formatted.

    Sets the ``edgeserve`` loggers to ``level`` and the root logger (everyone else's) to
    ``level`` or warning, whichever is higher. Replaces a handler an earlier call installed,
    so it is safe to call again (on reload).
    Raises ``ConfigError`` naming ``logging.level`` / ``logging.format`` for bad values.
    """
    levelno = _LEVELS.get(str(level).lower())
    if levelno is None:
        raise ConfigError("logging.level", f"must be one of {', '.join(_LEVELS)}, got {level!r}")
    if fmt not in ("json", "text"):
        raise ConfigError("logging.format", f"must be json or text, got {fmt!r}")
    out = stream if stream is not None else sys.stdout
    formatter: logging.Formatter = JsonFormatter() if fmt == "json" else TextFormatter()
    if _is_journal(out, env):
        formatter = _JournalPrefix(formatter)
    handler = EventHandler(out)
    handler.setFormatter(formatter)
    handler.addFilter(PayloadGuard())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, EventHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    # Our loggers at the level asked for; everyone else's (grpc, asyncio) at warning or
    # above: at debug, grpc alone writes several lines per request.
    logging.getLogger("edgeserve").setLevel(levelno)
    root.setLevel(max(levelno, logging.WARNING))
    return handler


def _timestamp(created: float) -> str:
    millis = int(created * 1000) % 1000
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD_ATTRS}


def _is_payload(value: Any) -> bool:
    if isinstance(value, bytes | bytearray | memoryview):
        return True
    cls = type(value)
    if cls.__name__ in _TENSOR_TYPES or cls.__module__.startswith("google.protobuf"):
        return True
    return hasattr(value, "DESCRIPTOR") and hasattr(value, "SerializeToString")


def _describe(value: Any) -> str:
    if isinstance(value, bytes | bytearray | memoryview):
        return f"<redacted {len(value)} bytes>"
    shape = getattr(value, "shape", None)
    if shape is not None:
        return f"<redacted {type(value).__name__} shape={list(shape)}>"
    return f"<redacted {type(value).__name__}>"


def _redact(arg: Any) -> Any:
    if _is_payload(arg):
        return _describe(arg)
    if isinstance(arg, list | tuple) and any(_is_payload(x) for x in arg[:8]):
        return f"<redacted {type(arg).__name__} of {len(arg)} payload items>"
    if isinstance(arg, dict) and any(_is_payload(v) for v in list(arg.values())[:8]):
        return f"<redacted dict with keys {sorted(map(str, arg))[:8]}>"
    return arg


def _is_journal(stream: TextIO, env: Mapping[str, str]) -> bool:
    """True when ``stream`` is the journald stream systemd gave us ($JOURNAL_STREAM=dev:ino)."""
    dev, _, ino = env.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))
