"""Structured logs: one JSON event per line, text for humans, and no request payloads."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch

from edgeserve.errors import ConfigError
from edgeserve.logs import PAYLOAD_FIELDS, EventHandler, setup_logging
from edgeserve.proto import kserve_v2_pb2 as pb

SECRET = b"TOP-SECRET-INPUT"


def _events(stream: io.StringIO) -> list[dict]:
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


def test_json_one_event_per_line(root_logger) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream, env={})
    log = logging.getLogger("edgeserve.api")
    log.info("listening on %s", "unix:///run/edgeserve/inference.sock", extra={"port": 8001})
    log.debug("not shown at info")
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        log.exception("load failed for %s", "mlp", extra={"path": Path("/var/lib/x")})
    events = _events(stream)
    assert len(events) == 2 == len(stream.getvalue().splitlines())
    first, second = events
    assert list(first)[:4] == ["ts", "level", "logger", "event"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert (first["level"], first["logger"]) == ("info", "edgeserve.api")
    assert first["event"] == "listening on unix:///run/edgeserve/inference.sock"
    assert first["port"] == 8001
    assert second["level"] == "error"
    assert second["path"] == "/var/lib/x"  # not JSON-native: written with str()
    assert "ValueError: (message withheld" in second["exc"]


def test_text_format(root_logger) -> None:
    stream = io.StringIO()
    setup_logging("DEBUG", "text", stream=stream, env={})
    logging.getLogger("edgeserve.serving").debug("batch of %d", 8, extra={"model": "mlp"})
    line = stream.getvalue().rstrip("\n")
    assert re.fullmatch(r"\S+Z debug +edgeserve\.serving: batch of 8 model='mlp'", line), line


@pytest.mark.parametrize("field", sorted(PAYLOAD_FIELDS))
def test_payload_named_extras_are_redacted(root_logger, field: str) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream, env={})
    logging.getLogger("edgeserve.api").info("request", extra={field: SECRET.decode()})
    assert SECRET.decode() not in stream.getvalue()
    assert _events(stream)[0][field] == "<redacted>"


def test_payload_arguments_are_redacted_whatever_the_logger(root_logger) -> None:
    stream = io.StringIO()
    setup_logging("debug", "json", stream=stream, env={})
    request = pb.ModelInferRequest(model_name="mlp", raw_input_contents=[SECRET])
    tensor = torch.frombuffer(bytearray(SECRET), dtype=torch.uint8)
    array = np.frombuffer(SECRET, dtype=np.uint8)
    careless = logging.getLogger("grpc.somewhere")  # not ours: the guard is on the handler
    careless.warning("raw %s", SECRET)
    careless.warning("request %s", request)
    careless.warning("tensor %s array %s", tensor, array)
    careless.warning("inputs %s", list(request.raw_input_contents))
    careless.warning("by name %(x)s", {"x": bytearray(SECRET)})
    careless.warning(SECRET)  # type: ignore[arg-type]
    careless.warning("extra", extra={"blob": memoryview(SECRET)})
    text = stream.getvalue()
    assert SECRET.decode() not in text
    assert "TOP-SECRET" not in text
    events = [e["event"] for e in _events(stream)]
    assert events[:6] == [
        "raw <redacted 16 bytes>",
        "request <redacted ModelInferRequest>",
        "tensor <redacted Tensor shape=[16]> array <redacted ndarray shape=[16]>",
        "inputs <redacted list of 1 payload items>",
        "by name <redacted 16 bytes>",
        "<redacted 16 bytes>",
    ]
    assert _events(stream)[6]["blob"] == "<redacted 16 bytes>"


def test_third_party_debug_stays_out_at_debug_level(root_logger) -> None:
    stream = io.StringIO()
    setup_logging("debug", "json", stream=stream, env={})
    logging.getLogger("grpc._cython.cygrpc").debug("Loaded running loop")
    logging.getLogger("grpc._cython.cygrpc").info("still noise")
    logging.getLogger("asyncio").warning("slow callback")
    logging.getLogger("edgeserve.serving").debug("batch of 4")
    assert [e["event"] for e in _events(stream)] == ["slow callback", "batch of 4"]


def test_ordinary_arguments_pass_untouched(root_logger) -> None:
    stream = io.StringIO()
    setup_logging("info", "json", stream=stream, env={})
    logging.getLogger("edgeserve.x").info("%s %d %s", "name", 3, [1, 2], extra={"model": "m"})
    assert _events(stream)[0]["event"] == "name 3 [1, 2]"


def test_setup_again_replaces_the_handler(root_logger) -> None:
    first, second = io.StringIO(), io.StringIO()
    setup_logging("info", "json", stream=first, env={})
    setup_logging("warning", "text", stream=second, env={})
    assert len([h for h in root_logger.handlers if isinstance(h, EventHandler)]) == 1
    logging.getLogger("edgeserve.x").warning("once")
    logging.getLogger("edgeserve.x").info("filtered")
    assert first.getvalue() == ""
    assert second.getvalue().count("\n") == 1


def test_journal_stream_gets_syslog_priorities(root_logger) -> None:
    with tempfile.TemporaryFile("w+") as stream:
        st = os.fstat(stream.fileno())
        setup_logging(
            "info", "json", stream=stream, env={"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        )
        log = logging.getLogger("edgeserve.x")
        log.info("fine")
        log.warning("careful")
        log.error("broken")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert [line[:3] for line in lines] == ["<6>", "<4>", "<3>"]
    assert json.loads(lines[0][3:])["event"] == "fine"


def test_another_journal_stream_means_no_prefix(root_logger) -> None:
    with tempfile.TemporaryFile("w+") as stream:
        setup_logging("info", "json", stream=stream, env={"JOURNAL_STREAM": "1:2"})
        logging.getLogger("edgeserve.x").info("fine")
        stream.seek(0)
        assert stream.read().startswith("{")


def test_bad_level_or_format_is_a_config_error(root_logger) -> None:
    with pytest.raises(ConfigError) as err:
        setup_logging("loud", "json", stream=io.StringIO())
    assert err.value.key == "logging.level"
    with pytest.raises(ConfigError) as err:
        setup_logging("info", "xml", stream=io.StringIO())
    assert err.value.key == "logging.format"
