"""The telemetry buffer's write cost per interval, with rows a real ``Rollup`` produced.

Run: python -m bench.telemetry_cost [--models 4] [--intervals 40] [--samples-per-interval 10]

A fresh ``TelemetryBuffer`` in a temporary folder (WAL, the default 64 MiB budget), a
``Recorders`` with ``--models`` live model versions and the real ``SystemSampler``; per
interval every model gets a second's worth of a busy edge box (2000 requests with a few
error codes, 100 batches, drift sketches of 20 batches of (n, 64) in and (n, 10) out),
then ``--samples-per-interval`` sample rows are appended one by one (the daemon's
``sample_every_s`` cadence) and ``Rollup.collect`` + ``TelemetryBuffer.append`` close the
interval, as the daemon's telemetry tick does in its worker thread. Nothing is uploaded,
so the backlog grows as it does offline. Timed with ``perf_counter``; the last line
printed is a JSON object of medians and p90s (what ``python -m bench`` keeps), after a
human summary.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

CODES = (("OK", 1980), ("RESOURCE_EXHAUSTED", 15), ("INVALID_ARGUMENT", 4), ("INTERNAL", 1))


def _p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _feed(recorders: Any, count: int, torch: Any) -> None:
    """One interval's traffic into each model's recorder and drift sketch."""
    for index in range(count):
        recorder = recorders.for_model(f"model-{index}", "1")
        observe = recorder.observe_request
        for code, n in CODES:
            for i in range(n):
                total = 0.0005 + (i % 50) * 1e-4
                observe(code, total, total * 0.3, total * 0.6)
        for i in range(100):
            recorder.observe_batch(1 + i % 32, 0.0004 + (i % 7) * 1e-4)
        for i in range(20):
            rows = 1 + i % 32
            inputs = {"x": torch.randn(rows, 64)}
            recorder.drift.observe_batch(inputs, {"y": torch.randn(rows, 10)})


def measure(models: int, intervals: int, samples: int) -> dict[str, Any]:
    import torch

    from edgeserve.telemetry.buffer import TelemetryBuffer
    from edgeserve.telemetry.events import EventLog
    from edgeserve.telemetry.recorders import Recorders
    from edgeserve.telemetry.rollup import Rollup
    from edgeserve.telemetry.sampler import SystemSampler

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="esb-telemetry-") as folder:
        state = Path(folder)
        recorders = Recorders()
        for index in range(models):
            recorders.for_model(f"model-{index}", "1").set_queue_depth_source(lambda: 3)
        events = EventLog()
        rollup = Rollup(recorders, SystemSampler(state), events, time.time)
        buffer = TelemetryBuffer(state / "telemetry.db")
        collect_ms, append_ms, sample_ms, rows_per, bytes_per = [], [], [], [], []
        try:
            rollup.collect()  # the first interval has no "before": not timed
            for interval in range(intervals):
                _feed(recorders, models, torch)
                if interval % 10 == 0:
                    events.record("link", connected=False, reason="bench")
                for _ in range(samples):
                    started = time.perf_counter()
                    buffer.append(rollup.sample())
                    sample_ms.append((time.perf_counter() - started) * 1e3)
                started = time.perf_counter()
                rows = rollup.collect()
                collected = time.perf_counter()
                buffer.append(rows)
                done = time.perf_counter()
                collect_ms.append((collected - started) * 1e3)
                append_ms.append((done - collected) * 1e3)
                rows_per.append(len(rows))
                bytes_per.append(sum(len(json.dumps(r.body)) for r in rows))
            stats = buffer.stats()
        finally:
            buffer.close()
    interval_ms = [
        a + sum(sample_ms[i * samples : (i + 1) * samples]) for i, a in enumerate(append_ms)
    ]
    return {
        "models": models,
        "intervals": intervals,
        "samples_per_interval": samples,
        "rows_per_interval": statistics.median(rows_per),
        "body_bytes_per_interval": statistics.median(bytes_per),
        "collect_ms_p50": statistics.median(collect_ms),
        "append_ms_p50": statistics.median(append_ms),
        "append_ms_p90": _p(append_ms, 0.9),
        "sample_append_ms_p50": statistics.median(sample_ms),
        "sample_append_ms_p90": _p(sample_ms, 0.9),
        "writes_ms_per_interval_p50": statistics.median(interval_ms),
        "backlog_rows_at_end": stats.backlog_rows,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--intervals", type=int, default=40)
    parser.add_argument("--samples-per-interval", type=int, default=10)
    args = parser.parse_args(argv)
    figures = measure(args.models, args.intervals, args.samples_per_interval)
    print(
        f"{figures['models']} models, {figures['rows_per_interval']:.0f} rows "
        f"({figures['body_bytes_per_interval'] / 1024:.1f} KiB) per interval: collect "
        f"{figures['collect_ms_p50']:.2f} ms, append {figures['append_ms_p50']:.2f} ms "
        f"(p90 {figures['append_ms_p90']:.2f}), one sample row "
        f"{figures['sample_append_ms_p50']:.2f} ms; all writes of an interval "
        f"{figures['writes_ms_per_interval_p50']:.2f} ms"
    )
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
