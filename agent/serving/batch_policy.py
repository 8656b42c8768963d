"""When to run a batch: a pure decision plus the two estimates it needs.

Standard library only, and no clock reads: every time is passed in (seconds on one
monotonic clock), so the whole policy runs on a fake clock in tests.

- ``ServiceTimeFit``: exponentially weighted least squares of ``t = a*n + b`` (service
  time of a batch of ``n`` rows). Until it has seen enough batches of at least two sizes
  it is not ``ready``, and the policy then assumes waiting never pays (cold start).
- ``ArrivalRate``: EWMA of the gaps between arrivals, in rows per second; an estimate
  that has gone quiet decays by itself (the gap since the last arrival counts).
- ``decide``: ``Dispatch(n)`` or ``Wait(until)``.

Why waiting can pay: an idle instance that runs ``n`` queued rows now spends
``(a*n + b)/n`` seconds of instance time per row. If it first waits ``w = k/rate`` for
``k`` more rows, it spends ``(w + a*(n+k) + b)/(n+k)`` per row (it sits idle while
waiting). The second is smaller exactly when ``n/rate < b``: while the rows that arrive
during one fixed cost ``b`` outnumber the queue, waiting raises throughput. The sign of
that test does not depend on ``k``, so the best choice is either ``k = 0`` or the
largest ``k`` that arrives before the oldest request's ``max_queue_delay`` runs out (or
that fills the batch). The policy therefore waits only for a finite horizon, re-asks
after about two expected arrivals (``Wait.until``), and never past the delay bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

# Re-check a waiting decision after this many expected inter-arrival gaps.
RECHECK_ARRIVALS = 2.0
# Smallest weighted variance of batch sizes before the slope means anything.
_MIN_SIZE_VARIANCE = 0.2


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Run ``size`` rows now (the batcher may take fewer if requests don't fit exactly)."""

    size: int


@dataclass(frozen=True, slots=True)
class Wait:
    """Ask again at ``until`` (or sooner, when a request arrives); ``inf``: nothing to do."""

    until: float


Decision = Dispatch | Wait


class ServiceTimeFit:
    """Online, exponentially weighted least-squares fit of service time ``a*n + b``.

    Each new point multiplies the old weights by ``decay`` (0.95: half-life ~14 batches),
    so the fit follows a model whose cost drifts (thermal throttling, a neighbour on the
    cores) and forgets slow first runs. ``a`` and ``b`` are clamped at 0.
    """

    def __init__(self, decay: float = 0.95, min_points: int = 8) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self._decay = decay
        self._min_points = min_points
        self._points = 0
        self._w = self._sx = self._sy = self._sxx = self._sxy = 0.0
        self.a = 0.0
        self.b = 0.0
        self.ready = False

    def record(self, n: int, seconds: float) -> None:
        """Add one batch of ``n`` rows that took ``seconds`` from dispatch to results."""
        d = self._decay
        self._w = self._w * d + 1.0
        self._sx = self._sx * d + n
        self._sy = self._sy * d + seconds
        self._sxx = self._sxx * d + n * n
        self._sxy = self._sxy * d + n * seconds
        self._points += 1
        self._refit()

    def predict(self, n: int) -> float:
        return self.a * n + self.b

    def _refit(self) -> None:
        mean_x = self._sx / self._w
        mean_y = self._sy / self._w
        var_x = self._sxx / self._w - mean_x * mean_x
        if var_x < _MIN_SIZE_VARIANCE:
            # One batch size only: the slope is unknown, so is the fixed cost.
            self.ready = False
            return
        cov = self._sxy / self._w - mean_x * mean_y
        a = max(cov / var_x, 0.0)
        self.a = a
        self.b = max(mean_y - a * mean_x, 0.0)
        self.ready = self._points >= self._min_points


class ArrivalRate:
    """Arrival rate in rows per second from arrival timestamps (EWMA of gaps)."""

    def __init__(self, alpha: float = 0.2) -> None:
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._alpha = alpha
        self._last = 0.0
        self._count = 0
        self._gap = 0.0
        self._rows = 1.0

    def record(self, at: float, rows: int = 1) -> None:
        gap = max(at - self._last, 0.0)
        self._last = at
        self._count += 1
        if self._count == 1:
            self._rows = float(rows)
            return
        self._rows += self._alpha * (rows - self._rows)
        if self._count == 2:
            self._gap = gap
        else:
            self._gap += self._alpha * (gap - self._gap)

    def rate(self, now: float) -> float:
        """Rows per second; 0.0 until two arrivals. Quiet time since the last one counts."""
        if self._count < 2:
            return 0.0
        gap = max(self._gap, now - self._last, 1e-9)
        return self._rows / gap


def decide(
    now: float,
    oldest_enqueued_at: float,
    queued: int,
    max_batch_size: int,
    max_queue_delay: float,
    preferred_batch_sizes: Sequence[int],
    arrival_rate: float,
    fit: ServiceTimeFit,
) -> Decision:
    """What an idle instance should do with ``queued`` rows, the oldest enqueued at
    ``oldest_enqueued_at`` (the batcher asks only when an instance is idle).

    1. Empty queue: ``Wait(inf)`` (the batcher asks again on a change).
    2. A full batch (``queued >= max_batch_size``) goes at once.
    3. Before ``oldest + max_queue_delay``, wait only if the fit is ready and waiting for
       the rows expected by then lowers instance time per row (module docstring).
    4. Otherwise dispatch: the largest preferred size ``<= queued``, else all of it.
    """
    if queued <= 0:
        return Wait(math.inf)
    if queued >= max_batch_size:
        return Dispatch(max_batch_size)
    latest = oldest_enqueued_at + max_queue_delay
    if now < latest and fit.ready and arrival_rate > 0.0:
        more = min(max_batch_size - queued, int((latest - now) * arrival_rate))
        if more >= 1 and _waiting_pays(queued, more, arrival_rate, fit):
            recheck = now + min(float(more), RECHECK_ARRIVALS) / arrival_rate
            return Wait(min(recheck, latest))
    return Dispatch(_dispatch_size(queued, preferred_batch_sizes))


def _waiting_pays(queued: int, more: int, rate: float, fit: ServiceTimeFit) -> bool:
    """Instance seconds per row after waiting for ``more`` rows beat running now."""
    now_cost = fit.predict(queued) / queued
    later = queued + more
    later_cost = (more / rate + fit.predict(later)) / later
    return later_cost < now_cost


def _dispatch_size(queued: int, preferred: Sequence[int]) -> int:
    best = 0
    for size in preferred:
        if best < size <= queued:
            best = size
    return best or queued
