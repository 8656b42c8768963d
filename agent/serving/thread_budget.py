"""How many intra-op threads an instance gets: measured per model at load, not guessed.

On a 2-core device, OpenMP threads that spin between tiny ops starve the threads that
serve gRPC: a tiny int8 MLP ran 5x slower per batch with 2 intra-op threads than with 1
here. So when the configuration leaves ``intra_op_threads`` open, the lifecycle times
the model on one real input (one row, and a full batch when the model batches) with 1
thread and with the instance's share of the cores, and keeps more threads only when they
are clearly faster (``_MUST_BEAT``) at both sizes.

One exception: a row that takes at least ``_HEAVY_ROW_S`` on one thread. There a team's
wake-ups and barriers are small next to the work, and the one-row comparison measures
mostly noise: issue 12's CNN (2.2-3.0 ms a row)
timed 0.57-1.15 with 2 threads from one load to the next, and kept 1 thread in most
loads, while served with 2 it did 424-493 req/s at 32 in flight against 309-325 with 1,
and 3.3-4.3 ms p50 at 1 in flight against 5.0-5.3 (``python -m bench --only
'cnn-peer-tcp-c1,cnn-peer-tcp-c32' --daemon-threads 2``). Such a model keeps more
threads when they are clearly faster on the full batch and not clearly slower
(``_NOT_SLOWER``) on one row.

The thread counts take turns, run for run, one input size at a time, so that both are
timed under the same conditions: timed one after the other, the count timed second ran
after a full batch had flushed the caches, on a freshly started OpenMP team.
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
# A row this slow on one thread is judged by the full batch; on one row, more threads
# need only not be slower than this factor (see the module docstring).
_HEAVY_ROW_S = 1e-3
_NOT_SLOWER = 1.25
_RUNS_MAX = 50


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
    timings: dict[str, float] = {}
    failure: list[BaseException] = []

    def probe() -> None:
        try:
            with torch.inference_mode():
                for inputs in cases:
                    fastest = _fastest_times(
                        run, inputs, counts, budget_s / len(cases), budget_s / 2
                    )
                    if fastest is None:
                        return  # too slow to time within the budget: keep 1 thread
                    rows = _rows(inputs)
                    timings.update({f"{n}x{rows}": t for n, t in zip(counts, fastest, strict=True)})
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
    return ThreadChoice(max_threads if _pays(timings, cases, max_threads) else 1, timings)


def _pays(timings: dict[str, float], cases: list[Inputs], threads: int) -> bool:
    """Whether ``threads`` beat one thread enough, by the rules of the module docstring."""
    ratios = [timings[f"{threads}x{_rows(c)}"] / timings[f"1x{_rows(c)}"] for c in cases]
    if all(r < _MUST_BEAT for r in ratios):
        return True
    heavy = len(cases) == 2 and timings[f"1x{_rows(cases[0])}"] >= _HEAVY_ROW_S
    return heavy and ratios[1] < _MUST_BEAT and ratios[0] < _NOT_SLOWER


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


def _fastest_times(
    run: Callable[[Inputs], object],
    inputs: Inputs,
    counts: tuple[int, ...],
    budget_s: float,
    give_up_s: float,
) -> list[float] | None:
    """The fastest run of ``inputs`` with each thread count in ``counts``, the counts
    taking turns run for run (one round at least, up to ``_RUNS_MAX`` within
    ``budget_s``). None when a first run takes over ``give_up_s``: too slow to time.

    The fastest run, not the median: loads usually happen beside other work (a swap under
    traffic, several models at start), and contention slows the multi-thread runs most,
    which would bias the choice towards one thread."""
    deadline = time.monotonic() + budget_s
    for threads in counts:  # first calls: allocations, lazy kernel choice, the team's start
        torch.set_num_threads(threads)
        started = time.perf_counter()
        run(inputs)
        if time.perf_counter() - started > give_up_s:
            return None
    fastest = [float("inf")] * len(counts)
    rounds = 0
    while rounds == 0 or (rounds < _RUNS_MAX and time.monotonic() < deadline):
        for index, threads in enumerate(counts):
            torch.set_num_threads(threads)
            started = time.perf_counter()
            run(inputs)
            fastest[index] = min(fastest[index], time.perf_counter() - started)
        rounds += 1
    return fastest
