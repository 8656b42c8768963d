"""Events from where they happen, through a real daemon into its real SQLite buffer.

A custom handler (``picky_archive`` in tests/conftest.py) raises on a marked input and,
while a flag file exists, on every input (so a later load fails its warm-up). The daemon
wires its ``EventLog``
into the inference servicer (``error``) and into lifecycle (``deployment``,
``warmup_failure``); the rows are read back from ``telemetry.db`` after a clean stop
(its final collect), with ``TelemetryBuffer.pending``. ``ErrorEvents``' policy (one
event per correlation id, a rate per model version, client codes never) is checked on
the real object with a list as its sink and a hand-driven clock.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import pytest

from edgeserve.api.client import ClientError
from edgeserve.api.errors import ErrorEvents, InternalFailure
from edgeserve.api.management_client import ManagementClient
from edgeserve.errors import HandlerFailed, InvalidArgument, Overloaded
from edgeserve.telemetry.buffer import TelemetryBuffer
from tests.conftest import PICKY_MARK, PICKY_TEXT, DaemonFactory, RunningDaemon
from tests.management.conftest import drop_in, management_address

FAST = "telemetry: {interval_s: 0.5, sample_every_s: 0.5}\n"
GOOD = np.ones((1, 16), dtype=np.float32)


def stored_events(daemon: RunningDaemon) -> list[dict[str, Any]]:
    """Every event row of the daemon's buffer (after it stopped), as upload records."""
    buffer = TelemetryBuffer(daemon.state_dir / "telemetry.db")
    try:
        rows = buffer.pending(1 << 30, 0)
    finally:
        buffer.close()
    return [r.record() for r in rows if r.cls == "event"]


def of_kind(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["body"] for e in events if e["kind"] == kind]


def test_a_failing_request_is_one_error_event_with_the_clients_correlation_id(
    daemons: DaemonFactory, picky_archive: Any
) -> None:
    archive, _ = picky_archive("1")
    daemon = daemons.start(archive, extra_config=FAST)
    marked = np.full((1, 16), PICKY_MARK, dtype=np.float32)
    with daemon.client() as client:
        with pytest.raises(ClientError) as failed:
            client.infer("picky", {"x": marked})
        with pytest.raises(ClientError) as refused:  # client-caused: no event
            client.infer("picky", {"x": np.ones((1, 3), dtype=np.float32)})
        version, _ = client.infer("picky", {"x": GOOD})
    assert failed.value.code.name == "INTERNAL"
    assert refused.value.code.name == "INVALID_ARGUMENT"
    assert PICKY_TEXT not in failed.value.message
    found = re.search(r"correlation id ([0-9a-f]{12})", failed.value.message)
    assert found, failed.value.message
    assert daemon.terminate() == 0

    events = stored_events(daemon)
    errors = of_kind(events, "error")
    assert errors == [
        {
            "code": "INTERNAL",
            "model": "picky",
            "version": version,
            "correlation_id": found.group(1),
            "exception": "RuntimeError",
        }
    ]
    text = json.dumps(events)
    assert PICKY_TEXT not in text and str(PICKY_MARK) not in text
    configured = of_kind(events, "deployment")
    assert configured == [
        {
            "action": "load",
            "model": "picky",
            "version": "1",
            "source": "config",
            "ok": True,
            "default": True,
        }
    ]
    assert "Traceback" not in failed.value.message


def test_management_changes_and_a_failed_warm_up_are_events(
    daemons: DaemonFactory, picky_archive: Any
) -> None:
    first, _ = picky_archive("1")
    second, _ = picky_archive("2")
    broken, flag = picky_archive("3")
    daemon = daemons.start(first, extra_config=FAST)
    with ManagementClient(management_address(daemon)) as manage:
        manage.load(archive=str(drop_in(daemon, second)), make_default=True)
        manage.unload("picky", "1")
        flag.touch()
        with pytest.raises(ClientError):
            manage.load(archive=str(drop_in(daemon, broken)))
    assert daemon.terminate() == 0

    events = stored_events(daemon)
    managed = [e for e in of_kind(events, "deployment") if e["source"] == "management"]
    assert managed == [
        {
            "action": "load",
            "model": "picky",
            "version": "2",
            "source": "management",
            "ok": True,
            "default": True,
        },
        {
            "action": "set_default",
            "model": "picky",
            "version": "2",
            "source": "management",
            "ok": True,
            "previous": "1",
        },
        {"action": "unload", "model": "picky", "version": "1", "source": "management", "ok": True},
        {
            "action": "load",
            "model": "picky",
            "version": "3",
            "source": "management",
            "ok": False,
            "error": "WarmupCheckFailed",
        },
    ]
    [warm_up] = of_kind(events, "warmup_failure")
    assert warm_up["model"] == "picky" and warm_up["version"] == "3"
    assert warm_up["source"] == "management"
    assert re.fullmatch(r"(sample \d+|the synthetic batch) raised ValueError", warm_up["reason"])
    assert PICKY_TEXT not in json.dumps(events)

    again = daemons.start(state_dir=daemon.state_dir, extra_config=FAST)  # restores "2"
    assert again.terminate() == 0
    restored = [e for e in of_kind(stored_events(again), "deployment") if e["source"] == "restore"]
    assert restored == [
        {
            "action": "load",
            "model": "picky",
            "version": "2",
            "source": "restore",
            "ok": True,
            "default": True,
        }
    ]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def failed_batch(correlation_id: str) -> HandlerFailed:
    error = HandlerFailed("m", "1", correlation_id)
    error.__cause__ = KeyError(PICKY_TEXT)
    return error


def test_error_events_one_per_correlation_id_rate_limited_never_for_client_codes() -> None:
    recorded: list[tuple[str, dict[str, Any]]] = []
    clock = Clock()
    events = ErrorEvents(
        lambda kind, **body: recorded.append((kind, body)), burst=2, per_s=0.5, clock=clock
    )
    for _ in range(8):  # one failed batch of 8 requests: one event
        events.failed(failed_batch("aaaaaaaaaaaa"), "m", "1")
    events.failed(InvalidArgument.for_input("m", "x", "bad shape"), "m", "1")
    events.failed(Overloaded.queue_full("m", "1", 4), "m", "1")
    events.failed(InternalFailure("bbbbbbbbbbbb"), "m", "1")
    events.failed(failed_batch("cccccccccccc"), "m", "1")  # over the burst: suppressed
    events.failed(failed_batch("dddddddddddd"), "m", "2")  # another version: its own budget
    clock.now += 2.0  # one token back
    events.failed(failed_batch("eeeeeeeeeeee"), "m", "1")
    assert [(k, b["correlation_id"], b["version"]) for k, b in recorded] == [
        ("error", "aaaaaaaaaaaa", "1"),
        ("error", "bbbbbbbbbbbb", "1"),
        ("error", "dddddddddddd", "2"),
        ("error", "eeeeeeeeeeee", "1"),
    ]
    assert recorded[0][1]["exception"] == "KeyError"
    assert recorded[1][1]["exception"] == "InternalFailure"
    assert recorded[-1][1]["suppressed"] == 1
    assert PICKY_TEXT not in json.dumps(recorded)
