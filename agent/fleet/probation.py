"""Probation: is a freshly swapped-in set worse than the one it replaced, on live traffic?

A breach (``fleet.probation``): a new version's error rate above ``max_error_rate`` once it
served ``min_requests``; or its p99 above ``max_p99_ratio`` times the previous set's p99
(the worst of the previous defaults, taken just before the swap) **and** above
``p99_floor_ms``. Errors are what the daemon did wrong: codes a client caused or a
deadline it set are not counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from edgeserve.config import ProbationConfig
from edgeserve.telemetry.recorders import LATENCY_BOUNDS_S, OK, Recorders, quantile

NOT_ERRORS = {OK, "RESOURCE_EXHAUSTED", "CANCELLED", "DEADLINE_EXCEEDED", "INVALID_ARGUMENT"}


def baseline_p99(recorders: Recorders, previous: Sequence[Mapping[str, Any]]) -> float | None:
    """The worst recent p99 (seconds) of the previous set's default versions, if any."""
    worst = None
    for m in previous:
        if m.get("default"):
            p99 = recorders.for_model(m["name"], m["version"]).snapshot()["window"]["p99_s"]
            if p99 is not None:
                worst = p99 if worst is None else max(worst, p99)
    return worst


def breach(
    recorders: Recorders,
    limits: ProbationConfig,
    new: Sequence[tuple[str, str]],
    baseline: float | None,
) -> str | None:
    """Why the new versions breach probation (the reported reason), or None."""
    for name, version in new:
        snap = recorders.for_model(name, version).snapshot()
        codes: Mapping[str, int] = snap["requests"]
        total = sum(codes.values())
        errors = sum(n for code, n in codes.items() if code not in NOT_ERRORS)
        if total >= limits.min_requests and errors / total > limits.max_error_rate:
            return f"error_rate {name}/{version} {errors}/{total}"
        counts = snap["latency_s"]["total"]["counts"]
        p99 = quantile(LATENCY_BOUNDS_S, counts, 0.99)
        if (
            p99 is not None
            and baseline
            and sum(counts) >= limits.min_requests
            and p99 > limits.max_p99_ratio * baseline
            and p99 * 1000 > limits.p99_floor_ms
        ):
            return f"p99 {name}/{version} {p99 * 1000:.1f} ms"
    return None
