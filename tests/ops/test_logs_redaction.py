"""Tracebacks in logs keep frames and types but withhold foreign exception messages."""

from __future__ import annotations

import json
import logging

from edgeserve.errors import InvalidArgument
from edgeserve.logs import JsonFormatter, format_exception_safely


def _record(exc: BaseException) -> logging.LogRecord:
    try:
        raise exc
    except BaseException as caught:
        return logging.LogRecord(
            "edgeserve.test",
            logging.ERROR,
            __file__,
            1,
            "failed",
            (),
            (type(caught), caught, caught.__traceback__),
        )


def test_handler_exception_text_is_withheld_but_frames_and_type_stay():
    record = _record(ValueError("pixel values " + repr(0.1234)))
    event = json.loads(JsonFormatter().format(record))
    assert "0.1234" not in event["exc"]
    assert "ValueError" in event["exc"] and "test_logs_redaction.py" in event["exc"]


def test_our_own_errors_keep_their_message_and_the_chain_is_walked():
    try:
        try:
            raise RuntimeError("secret " + str(6 * 7))
        except RuntimeError as inner:
            raise InvalidArgument.for_input("m", "x", "wrong shape") from inner
    except InvalidArgument as outer:
        text = format_exception_safely((type(outer), outer, outer.__traceback__))
    assert "input 'x': wrong shape" in text
    assert "RuntimeError" in text and "secret 42" not in text
