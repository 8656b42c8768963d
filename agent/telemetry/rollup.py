"""Rollups and samples: the recorders, the system sampler and the event log become rows.

``daemon.py`` builds one ``Rollup`` and calls, off the event loop or on it (both are
cheap: no I/O beyond the sampler's psutil calls)::

    rollup = Rollup(recorders, sampler, events)
    buffer.append(rollup.collect(time.time()))   # every telemetry.interval_s
    buffer.append(rollup.sample(time.time()))    # every telemetry.sample_every_s

``collect(now)`` returns, in this order:

- one ``rollup`` row of kind ``model`` per live model version: the interval's figures as
  *deltas* since the previous ``collect`` (the recorders' counters are cumulative; the
  previous snapshot of each version is kept here, and a version seen for the first time,
  or a recorder replaced under the same name, starts from zero; a version forgotten since
  the previous ``collect`` gets one last row, so its final requests are not lost)::

      {model, version, interval_s, requests: {code: n},
       latency_s: {bounds, total: {counts, sum}, queue: {..}, compute: {..}},
       batch_size: {bounds, counts, sum}, batch_compute_s: {bounds, counts, sum},
       queue_depth, load_s, warmup_failures, drift}

  ``counts`` are per bucket (not cumulative), ``len(bounds) + 1`` of them, the last one
  +Inf; bucket ``i`` holds ``bounds[i-1] < v <= bounds[i]``. Same bounds everywhere, so
  rows merge by adding. ``requests`` holds every code counted in the interval (latency
  histograms hold only the ``OK`` ones); ``drift`` is ``DriftSketch.take()``.
- one ``rollup`` row of kind ``system``: the sampler's full sample now, plus ``interval``
  figures over the ``sample()`` calls since the previous ``collect`` (CPU mean and max,
  RSS max, lowest disk free). Read the interval's CPU from ``interval``: the sample's own
  ``cpu_percent`` covers only the time since the previous ``sample()``, often the same tick;
- the event rows drained from the ``EventLog`` (a ``drop`` event last, if any were lost).

``sample(now)`` returns one ``sample`` row of kind ``system``: the instantaneous gauges,
flat and small (it is the most frequent row).

Times are ISO 8601 UTC with milliseconds and ``Z``; ``now`` is epoch seconds (wall).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from edgeserve.telemetry.events import EventLog
from edgeserve.telemetry.recorders import ModelRecorder, Recorders
from edgeserve.telemetry.rows import Row, iso_time

MAX_TEMPERATURES = 16
"""Sensor readings kept in a sample row (the hottest first)."""
_LATENCIES = ("total", "queue", "compute")


class Sampler(Protocol):
    """What ``sampler.SystemSampler`` offers."""

    def sample(self) -> dict[str, Any]: ...


@dataclass
class _Previous:
    recorder: ModelRecorder
    snapshot: dict[str, Any]


@dataclass
class _SystemInterval:
    """Running figures over the sample rows of one interval."""

    samples: int = 0
    cpu_sum: float = 0.0
    cpu_max: float | None = None
    process_cpu_sum: float = 0.0
    process_cpu_max: float | None = None
    rss_max: int | None = None
    disk_free_min: int | None = None

    def add(self, gauges: Mapping[str, Any]) -> None:
        self.samples += 1
        cpu, process_cpu = gauges["cpu_percent"], gauges["process_cpu_percent"]
        if cpu is not None:
            self.cpu_sum += cpu
            self.cpu_max = max(cpu, self.cpu_max if self.cpu_max is not None else cpu)
        if process_cpu is not None:
            self.process_cpu_sum += process_cpu
            top = self.process_cpu_max
            self.process_cpu_max = max(process_cpu, top if top is not None else process_cpu)
        rss, free = gauges["rss_bytes"], gauges["disk_free_bytes"]
        self.rss_max = rss if self.rss_max is None else max(rss, self.rss_max)
        if free is not None:
            low = self.disk_free_min
            self.disk_free_min = free if low is None else min(free, low)

    def as_dict(self) -> dict[str, Any]:
        n = self.samples
        return {
            "samples": n,
            "cpu_percent_mean": self.cpu_sum / n if n and self.cpu_max is not None else None,
            "cpu_percent_max": self.cpu_max,
            "process_cpu_percent_mean": (
                self.process_cpu_sum / n if n and self.process_cpu_max is not None else None
            ),
            "process_cpu_percent_max": self.process_cpu_max,
            "rss_bytes_max": self.rss_max,
            "disk_free_bytes_min": self.disk_free_min,
        }


class Rollup:
    """Turns recorders, sampler and events into rows; see the module docstring.

    ``clock`` (epoch seconds) is used when ``collect``/``sample`` get no ``now``.
    Not thread-safe itself: one caller (the daemon's telemetry tick) at a time.
    """

    def __init__(
        self,
        recorders: Recorders,
        sampler: Sampler,
        events: EventLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._recorders = recorders
        self._sampler = sampler
        self._events = events
        self._clock = clock
        self._previous: dict[tuple[str, str], _Previous] = {}
        self._last_collect: float | None = None
        self._interval = _SystemInterval()

    def collect(self, now: float | None = None) -> list[Row]:
        """The interval's rollup rows (models, then system) and the drained events."""
        now = self._clock() if now is None else now
        at = iso_time(now)
        interval_s = None if self._last_collect is None else now - self._last_collect
        self._last_collect = now
        recorders = self._recorders.models()
        live = {(r.name, r.version) for r in recorders}
        # A version forgotten since the last collect gets one last row: its tail.
        gone = [p.recorder for key, p in sorted(self._previous.items()) if key not in live]
        rows = [self._model_row(r, at, interval_s) for r in [*recorders, *gone]]
        for recorder in gone:
            del self._previous[(recorder.name, recorder.version)]
        system = self._sampler.sample()
        system["interval"] = self._interval.as_dict()
        system["interval_s"] = interval_s
        self._interval = _SystemInterval()
        rows.append(Row(cls="rollup", kind="system", body=system, time=at))
        rows.extend(self._events.drain())
        return rows

    def sample(self, now: float | None = None) -> list[Row]:
        """One ``sample`` row of the instantaneous system gauges."""
        now = self._clock() if now is None else now
        gauges = _gauges(self._sampler.sample())
        self._interval.add(gauges)
        return [Row(cls="sample", kind="system", body=gauges, time=iso_time(now))]

    def _model_row(self, recorder: ModelRecorder, at: str, interval_s: float | None) -> Row:
        snapshot = recorder.snapshot()
        drift = recorder.drift.take()
        key = (recorder.name, recorder.version)
        previous = self._previous.get(key)
        before = previous.snapshot if previous and previous.recorder is recorder else None
        self._previous[key] = _Previous(recorder, snapshot)
        body = _model_body(snapshot, before)
        body["interval_s"] = interval_s
        body["drift"] = drift
        return Row(cls="rollup", kind="model", body=body, time=at)


def _model_body(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    """The interval's figures: ``now`` minus ``before`` (None: since the start)."""
    codes_before: Mapping[str, int] = before["requests"] if before else {}
    requests = {
        code: n - codes_before.get(code, 0)
        for code, n in sorted(now["requests"].items())
        if n - codes_before.get(code, 0)
    }
    latency = now["latency_s"]
    latency_before = before["latency_s"] if before else None
    return {
        "model": now["model"],
        "version": now["version"],
        "requests": requests,
        "latency_s": {
            "bounds": latency["total"]["bounds"],
            **{
                name: _delta(latency[name], latency_before[name] if latency_before else None)
                for name in _LATENCIES
            },
        },
        "batch_size": _with_bounds(now, before, "batch_size"),
        "batch_compute_s": _with_bounds(now, before, "batch_compute_s"),
        "queue_depth": now["queue_depth"],
        "load_s": now["load_s"],
        "warmup_failures": now["warmup_failures"] - (before["warmup_failures"] if before else 0),
    }


def _with_bounds(
    now: Mapping[str, Any], before: Mapping[str, Any] | None, name: str
) -> dict[str, Any]:
    return {"bounds": now[name]["bounds"], **_delta(now[name], before[name] if before else None)}


def _delta(now: Mapping[str, Any], before: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per-bucket counts and sum of a histogram's ``as_dict()``, minus an earlier one."""
    if before is None:
        return {"counts": list(now["counts"]), "sum": now["sum"]}
    counts: Sequence[int] = now["counts"]
    return {
        "counts": [a - b for a, b in zip(counts, before["counts"], strict=True)],
        "sum": now["sum"] - before["sum"],
    }


def _gauges(sample: Mapping[str, Any]) -> dict[str, Any]:
    """The flat gauges of a sample row, from ``SystemSampler.sample()``."""
    process, system, disk = sample["process"], sample["system"], sample["disk"]
    temperatures = sorted(
        (t for t in sample["temperatures"] if t["celsius"] is not None),
        key=lambda t: -t["celsius"],
    )[:MAX_TEMPERATURES]
    load = system["load_average"]
    return {
        "cpu_percent": system["cpu_percent"],
        "process_cpu_percent": process["cpu_percent"],
        "rss_bytes": process["rss_bytes"],
        "threads": process["threads"],
        "memory_available_bytes": system["memory_available_bytes"],
        "load_1m": load[0] if load else None,
        "disk_free_bytes": disk["free_bytes"] if disk else None,
        "temperatures_celsius": {f"{t['sensor']}/{t['label']}": t["celsius"] for t in temperatures},
        "gpu_memory": [
            {
                "index": gpu["index"],
                "allocated_bytes": gpu["memory_allocated_bytes"],
                "reserved_bytes": gpu["memory_reserved_bytes"],
                "free_bytes": gpu["memory_free_bytes"],
            }
            for gpu in sample["gpus"]
        ],
    }
