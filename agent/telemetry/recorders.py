"""In-memory recorders for each live model version: counters, fixed-bucket histograms, gauges.

No I/O and no background thread: a served request costs the hot path a clock read and a
deque append; the figures take it in groups of ``FOLD_EVERY`` (one lock, a few bisects
each) or at the next read, whichever comes first (see ``bench/recorder_overhead.py``).
A later rollup turns ``snapshot()`` into rows; ``edgeserve status`` and the Prometheus
endpoint read the same snapshot; the KServe servicer's ModelStatistics (Triton's
statistics extension) reads ``totals()``, cumulative counts and durations kept beside the
histograms by the same calls.

Who calls what::

    recorders = Recorders()                      # built by daemon.py, handed to collaborators
    rec = recorders.for_model("resnet", "2")     # cached; keep the object beside the live model
    rec.set_queue_depth_source(batcher.depth)    # the batcher owns the number; read at snapshot
    rec.observe_load(3.2)                        # lifecycle, after load + warm-up
    rec.observe_request("OK", total_s, queue_s, compute_s, decode_s, encode_s)  # api edge
    rec.observe_batch(8, compute_s)              # worker thread, once per batch
    rec.drift.observe_batch(inputs, outputs)     # instance thread, the batch tensors
    recorders.forget("resnet", "1")              # lifecycle, after the old version drained

Status codes are gRPC status code names (``grpc.StatusCode.X.name``: "OK",
"RESOURCE_EXHAUSTED", ...); this module does not import grpc and counts any name given.

Latency histograms (total, queue and compute time) describe *served* requests: only
``"OK"`` requests go into them, so an overload answered at once with RESOURCE_EXHAUSTED
cannot make p50/p99 look better. Failed requests are counted by code.

Windowed figures for the last minute come from a ring of six 10-second slots, each a
bucket-count array of total latency plus counts by code; p50/p99 merge the slots' bucket
counts and interpolate linearly inside the bucket (as Prometheus' histogram_quantile
does), so their error is bounded by the bucket width. No per-request list is kept.

Thread-safety: ``observe_*`` may be called from the event loop and from worker threads
at once; each ``ModelRecorder`` holds one lock around its writes and its copy in
``snapshot()``. Served requests wait in a deque (appends and pops are atomic) and are
folded in under that lock, by the writer that fills a group or by any reader, so a read
sees every request observed before it. The queue-depth callable is invoked outside the lock.
"""

from __future__ import annotations

import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from edgeserve.telemetry.drift import DriftSketch

log = logging.getLogger("edgeserve.telemetry")

OK = "OK"
"""The status code name of a served request."""

LATENCY_BOUNDS_S: tuple[float, ...] = tuple(
    round(mantissa * 10.0**exp, 6) for exp in range(-4, 1) for mantissa in (1.0, 1.8, 3.2, 5.6)
) + (10.0,)
"""Upper bounds ("le") of the latency buckets, 0.1 ms .. 10 s, four per decade; +Inf after."""
BATCH_SIZE_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128)
"""Upper bounds of the batch size buckets; +Inf after."""
WINDOW_SLOT_S = 10.0
"""Width of one slot of the last-minute ring."""
WINDOW_SLOTS = 6
"""Slots in the ring: the window is WINDOW_SLOTS * WINDOW_SLOT_S = 60 s."""
FOLD_EVERY = 32
"""Served requests queued before the writer folds them into the figures (reads fold first)."""
MAX_BATCH_SIZES_ITEMIZED = 256
"""Distinct batch sizes counted one by one in ``totals()``; a size first seen after that
many is counted only in the executions (a client chooses its batch sizes: bounded)."""

Clock = Callable[[], float]
QueueDepthSource = Callable[[], int]
# One served request until it is folded: (clock time, total, queue, compute, decode, encode).
_Served = tuple[float, float, float | None, float | None, float | None, float | None]


class _Histogram:
    """Fixed-bucket histogram; not locked itself (its owner's lock covers it).

    The count is not stored: it is ``sum(counts)``, computed when read.
    """

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def as_dict(self) -> dict[str, Any]:
        """Plain data: ``bounds``, per-bucket (not cumulative) ``counts`` ending with +Inf."""
        return {
            "bounds": list(self.bounds),
            "counts": list(self.counts),
            "sum": self.sum,
            "count": sum(self.counts),
        }


class _Sum:
    """A running count and total duration; not locked itself (its owner's lock covers it)."""

    __slots__ = ("count", "seconds")

    def __init__(self) -> None:
        self.count = 0
        self.seconds = 0.0

    def frozen(self) -> Duration:
        return Duration(self.count, self.seconds)


def _duration(hist: _Histogram) -> Duration:
    return Duration(sum(hist.counts), hist.sum)


def quantile(bounds: Sequence[float], counts: Sequence[int], q: float) -> float | None:
    """The q-quantile (0..1) estimated from per-bucket counts; None when there are none.

    The rank ``q * total`` is located in its bucket and interpolated linearly between
    the bucket's lower and upper bound (0 below the first). A rank in the +Inf bucket
    gives the highest finite bound, as nothing better is known.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(counts):
        if n and seen + n >= rank:
            if i == len(bounds):
                return float(bounds[-1])
            lower = float(bounds[i - 1]) if i else 0.0
            return lower + (float(bounds[i]) - lower) * max(rank - seen, 0.0) / n
        seen += n
    return float(bounds[-1])


@dataclass(frozen=True)
class Duration:
    """How many times something happened and how long it took in all."""

    count: int
    seconds: float


@dataclass(frozen=True)
class Totals:
    """Cumulative figures of one version since it was loaded (``ModelRecorder.totals``).

    Durations of requests: ``served`` (OK, start to reply) with its ``queue``, ``decode``
    (request to tensors), ``compute`` (its batch's service time) and ``encode`` (outputs
    to reply) parts, and ``failed`` (any other code). ``executions`` batches ran with
    ``rows`` rows in all; ``by_batch_size`` maps a batch size to its batches and their
    service time. ``last_served_at``: epoch seconds of the last OK request, or None.
    """

    served: Duration
    failed: Duration
    queue: Duration
    decode: Duration
    compute: Duration
    encode: Duration
    executions: int
    rows: int
    by_batch_size: dict[int, Duration]
    last_served_at: float | None


class ModelRecorder:
    """Figures of one (model, version). Get it from ``Recorders.for_model``."""

    def __init__(self, name: str, version: str, clock: Clock, wall_clock: Clock) -> None:
        self.name = name
        self.version = version
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._created = clock()
        self._codes: dict[str, int] = {}
        self._total = _Histogram(LATENCY_BOUNDS_S)
        self._queue = _Histogram(LATENCY_BOUNDS_S)
        self._compute = _Histogram(LATENCY_BOUNDS_S)
        self._batch_size = _Histogram(BATCH_SIZE_BOUNDS)
        self._batch_compute = _Histogram(LATENCY_BOUNDS_S)
        # For totals(): sums the histograms do not hold.
        self._failed = _Sum()
        self._decode = _Sum()
        self._encode = _Sum()
        self._by_batch_size: dict[int, _Sum] = {}
        self._last_ok_at: float | None = None
        self._queue_depth: QueueDepthSource | None = None
        self._load_s: float | None = None
        self._last_load_at: float | None = None
        self._warmup_failures = 0
        self.drift = DriftSketch()
        """The drift sketch of this version's inputs and outputs (``telemetry.drift``)."""
        n = len(LATENCY_BOUNDS_S) + 1
        self._slot_keys = [-1] * WINDOW_SLOTS
        self._slot_latency = [[0] * n for _ in range(WINDOW_SLOTS)]
        self._slot_codes: list[dict[str, int]] = [{} for _ in range(WINDOW_SLOTS)]
        self._served: deque[_Served] = deque()

    def observe_request(
        self,
        status: str,
        total_s: float,
        queue_s: float | None,
        compute_s: float | None,
        decode_s: float | None = None,
        encode_s: float | None = None,
    ) -> None:
        """Count one finished request; its times (seconds) enter the histograms if OK
        (``decode_s`` and ``encode_s`` only the totals)."""
        now = self._clock()
        if status == OK:  # queued, folded in groups: no lock per request (module docstring)
            served = self._served
            served.append((now, total_s, queue_s, compute_s, decode_s, encode_s))
            if len(served) >= FOLD_EVERY:
                with self._lock:
                    self._fold()
            return
        key = int(now // WINDOW_SLOT_S)
        with self._lock:
            codes = self._slot(key)[1]
            codes[status] = codes.get(status, 0) + 1
            codes = self._codes
            codes[status] = codes.get(status, 0) + 1
            sums = self._failed
            sums.count += 1
            sums.seconds += total_s

    def _slot(self, key: int) -> tuple[list[int], dict[str, int]]:
        """The ring slot of window ``key`` (reset when it held an older one); the caller
        holds the lock and never asks for a key older than the slot's."""
        slot = key % WINDOW_SLOTS
        if self._slot_keys[slot] != key:
            self._slot_keys[slot] = key
            self._slot_latency[slot] = [0] * (len(LATENCY_BOUNDS_S) + 1)
            self._slot_codes[slot] = {}
        return self._slot_latency[slot], self._slot_codes[slot]

    def _fold(self) -> None:
        """Move the queued served requests into the figures; the caller holds the lock.

        Written flat, with the figures in locals: this runs for every served request. A
        request queued so long that its window slot has since been reused (no write or
        read for a whole minute) is past the window and counts only in the cumulative
        figures.
        """
        served = self._served
        count = len(served)
        if not count:
            return
        pop = served.popleft
        bounds = LATENCY_BOUNDS_S
        slot_keys = self._slot_keys
        total, queue, compute = self._total, self._queue, self._compute
        total_counts, queue_counts, compute_counts = total.counts, queue.counts, compute.counts
        total_sum, queue_sum, compute_sum = total.sum, queue.sum, compute.sum
        decode_n = encode_n = 0
        decode_sum = encode_sum = 0.0
        latency: list[int] | None = None  # the window slot's buckets; None: past the window
        window_codes: dict[str, int] = {}
        in_window = 0  # requests counted into ``latency`` not yet in ``window_codes``
        begins = ends = 0.0  # the clock span of that slot
        at = 0.0
        for _ in range(count):
            at, total_s, queue_s, compute_s, decode_s, encode_s = pop()
            if not begins <= at < ends:  # another slot than the last request's
                if in_window:
                    window_codes[OK] = window_codes.get(OK, 0) + in_window
                    in_window = 0
                key = int(at // WINDOW_SLOT_S)
                begins, ends = key * WINDOW_SLOT_S, (key + 1) * WINDOW_SLOT_S
                latency = None
                if slot_keys[key % WINDOW_SLOTS] <= key:
                    latency, window_codes = self._slot(key)
            bucket = bisect_left(bounds, total_s)
            if latency is not None:
                latency[bucket] += 1
                in_window += 1
            total_counts[bucket] += 1
            total_sum += total_s
            if queue_s is not None:
                queue_counts[bisect_left(bounds, queue_s)] += 1
                queue_sum += queue_s
            if compute_s is not None:
                compute_counts[bisect_left(bounds, compute_s)] += 1
                compute_sum += compute_s
            if decode_s is not None:
                decode_n += 1
                decode_sum += decode_s
            if encode_s is not None:
                encode_n += 1
                encode_sum += encode_s
        if in_window:
            window_codes[OK] = window_codes.get(OK, 0) + in_window
        total.sum, queue.sum, compute.sum = total_sum, queue_sum, compute_sum
        decode, encode = self._decode, self._encode
        decode.count += decode_n
        decode.seconds += decode_sum
        encode.count += encode_n
        encode.seconds += encode_sum
        self._codes[OK] = self._codes.get(OK, 0) + count
        self._last_ok_at = at

    def observe_batch(self, size: int, compute_s: float) -> None:
        """Count one batch the model ran: its size and how long the model took on it."""
        size_bucket = bisect_left(BATCH_SIZE_BOUNDS, size)
        compute_bucket = bisect_left(LATENCY_BOUNDS_S, compute_s)
        with self._lock:
            hist = self._batch_size
            hist.counts[size_bucket] += 1
            hist.sum += size
            hist = self._batch_compute
            hist.counts[compute_bucket] += 1
            hist.sum += compute_s
            sums = self._by_batch_size.get(size)
            if sums is None:
                if len(self._by_batch_size) >= MAX_BATCH_SIZES_ITEMIZED:
                    return
                sums = self._by_batch_size[size] = _Sum()
            sums.count += 1
            sums.seconds += compute_s

    def set_queue_depth_source(self, source: QueueDepthSource | None) -> None:
        """Register the callable that tells the queue depth (read at snapshot time)."""
        self._queue_depth = source

    def observe_load(self, seconds: float) -> None:
        """Record a load (including warm-up) that took ``seconds``; stamps the wall time."""
        with self._lock:
            self._load_s = seconds
            self._last_load_at = self._wall_clock()

    def observe_warmup_failure(self) -> None:
        """Count one warm-up self-check that failed."""
        with self._lock:
            self._warmup_failures += 1

    def snapshot(self) -> dict[str, Any]:
        """Plain data (JSON-able) of cumulative figures and the last minute's."""
        now = self._clock()
        with self._lock:
            self._fold()
            data: dict[str, Any] = {
                "model": self.name,
                "version": self.version,
                "requests": dict(self._codes),
                "latency_s": {
                    "total": self._total.as_dict(),
                    "queue": self._queue.as_dict(),
                    "compute": self._compute.as_dict(),
                },
                "batch_size": self._batch_size.as_dict(),
                "batch_compute_s": self._batch_compute.as_dict(),
                "load_s": self._load_s,
                "last_load_at": self._last_load_at,
                "warmup_failures": self._warmup_failures,
            }
            window = self._window(now)
        data["window"] = window
        data["queue_depth"] = self._read_queue_depth()
        return data

    def totals(self) -> Totals:
        """Cumulative counts and durations (see ``Totals``), read under the lock."""
        now, wall = self._clock(), self._wall_clock()
        with self._lock:
            self._fold()
            last = self._last_ok_at
            return Totals(
                served=_duration(self._total),
                failed=self._failed.frozen(),
                queue=_duration(self._queue),
                decode=self._decode.frozen(),
                compute=_duration(self._compute),
                encode=self._encode.frozen(),
                executions=sum(self._batch_size.counts),
                rows=int(self._batch_size.sum),
                by_batch_size={n: sums.frozen() for n, sums in self._by_batch_size.items()},
                last_served_at=None if last is None else wall - (now - last),
            )

    def _window(self, now: float) -> dict[str, Any]:
        """Merged figures of the slots still inside the window; the caller holds the lock."""
        current = int(now // WINDOW_SLOT_S)
        oldest = current - WINDOW_SLOTS + 1
        latency = [0] * (len(LATENCY_BOUNDS_S) + 1)
        codes: dict[str, int] = {}
        for slot, key in enumerate(self._slot_keys):
            if not oldest <= key <= current:
                continue
            latency = [a + b for a, b in zip(latency, self._slot_latency[slot], strict=True)]
            for code, n in self._slot_codes[slot].items():
                codes[code] = codes.get(code, 0) + n
        span = now - max(oldest * WINDOW_SLOT_S, self._created)
        requests = sum(codes.values())
        return {
            "seconds": span,
            "requests": requests,
            "requests_per_s": requests / span if span > 0 else 0.0,
            "p50_s": quantile(LATENCY_BOUNDS_S, latency, 0.50),
            "p99_s": quantile(LATENCY_BOUNDS_S, latency, 0.99),
            "errors": {code: n for code, n in codes.items() if code != OK},
        }

    def _read_queue_depth(self) -> int | None:
        source = self._queue_depth
        if source is None:
            return None
        try:
            return int(source())
        except Exception:  # a gone batcher must not break status or a scrape
            log.warning(
                "queue depth of model %s version %s could not be read",
                self.name,
                self.version,
                exc_info=True,
            )
            return None


class Recorders:
    """All model recorders of one daemon. ``clock`` is monotonic, ``wall_clock`` epoch time."""

    def __init__(self, clock: Clock = time.monotonic, wall_clock: Clock = time.time) -> None:
        self._clock = clock
        self._wall_clock = wall_clock
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], ModelRecorder] = {}

    def for_model(self, name: str, version: str) -> ModelRecorder:
        """The recorder of (name, version), created on first use and then cached."""
        key = (name, version)
        recorder = self._models.get(key)
        if recorder is None:
            with self._lock:
                recorder = self._models.get(key)
                if recorder is None:
                    recorder = ModelRecorder(name, version, self._clock, self._wall_clock)
                    self._models[key] = recorder
        return recorder

    def forget(self, name: str, version: str) -> None:
        """Drop the figures of (name, version), after unload; unknown pairs are ignored.

        Holders of the old ``ModelRecorder`` may still write to it; nothing reads it.
        """
        with self._lock:
            self._models.pop((name, version), None)

    def models(self) -> list[ModelRecorder]:
        """The recorders of the live model versions, sorted by (name, version)."""
        with self._lock:
            return [recorder for _, recorder in sorted(self._models.items())]

    def snapshot(self) -> dict[str, Any]:
        """Plain data: ``taken_at`` (epoch s), ``window_s`` and one entry per model version."""
        with self._lock:
            recorders = sorted(self._models.items())
        return {
            "taken_at": self._wall_clock(),
            "window_s": WINDOW_SLOTS * WINDOW_SLOT_S,
            "models": [recorder.snapshot() for _, recorder in recorders],
        }
