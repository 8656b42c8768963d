"""How many intra-op threads an instance gets: measured per model at load, not guessed.

On a 2-core device, OpenMP threads that spin between tiny ops starve the threads that
serve gRPC: a tiny int8 MLP ran 5x slower per batch with 2 intra-op threads than with 1
here, and even a small CNN gained nothing. So when the configuration leaves
``intra_op_threads`` open, the lifecycle times the model on one real input (one row, and
a full batch when the model batches) with 1 thread and with the instance's share of the
cores, and keeps more threads only when they are clearly faster at both sizes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from edgeserve.types import BytesTensor, TensorValue

Inputs = Mapping[str, TensorValue]
# More threads must beat one thread by this factor to be worth their spinning.
_MUST_BEAT = 0.8
_RUNS_MIN, _RUNS_MAX = 5, 50


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    """The intra-op thread count chosen."""
    timings_s: dict[str, float]
    """Fastest seconds per run, keyed "<threads>x<rows>"."""

    @property
    def one_thread_s(self) -> float | None:
        """The slowest one-thread figure (the full batch when it was timed)."""
        figures = [v for k, v in self.timings_s.items() if k.startswith("1x")]
        return max(figures) if figures else None


def choose_intra_op_threads(
    run: Callable[[Inputs], object],
    one_row: Inputs,
    full_batch: Inputs | None,
    max_threads: int,
    *,
    budget_s: float = 1.0,
) -> ThreadChoice:
    """Time ``run`` with 1 and ``max_threads`` threads on a fresh thread (OpenMP's thread
    count is per thread) and return the smaller count unless the larger is clearly faster.
    With ``max_threads`` 1 only one thread is timed (the lifecycle still wants the figure).
    """
    counts = (1, max_threads) if max_threads > 1 else (1,)
    cases = [one_row]
    if full_batch is not None and _rows(full_batch) != _rows(one_row):
        cases.append(full_batch)
    per_case = budget_s / (len(counts) * len(cases))
    timings: dict[str, float] = {}
    failure: list[BaseException] = []

    def probe() -> None:
        try:
            with torch.inference_mode():
                for threads in counts:
                    torch.set_num_threads(threads)
                    for inputs in cases:
                        key = f"{threads}x{_rows(inputs)}"
                        timings[key] = _fastest_time(run, inputs, per_case)
                        if timings[key] > budget_s / 2:
                            return  # too slow to time within the budget: keep 1 thread
        except BaseException as exc:  # reported to the caller's thread
            failure.append(exc)

    # A daemon thread: a model that hangs here must not keep the process from exiting.
    worker = threading.Thread(target=probe, name="edgeserve-thread-probe", daemon=True)
    worker.start()
    worker.join()
    if failure:
        raise failure[0]
    if max_threads <= 1 or len(timings) < len(counts) * len(cases):
        return ThreadChoice(1, timings)
    faster = all(
        timings[f"{max_threads}x{_rows(c)}"] < _MUST_BEAT * timings[f"1x{_rows(c)}"] for c in cases
    )
    return ThreadChoice(max_threads if faster else 1, timings)


def full_batch_of(inputs: Inputs, rows: int) -> Inputs:
    """``inputs`` repeated along dim 0 to ``rows`` rows (for a model that batches)."""
    out: dict[str, TensorValue] = {}
    for name, value in inputs.items():
        have = _rows({name: value})
        times = max(1, -(-rows // have))
        if isinstance(value, BytesTensor):
            out[name] = BytesTensor.concat([value] * times).split([rows])[0]
        else:
            out[name] = value.repeat(times, *([1] * (value.dim() - 1)))[:rows]
    return out


def first_row(inputs: Inputs) -> Inputs:
    return {
        name: value.split([1])[0] if isinstance(value, BytesTensor) else value[:1]
        for name, value in inputs.items()
    }


def _rows(inputs: Inputs) -> int:
    value = next(iter(inputs.values()))
    return value.batch_size if isinstance(value, BytesTensor) else int(value.shape[0])


def _fastest_time(run: Callable[[Inputs], object], inputs: Inputs, budget_s: float) -> float:
    """Fastest of up to ``_RUNS_MAX`` runs within ``budget_s`` (a slow model is timed
    once). The fastest run, not the median: loads usually happen beside other work (a
    swap under traffic, several models at start), and contention slows the multi-thread
    runs most, which would bias the choice towards one thread."""
    deadline = time.monotonic() + budget_s
    started = time.perf_counter()
    run(inputs)  # first call: allocations, lazy kernel choice
    first = time.perf_counter() - started
    if first > budget_s:
        return first  # too slow to time more often; warm-up already primed it
    times: list[float] = []
    while not times or (
        time.monotonic() < deadline and (len(times) < _RUNS_MIN or len(times) < _RUNS_MAX)
    ):
        started = time.perf_counter()
        run(inputs)
        times.append(time.perf_counter() - started)
    return min(times)
