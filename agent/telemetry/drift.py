"""Drift sketches: what the inputs and outputs of one model version looked like, never what
they were.

One ``DriftSketch`` per model version hangs off its ``ModelRecorder`` (``recorder.drift``).
The serving stack calls ``observe_batch(inputs, outputs)`` once per batch that ran, on
the instance thread, with the batch tensors; the rollup calls ``take()`` every interval,
which returns the interval's sketch and starts a new one.

Per tensor (a *row* is one entry along dim 0; with ``sizes`` given, one request's rows)::

    count         rows (or requests) observed
    elements      values observed (for BYTES: items)
    sum, sum_sq   of every value, float64       -> mean, variance (population) of the values
    nonfinite     rows left out because their mean, min or max was NaN or infinite
    per_request   {"mean": H, "min": H, "max": H}: histograms of each row's mean, min, max
    argmax        outputs only, for classifiers (2-D float, >= 2 columns): rows per argmax
                  class, classes >= ARGMAX_CLASSES folded into "other"

BYTES tensors contribute only their items' lengths in bytes (the same fields, of lengths).
Non-float tensors are read as float32.

Histograms ``H`` are sparse: ``{"<bucket index>": count}``, empty buckets left out. The
buckets are fixed, the same everywhere (named by ``BUCKETS``), so sketches merge by
adding: bucket ``i`` holds ``EDGES[i-1] < v <= EDGES[i]`` (index 0: ``v <= -1e6``; index
``len(EDGES)``: ``v > 1e6``). ``EDGES`` are symmetric and log-spaced: ``±10**(k/10)`` for
``k = -60..60`` (ten per decade, 1e-6 to 1e6, rounded to 6 significant digits), plus 0.
``merge(a, b)`` adds two ``take()`` results; mean and variance are derived from the sums.

Cost: the per-row figures are a few torch reductions over the whole batch (``sum``,
``aminmax``, ``vecdot``, ``argmax``), copied to the CPU once per tensor; the buckets are
``numpy.searchsorted`` + ``bincount`` on those few numbers. No Python loop per element
(except BYTES lengths). The lock is held only to add the result. See
``bench/recorder_overhead.py``.

A CPU budget bounds the cost: a sketch spends at most ``budget`` (default 0.2 %) of the
wall time since its last ``take()`` measuring batches; a batch that arrives while the budget is
spent is skipped whole and counted (``batches: {"sketched", "skipped"}``). The first batch
of every interval is sketched. So at low load every batch is sketched, and at high load
the sketch is an unbiased sample of batches, whatever the model's speed: a tiny model
serving thousands of requests a second cannot lose more than ``budget`` of a core to it.
The sketch runs in the batch's own path (before its results are split), so a sketched
batch is late by one sketch (~0.3 ms measured here): 0.2 % keeps that to a few batches a
second, below the p99 of any load where it matters, and still gives each interval tens of
sketched batches.

torch is imported lazily, inside ``observe_batch`` (called only where tensors exist), so
importing the recorders never imports torch.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edgeserve.types import BytesTensor

if TYPE_CHECKING:
    import torch

    from edgeserve.types import TensorValue

log = logging.getLogger("edgeserve.telemetry")

_MAGNITUDES = tuple(float(f"{10.0 ** (k / 10):.6g}") for k in range(-60, 61))
EDGES: tuple[float, ...] = tuple(-m for m in reversed(_MAGNITUDES)) + (0.0,) + _MAGNITUDES
"""Bucket edges of the per-request histograms (243 edges, 244 buckets)."""
BUCKETS = "symlog10:1e-6..1e6"
"""The name of the ``EDGES`` scheme, written into every sketch."""
ARGMAX_CLASSES = 1024
"""Classes 0..1023 are counted apart; higher ones go into ``"other"``."""
STATS = ("mean", "min", "max")

_EDGES = np.asarray(EDGES, dtype=np.float64)
_NBUCKETS = len(EDGES) + 1
_OFFSETS = (np.arange(len(STATS)) * _NBUCKETS)[:, None]

Float64Array = npt.NDArray[np.float64]
Int64Array = npt.NDArray[np.int64]


@dataclass
class _Summary:
    """The running figures of one tensor; plain numbers and dense bucket counts."""

    count: int = 0
    elements: int = 0
    sum: float = 0.0
    sum_sq: float = 0.0
    nonfinite: int = 0
    hist: Int64Array = field(default_factory=lambda: np.zeros(len(STATS) * _NBUCKETS, np.int64))
    argmax: Int64Array | None = None

    def add(self, other: _Summary) -> None:
        self.count += other.count
        self.elements += other.elements
        self.sum += other.sum
        self.sum_sq += other.sum_sq
        self.nonfinite += other.nonfinite
        self.hist += other.hist
        if other.argmax is not None:
            self.argmax = other.argmax.copy() if self.argmax is None else self.argmax + other.argmax

    def as_dict(self) -> dict[str, Any]:
        hist = self.hist.reshape(len(STATS), _NBUCKETS)
        data: dict[str, Any] = {
            "count": self.count,
            "elements": self.elements,
            "sum": self.sum,
            "sum_sq": self.sum_sq,
            "nonfinite": self.nonfinite,
            "per_request": {name: _sparse(hist[i]) for i, name in enumerate(STATS)},
        }
        if self.argmax is not None:
            classes = _sparse(self.argmax[:ARGMAX_CLASSES])
            other = int(self.argmax[ARGMAX_CLASSES])
            data["argmax"] = classes | ({"other": other} if other else {})
        _derive(data)
        return data


class DriftSketch:
    """The drift sketch of one model version; thread-safe. See the module docstring."""

    def __init__(self, budget: float = 0.002, clock: Callable[[], float] = time.perf_counter):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"budget: must be in (0, 1], got {budget}")
        self._lock = threading.Lock()
        self._inputs: dict[str, _Summary] = {}
        self._outputs: dict[str, _Summary] = {}
        self._failures = 0
        self.budget, self._clock = budget, clock
        self._since = clock()  # start of the interval: the budget is a share of the time since
        self._spent = 0.0  # seconds spent measuring in this interval
        self._sketched = self._skipped = 0

    def observe_batch(
        self,
        inputs: Mapping[str, TensorValue],
        outputs: Mapping[str, TensorValue],
        sizes: Sequence[int] | None = None,
    ) -> None:
        """Add one batch. ``sizes``: rows per request (dim 0), to sketch per request;
        None sketches per row. Never raises: a batch it cannot read is counted in
        ``failures`` (see ``take()``) and left out; one over the CPU budget is skipped."""
        started = self._clock()
        with self._lock:
            if self._spent > self.budget * (started - self._since):
                self._skipped += 1
                return
            self._sketched += 1
        try:
            names = [*inputs, *outputs]
            measured = [_tensor_rows(v, False) for v in inputs.values()]
            measured += [_tensor_rows(v, True) for v in outputs.values()]
            summaries = _summarise(measured, sizes)
        except Exception:  # telemetry never breaks serving
            log.debug("drift sketch: a batch could not be measured", exc_info=True)
            with self._lock:
                self._failures += 1
                self._spent += self._clock() - started
            return
        split = len(inputs)
        with self._lock:
            self._spent += self._clock() - started
            for index, (name, summary) in enumerate(zip(names, summaries, strict=True)):
                target = self._inputs if index < split else self._outputs
                mine = target.get(name)
                if mine is None:
                    target[name] = summary
                else:
                    mine.add(summary)

    def take(self) -> dict[str, Any]:
        """The sketch since the previous ``take()`` (JSON-able), and a fresh start."""
        with self._lock:
            inputs, outputs, failures = self._inputs, self._outputs, self._failures
            batches = {"sketched": self._sketched, "skipped": self._skipped}
            self._inputs, self._outputs, self._failures = {}, {}, 0
            self._sketched = self._skipped = 0
            self._since, self._spent = self._clock(), 0.0
        return {
            "buckets": BUCKETS,
            "inputs": {name: s.as_dict() for name, s in sorted(inputs.items())},
            "outputs": {name: s.as_dict() for name, s in sorted(outputs.items())},
            "failures": failures,
            "batches": batches,
        }


def merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    """Two ``take()`` results (same ``BUCKETS``) as one, as if observed together."""
    if a["buckets"] != b["buckets"]:
        raise ValueError(f"drift sketches with different buckets: {a['buckets']}, {b['buckets']}")
    merged: dict[str, Any] = {"buckets": a["buckets"], "failures": a["failures"] + b["failures"]}
    no_batches = {"sketched": 0, "skipped": 0}
    batches_a, batches_b = a.get("batches", no_batches), b.get("batches", no_batches)
    merged["batches"] = {key: batches_a[key] + batches_b[key] for key in no_batches}
    for side in ("inputs", "outputs"):
        names = sorted(set(a[side]) | set(b[side]))
        merged[side] = {name: _merge_one(a[side].get(name), b[side].get(name)) for name in names}
    return merged


def _merge_one(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> dict[str, Any]:
    if a is None or b is None:
        return dict(a or b or {})
    data: dict[str, Any] = {
        key: a[key] + b[key] for key in ("count", "elements", "sum", "sum_sq", "nonfinite")
    }
    data["per_request"] = {
        name: _add_sparse(a["per_request"][name], b["per_request"][name]) for name in STATS
    }
    if "argmax" in a or "argmax" in b:
        data["argmax"] = _add_sparse(a.get("argmax", {}), b.get("argmax", {}))
    _derive(data)
    return data


def _add_sparse(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    total = dict(a)
    for key, n in b.items():
        total[key] = total.get(key, 0) + n
    return dict(sorted(total.items(), key=_bucket_order))


def _bucket_order(item: tuple[str, int]) -> tuple[int, int]:
    key = item[0]
    return (0, int(key)) if key.isdigit() else (1, 0)


def _sparse(counts: Int64Array) -> dict[str, int]:
    return {str(int(i)): int(counts[i]) for i in np.flatnonzero(counts)}


def _derive(data: dict[str, Any]) -> None:
    """Set ``mean`` and ``variance`` (of the values) from ``elements``, ``sum``, ``sum_sq``."""
    n = data["elements"]
    if not n:
        data["mean"] = data["variance"] = None
        return
    mean = data["sum"] / n
    data["mean"] = mean
    data["variance"] = max(data["sum_sq"] / n - mean * mean, 0.0)


@dataclass
class _Rows:
    """One tensor of one batch, reduced per row: ``stats`` is (4, rows) float64 of each
    row's sum, min, max and sum of squares; ``width`` values per row."""

    rows: int
    width: int
    stats: Float64Array
    argmax: Int64Array | None = None


def _summarise(measured: Sequence[_Rows], sizes: Sequence[int] | None) -> list[_Summary]:
    """The summaries of one batch's tensors; one ``searchsorted`` and one ``bincount``
    for all of them."""
    summaries: list[_Summary] = []
    values: list[Float64Array] = []
    offsets: list[int] = []
    lengths: list[int] = []
    for index, rows in enumerate(measured):
        summary, per = _summary_of(rows, sizes)
        summaries.append(summary)
        if per is not None:
            values.append(per.ravel())
            base = index * len(STATS) * _NBUCKETS
            offsets.extend(base + i * _NBUCKETS for i in range(len(STATS)))
            lengths.extend([per.shape[1]] * len(STATS))
    if values:
        flat = np.concatenate(values)
        buckets = np.searchsorted(_EDGES, flat, side="left") + np.repeat(offsets, lengths)
        size = len(STATS) * _NBUCKETS
        counts = np.bincount(buckets, minlength=len(measured) * size).astype(np.int64, copy=False)
        for index, summary in enumerate(summaries):
            summary.hist = counts[index * size : (index + 1) * size]
    return summaries


def _summary_of(rows: _Rows, sizes: Sequence[int] | None) -> tuple[_Summary, Float64Array | None]:
    """The summary (histograms still empty) and the per-request (mean, min, max)."""
    summary = _Summary(argmax=rows.argmax)
    if rows.width == 0 or rows.rows == 0:
        return summary, None
    stats = rows.stats
    counts: Float64Array | float = float(rows.width)
    if sizes and max(sizes) > 1 and min(sizes) > 0 and sum(sizes) == rows.rows:
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        stats = np.stack(
            (
                np.add.reduceat(stats[0], starts),
                np.minimum.reduceat(stats[1], starts),
                np.maximum.reduceat(stats[2], starts),
                np.add.reduceat(stats[3], starts),
            )
        )
        counts = np.asarray(sizes, dtype=np.float64) * rows.width
    if not np.isfinite(stats).all():  # rare: leave such rows (requests) out
        finite = np.isfinite(stats).all(axis=0)
        summary.nonfinite = int((~finite).sum())
        stats = stats[:, finite]
        counts = counts[finite] if isinstance(counts, np.ndarray) else counts
    n = int(stats.shape[1])
    per = stats[:3].copy()
    per[0] /= counts
    totals = stats.sum(axis=1)
    summary.count = n
    summary.elements = int(counts.sum()) if isinstance(counts, np.ndarray) else n * rows.width
    summary.sum = float(totals[0])
    summary.sum_sq = float(totals[3])
    return summary, per


def _tensor_rows(value: TensorValue, output: bool) -> _Rows:
    if isinstance(value, BytesTensor):
        return _bytes_rows(value)
    import torch

    rows = int(value.shape[0]) if value.dim() else 1
    x = value.detach().reshape(rows, -1)
    width = int(x.shape[1])
    if width == 0 or rows == 0:
        return _Rows(rows, width, np.zeros((4, rows)))
    if x.dtype not in (torch.float32, torch.float64):
        x = x.to(torch.float32)
    low, high = torch.aminmax(x, dim=1)
    stats = torch.stack((x.sum(1), low, high, torch.linalg.vecdot(x, x)))
    argmax = None
    if output and value.dim() == 2 and value.is_floating_point() and value.shape[1] >= 2:
        classes = value.argmax(1).clamp_(max=ARGMAX_CLASSES)
        argmax = np.bincount(_numpy(classes), minlength=ARGMAX_CLASSES + 1).astype(
            np.int64, copy=False
        )
    return _Rows(rows, width, _numpy(stats).astype(np.float64, copy=False), argmax)


def _numpy(tensor: torch.Tensor) -> npt.NDArray[Any]:
    """A CPU tensor as a numpy view; any other copied to the CPU first (one transfer)."""
    return (tensor if tensor.device.type == "cpu" else tensor.cpu()).numpy()


def _bytes_rows(value: BytesTensor) -> _Rows:
    rows = value.shape[0] if value.shape else 1
    width = len(value.items) // rows if rows else 0
    if width == 0:
        return _Rows(rows, 0, np.zeros((4, rows)))
    lengths = np.fromiter(map(len, value.items), dtype=np.float64, count=len(value.items))
    grid = lengths.reshape(rows, width)
    stats = np.stack((grid.sum(1), grid.min(1), grid.max(1), (grid * grid).sum(1)))
    return _Rows(rows, width, stats)
