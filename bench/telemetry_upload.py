"""The telemetry upload case: inference p99 while a backlog uploads, against upload idle.

Issue 9: "inference p99 during the backlog upload within 10 % of p99 with upload off".
The tiny MLP is served by a daemon of its own (``edgeserve-telemetry-upload``: telemetry
at a 1 s interval and 0.1 s samples, the default ``batch_bytes`` and
``upload_bytes_per_s``, ``fleet.broker`` pointing at a local Mosquitto the bench starts,
``bench/broker.py``). Before the daemon starts, its buffer is filled with a backlog of
real sample rows (``prefill``: one ``Rollup.sample()`` of this machine, repeated with
times 0.1 s apart, as a device that was offline for a while leaves them), so the
backlog lasts through every window at the capped rate; more piles up while the broker
is down.

Two cases, the same closed loop (8 in flight, uds) on the same daemon:

* ``mlp-telup-uds-c8-idle``: the broker is stopped (SIGTERM), nothing uploads;
* ``mlp-telup-uds-c8-upload``: the broker runs, the link is connected and the backlog
  is draining (``edgeserve status --json``: ``fleet.connected`` true and
  ``telemetry.backlog_rows`` falling before the window).

They alternate idle, upload in odd repeats and upload, idle in even ones, so a drift of
the machine's load weighs on both. Around each window the bench reads ``edgeserve
status --json`` (backlog rows before and after) and, at the window's edges, what an
observer subscribed to the device's telemetry topic received (messages, payload bytes,
records): the upload rate achieved in the window, against ``upload_bytes_per_s``.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.broker import Broker, Observer
from bench.catalog import DAEMON_TELEMETRY, TELEMETRY_UPLOAD

DEVICE_ID = "bench-upload"
TOPIC = f"edgeserve/v1/devices/{DEVICE_ID}/telemetry"
UPLOAD_BYTES_PER_S = int(DAEMON_TELEMETRY[TELEMETRY_UPLOAD]["upload_bytes_per_s"])
SAMPLE_EVERY_S = float(DAEMON_TELEMETRY[TELEMETRY_UPLOAD]["sample_every_s"])
CONNECT_TIMEOUT_S = 60.0  # the link's reconnect back-off is capped at 30 s
STATUS_TIMEOUT_S = 30.0


def prefill(db: Path, nbytes: int) -> dict[str, Any]:
    """Append sample rows (one real sample, repeated) to the buffer at ``db`` until about
    ``nbytes`` of bodies wait; before the daemon opens the file."""
    from edgeserve.telemetry.buffer import TelemetryBuffer
    from edgeserve.telemetry.events import EventLog
    from edgeserve.telemetry.recorders import Recorders
    from edgeserve.telemetry.rollup import Rollup, iso_time
    from edgeserve.telemetry.sampler import SystemSampler

    db.parent.mkdir(parents=True, exist_ok=True)
    rollup = Rollup(Recorders(), SystemSampler(db.parent), EventLog(), time.time)
    (row,) = rollup.sample()
    size = len(json.dumps(row.body, separators=(",", ":")))
    count = max(1, nbytes // size)
    start = time.time() - count * SAMPLE_EVERY_S
    buffer = TelemetryBuffer(db)
    try:
        for first in range(0, count, 1000):
            rows = [
                dataclasses.replace(row, time=iso_time(start + i * SAMPLE_EVERY_S))
                for i in range(first, min(count, first + 1000))
            ]
            buffer.append(rows)
        stats = buffer.stats()
    finally:
        buffer.close()
    return {"rows": count, "body_bytes": size, "backlog_rows": stats.backlog_rows}


def status(config: Path) -> dict[str, Any]:
    """``edgeserve status --json`` of the upload daemon (exit 0 healthy, 1 degraded)."""
    command = [sys.executable, "-m", "edgeserve", "status", "--config", str(config), "--json"]
    done = subprocess.run(  # noqa: S603 - our interpreter, our arguments
        [*command, "--timeout", "10"], capture_output=True, text=True, timeout=STATUS_TIMEOUT_S
    )
    if done.returncode not in (0, 1):
        raise RuntimeError(f"edgeserve status exited {done.returncode}: {done.stderr[-500:]}")
    return dict(json.loads(done.stdout))


def _backlog(doc: dict[str, Any]) -> int:
    return int(doc["telemetry"]["backlog_rows"] or 0)


class UploadController:
    """Puts the broker in the state a case needs and records the upload around it."""

    def __init__(self, broker: Broker, config: Path) -> None:
        self.broker = broker
        self.config = config
        self.observer: Observer | None = None

    def close(self) -> None:
        self._close_observer()
        self.broker.stop()

    def _close_observer(self) -> None:
        if self.observer is not None:
            self.observer.close()
            self.observer = None

    def edges(self) -> dict[str, float] | None:
        """What the observer has received so far (read at the window's edges)."""
        return self.observer.totals() if self.observer is not None else None

    def before(self, phase: str) -> dict[str, Any]:
        """Stop the broker (idle) or start it and wait until the backlog drains (upload)."""
        if phase == "idle":
            self._close_observer()
            self.broker.stop()
            deadline = time.monotonic() + CONNECT_TIMEOUT_S
            while (doc := status(self.config))["fleet"]["connected"]:
                if time.monotonic() > deadline:
                    raise RuntimeError("telemetry upload: the link stays up without a broker")
                time.sleep(0.2)  # between status reads
            return {"backlog_rows": _backlog(doc), "connected": False}
        self.broker.start()
        if self.observer is None:
            self.observer = Observer(self.broker, TOPIC)
        started = time.monotonic()
        while not (doc := status(self.config))["fleet"]["connected"]:
            if time.monotonic() - started > CONNECT_TIMEOUT_S:
                raise RuntimeError("telemetry upload: the link did not reconnect")
            time.sleep(0.2)  # between status reads
        reconnect_s = time.monotonic() - started
        time.sleep(1.0)  # the status figures refresh once per interval (1 s)
        doc = status(self.config)
        return {"backlog_rows": _backlog(doc), "connected": True, "reconnect_s": reconnect_s}

    def after(self, phase: str, before: dict[str, Any], figures: dict[str, Any]) -> None:
        """Add what the upload did in the window to ``figures["upload"]``."""
        doc = status(self.config)
        found: dict[str, Any] = {
            "phase": phase,
            "backlog_rows_before": before["backlog_rows"],
            "backlog_rows_after": _backlog(doc),
            "rate_cap_bytes_per_s": UPLOAD_BYTES_PER_S,
        }
        if "reconnect_s" in before:
            found["reconnect_s"] = before["reconnect_s"]
        window = figures.pop("window_extra", None)
        if window and window[0] and window[1]:
            first, last = window
            seconds = last["t"] - first["t"]
            found["window_s"] = seconds
            for key in ("messages", "bytes", "records"):
                found[f"uploaded_{key}"] = last[key] - first[key]
            found["upload_bytes_per_s"] = found["uploaded_bytes"] / seconds if seconds else None
            found["upload_vs_cap"] = (found["upload_bytes_per_s"] or 0) / UPLOAD_BYTES_PER_S
        else:
            found.update(uploaded_bytes=0, upload_bytes_per_s=0.0, upload_vs_cap=0.0)
        found["draining"] = (
            phase == "upload"
            and found["uploaded_bytes"] > 0
            and found["backlog_rows_after"] < found["backlog_rows_before"]
            and found["backlog_rows_after"] > 0
        )
        figures["upload"] = found
