"""Cost of the recorders on the hot path: observe_request + observe_batch vs an empty call,
and the drift sketch's observe_batch per batch.

Run: python bench/recorder_overhead.py [--calls N] [--repeats R] [--drift-calls N]

Each repeat times N calls in a loop with perf_counter_ns and keeps the per-call mean;
the report is the median over repeats, the empty-function baseline measured the same way
(so loop overhead is in both), the difference (what recording really adds) and the ratio.
A contended case runs the same from two threads on one recorder.

The drift sketch is timed per batch on one torch thread (as an instance thread runs it):
``drift.observe_batch({"x": (n, 64) fp32}, {"y": (n, 10) fp32})`` for n = 1 and 32, the
median per batch and that divided by n (per request).
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable

from edgeserve.telemetry.drift import DriftSketch
from edgeserve.telemetry.recorders import ModelRecorder, Recorders

DRIFT_BATCHES = (1, 32)


def _empty(
    status: str,
    total_s: float,
    queue_s: float | None,
    compute_s: float | None,
    decode_s: float | None = None,
    encode_s: float | None = None,
) -> None:
    return None


def _per_call_ns(body: Callable[[int], object], calls: int, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        body(calls)
        samples.append((time.perf_counter_ns() - start) / calls)
    return statistics.median(samples)


def _loop_empty(calls: int) -> None:
    for i in range(calls):
        _empty("OK", 0.0021, 0.0004, 0.0015, 0.00002, 0.00001)
        _empty("OK", i * 1e-9, None, None)


def _loop_requests(recorder: ModelRecorder) -> Callable[[int], None]:
    def run(calls: int) -> None:
        observe, batch = recorder.observe_request, recorder.observe_batch
        for i in range(calls):
            observe("OK", 0.0021, 0.0004, 0.0015, 0.00002, 0.00001)
            batch(4 + (i & 7), 0.0015)

    return run


def _loop_errors(recorder: ModelRecorder) -> Callable[[int], None]:
    def run(calls: int) -> None:
        observe = recorder.observe_request
        for _ in range(calls):
            observe("RESOURCE_EXHAUSTED", 0.00002, None, None)

    return run


def _two_threads(body: Callable[[int], None], calls: int, repeats: int) -> float:
    def run(n: int) -> None:
        other = threading.Thread(target=body, args=(n,))
        other.start()
        body(n)
        other.join()

    return _per_call_ns(run, calls, repeats) / 2  # 2*n calls done per repeat


def _drift_per_batch_us(batch: int, calls: int, repeats: int, budget: float) -> float:
    import torch

    torch.set_num_threads(1)
    sketch = DriftSketch(budget=budget)
    inputs = {"x": torch.randn(batch, 64)}
    outputs = {"y": torch.randn(batch, 10)}
    observe = sketch.observe_batch

    def run(n: int) -> None:
        for _ in range(n):
            observe(inputs, outputs)

    run(200)  # warm
    per_call_ns = _per_call_ns(run, calls, repeats)
    sketch.take()
    return per_call_ns / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--drift-calls", type=int, default=5_000)
    args = parser.parse_args()
    recorder = Recorders().for_model("bench", "1")
    recorder.set_queue_depth_source(lambda: 0)
    _loop_requests(recorder)(10_000)  # warm
    empty = _per_call_ns(_loop_empty, args.calls, args.repeats)
    full = _per_call_ns(_loop_requests(recorder), args.calls, args.repeats)
    errors = _per_call_ns(_loop_errors(recorder), args.calls, args.repeats)
    contended = _two_threads(_loop_requests(recorder), args.calls, args.repeats)
    snapshot_ns = _per_call_ns(lambda n: [recorder.snapshot() for _ in range(n)], 2_000, 5)
    rows = [
        ("two empty function calls (baseline)", empty, "ns"),
        ("observe_request(OK, 5 durations) + observe_batch", full, "ns"),
        ("  added by recording", full - empty, "ns"),
        ("  ratio to the baseline", full / empty, "x"),
        ("observe_request(error code) alone", errors, "ns"),
        ("the OK pair from 2 threads at once, per pair", contended, "ns"),
        ("snapshot() of one model version", snapshot_ns / 1000, "us"),
    ]
    for batch in DRIFT_BATCHES:
        # budget 1.0: every batch measured (the cost of one sketch); the default budget
        # with batches back to back: what a saturated model pays on average.
        for budget, what in ((1.0, "every batch"), (DriftSketch().budget, "default budget")):
            per_batch = _drift_per_batch_us(batch, args.drift_calls, args.repeats, budget)
            label = f"drift observe_batch ({what}), batch {batch}"
            rows.append((f"{label}: per batch", per_batch, "us"))
            rows.append((f"{label}: per request", per_batch / batch, "us"))
    print(f"calls per repeat: {args.calls}, repeats: {args.repeats} (median of repeats)")
    for label, value, unit in rows:
        print(f"{label:<64} {value:9.2f} {unit}")


if __name__ == "__main__":
    main()
