"""Ratios against the references, and issue 3's targets, from the figures of one repeat.

Every function here reads one repeat (``{"cases": {name: figures}, "raw": {model: ...},
"idle": ..., "baselines": ...}``) and returns numbers or None when a figure it needs
was not measured (a case left out by ``--only``). The bench takes medians over repeats
of these per-repeat values, so each ratio pairs figures measured minutes apart, not
the medians of different runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bench.cases import ECHO, Case
from bench.catalog import MODELS

Repeat = dict[str, Any]
FULL_BATCH = 32  # the largest batch 32 callers can form (and the archives' max_batch_size)
MAX_QUEUE_DELAY_MS = 2.0  # the archives' default, which the bench does not override


def _get(repeat: Repeat, case: str, key: str) -> float | None:
    figures = repeat["cases"].get(case)
    value = figures.get(key) if figures else None
    return float(value) if isinstance(value, int | float) else None


def _div(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _sub(a: float | None, b: float | None) -> float | None:
    return a - b if a is not None and b is not None else None


def echo_counterpart(case: Case) -> str | None:
    """The echo case a case is compared with: same transport and in-flight count (a
    stream is compared with the *unary* echo at the same count, as the target says)."""
    if case.target == ECHO or case.kind == "open":
        return None
    return f"{ECHO}-{case.transport}-c{case.concurrency}"


def case_ratios(repeat: Repeat, case: Case) -> dict[str, float | None]:
    """Throughput and latency of ``case`` against the echo ceiling and raw torch."""
    out: dict[str, float | None] = {}
    echo = echo_counterpart(case)
    if echo is not None:
        out["vs_echo_throughput"] = _div(
            _get(repeat, case.name, "throughput"), _get(repeat, echo, "throughput")
        )
        out["vs_echo_p50_delta_ms"] = _sub(
            _get(repeat, case.name, "p50_ms"), _get(repeat, echo, "p50_ms")
        )
        out["vs_echo_server_cpu_per_request"] = _div(
            _get(repeat, case.name, "server_us_per_request"),
            _get(repeat, echo, "server_us_per_request"),
        )
    baseline = MODELS[case.target].baseline if case.target != ECHO else None
    if baseline is not None and case.kind == "closed":
        other = f"{baseline}-{case.transport}-c{case.concurrency}"
        for key in ("throughput", "p50_ms", "p99_ms"):
            out[f"vs_{baseline}_{key}"] = _div(
                _get(repeat, case.name, key), _get(repeat, other, key)
            )
    if case.phase == "upload":  # the telemetry upload case against the same load, idle
        idle = case.name.removesuffix("-upload") + "-idle"
        for key in ("throughput", "p50_ms", "p99_ms"):
            out[f"vs_idle_{key}"] = _div(_get(repeat, case.name, key), _get(repeat, idle, key))
    raw = repeat.get("raw", {}).get(MODELS[case.model].raw_key)
    if raw and case.target != ECHO:
        out["vs_raw_throughput"] = _div(
            _get(repeat, case.name, "throughput"), raw["best_throughput"]
        )
        out["vs_raw_p50_delta_ms"] = _sub(
            _get(repeat, case.name, "p50_ms"), raw["batch1"]["p50_ms"]
        )
    return out


@dataclass(frozen=True)
class Target:
    key: str
    text: str
    threshold: str
    measure: Callable[[Repeat], float | None]
    passes: Callable[[float], bool]
    unit: str = ""


def _full_batch_ms(repeat: Repeat) -> float | None:
    raw = repeat.get("raw", {}).get("cnn")
    return raw["sweep"][str(FULL_BATCH)]["call_ms"] if raw else None


def _cnn_p99_vs_bound(transport: str) -> Callable[[Repeat], float | None]:
    def measure(repeat: Repeat) -> float | None:
        full = _full_batch_ms(repeat)
        bound = 2 * full + MAX_QUEUE_DELAY_MS if full is not None else None
        return _div(_get(repeat, f"cnn-{transport}-c32", "p99_ms"), bound)

    return measure


def _open_stability(case: str) -> Callable[[Repeat], float | None]:
    def measure(repeat: Repeat) -> float | None:
        figures = repeat["cases"].get(case)
        if not figures:
            return None
        if figures["errors"]:
            return float("inf")
        return _div(figures["p99_second_half_ms"], figures["p99_first_half_ms"])

    return measure


def _overload_p99_vs_bound(repeat: Repeat) -> float | None:
    """p99 of admitted requests against the time a full queue takes to drain (queue
    size / capacity) plus two full-batch service times and the queue delay."""
    figures = repeat["cases"].get("cnn-uds-open300")
    full = _full_batch_ms(repeat)
    if not figures or full is None or not figures.get("capacity"):
        return None
    drain_ms = repeat.get("max_queue_size", 256) / figures["capacity"] * 1e3
    return _div(figures["p99_ms"], drain_ms + 2 * full + MAX_QUEUE_DELAY_MS)


def _overload_shape(repeat: Repeat) -> float | None:
    """Share of offered requests rejected; inf when any other error appeared."""
    figures = repeat["cases"].get("cnn-uds-open300")
    if not figures:
        return None
    other = {k: v for k, v in figures["errors"].items() if k != "RESOURCE_EXHAUSTED"}
    if other:
        return float("inf")
    total = figures["ok"] + figures["rejected"]
    return figures["rejected"] / total if total else None


def _idle(key: str, base: str | None = None) -> Callable[[Repeat], float | None]:
    def measure(repeat: Repeat) -> float | None:
        idle = repeat.get("idle")
        if not idle:
            return None
        value = float(idle[key])
        return value - float(repeat["baselines"][base]) if base else value

    return measure


def _c(case: str, key: str) -> Callable[[Repeat], float | None]:
    return lambda r: _get(r, case, key)


def _ratio(a: str, b: str, key: str) -> Callable[[Repeat], float | None]:
    return lambda r: _div(_get(r, a, key), _get(r, b, key))


def _delta(a: str, b: str, key: str) -> Callable[[Repeat], float | None]:
    return lambda r: _sub(_get(r, a, key), _get(r, b, key))


def _growth(case: str) -> Callable[[Repeat], float | None]:
    return lambda r: _sub(_get(r, case, "rss_end_mb"), _get(r, case, "rss_start_mb"))


def _batching_gap(t: str) -> Callable[[Repeat], float | None]:
    def measure(repeat: Repeat) -> float | None:
        ratio = _div(
            _get(repeat, f"mlp-{t}-c1", "p50_ms"), _get(repeat, f"mlp-nobatch-{t}-c1", "p50_ms")
        )
        return abs(ratio - 1.0) if ratio is not None else None

    return measure


def _raw_ratio(case: str) -> Callable[[Repeat], float | None]:
    def measure(repeat: Repeat) -> float | None:
        raw = repeat.get("raw", {}).get("cnn")
        return _div(_get(repeat, case, "throughput"), raw["best_throughput"] if raw else None)

    return measure


def targets() -> list[Target]:
    """Issue 3's targets (DESIGN.md section 9), each as a measurable number."""
    rows = [
        Target(
            "c1_tcp_p50",
            "c=1 MLP p50 over TCP minus echo p50 over TCP",
            "<= 0.15 ms",
            _delta("mlp-tcp-c1", "echo-tcp-c1", "p50_ms"),
            lambda v: v <= 0.15,
            " ms",
        ),
        Target(
            "c1_uds_p50",
            "c=1 MLP p50 over UDS minus echo p50 over TCP",
            "<= 0.15 ms",
            _delta("mlp-uds-c1", "echo-tcp-c1", "p50_ms"),
            lambda v: v <= 0.15,
            " ms",
        ),
        Target(
            "c1_uds_vs_tcp",
            "c=1 MLP p50 UDS / TCP",
            "< 1 (UDS lower)",
            _ratio("mlp-uds-c1", "mlp-tcp-c1", "p50_ms"),
            lambda v: v < 1.0,
        ),
    ]
    for t in ("uds", "tcp"):
        rows += [
            Target(
                f"batching_c1_{t}",
                f"c=1 MLP p50 batching on vs off, {t} (|on/off - 1|)",
                "<= 5 %",
                _batching_gap(t),
                lambda v: v <= 0.05,
            ),
            Target(
                f"c32_{t}",
                f"c=32 MLP unary / echo c=32, {t}",
                ">= 0.85",
                _ratio(f"mlp-{t}-c32", f"echo-{t}-c32", "throughput"),
                lambda v: v >= 0.85,
            ),
            Target(
                f"stream_{t}",
                f"ModelStreamInfer 32 in flight / unary echo c=32, {t}",
                ">= 2.0",
                _ratio(f"mlp-{t}-stream32", f"echo-{t}-c32", "throughput"),
                lambda v: v >= 2.0,
            ),
            Target(
                f"cnn_c32_{t}",
                f"c=32 CNN / raw torch best, {t}",
                ">= 0.85",
                _raw_ratio(f"cnn-{t}-c32"),
                lambda v: v >= 0.85,
            ),
            Target(
                f"cnn_p99_{t}",
                f"c=32 CNN p99 / (2 x full-batch time + delay), {t}",
                "<= 1",
                _cnn_p99_vs_bound(t),
                lambda v: v <= 1.0,
            ),
        ]
    for case in ("mlp-uds-open90", "mlp-tcp-open90", "cnn-uds-open90"):
        rows.append(
            Target(
                f"stable_{case}",
                f"{case}: p99 2nd half / 1st half (inf: errors)",
                "<= 1.5, no errors",
                _open_stability(case),
                lambda v: v <= 1.5,
            )
        )
    rows += [
        Target(
            "overload_rejects",
            "3x overload (cnn-uds-open300): share rejected (inf: other errors)",
            "> 0, only RESOURCE_EXHAUSTED",
            _overload_shape,
            lambda v: 0 < v < float("inf"),
        ),
        Target(
            "overload_reject_fast",
            "3x overload: p50 of RESOURCE_EXHAUSTED replies",
            "<= 2 ms",
            _c("cnn-uds-open300", "rejected_p50_ms"),
            lambda v: v <= 2.0,
            " ms",
        ),
        Target(
            "overload_p99",
            "3x overload: admitted p99 / (queue drain + 2 full batches + delay)",
            "<= 1",
            _overload_p99_vs_bound,
            lambda v: v <= 1.0,
        ),
        Target(
            "overload_rss",
            "3x overload: daemon RSS at window end - start",
            "<= 10 MiB",
            _growth("cnn-uds-open300"),
            lambda v: v <= 10,
            " MiB",
        ),
        *[
            Target(
                f"telemetry_c{level}",
                f"c={level} MLP telemetry on (1 s, samples 0.1 s) / off, uds",
                ">= 0.98",
                _ratio(f"mlp-telon-uds-c{level}", f"mlp-teloff-uds-c{level}", "throughput"),
                lambda v: v >= 0.98,
            )
            for level in (8, 32)
        ],
        Target(
            "telemetry_upload_p99",
            "c=8 MLP p99 while the telemetry backlog uploads / broker down, uds",
            "<= 1.10",
            _ratio("mlp-telup-uds-c8-upload", "mlp-telup-uds-c8-idle", "p99_ms"),
            lambda v: v <= 1.10,
        ),
        Target(
            "idle_rss",
            "idle daemon (tiny MLP) RSS minus `import torch` RSS",
            "<= 100 MiB",
            _idle("idle_rss_mb", "import_torch_rss_mb"),
            lambda v: v <= 100,
            " MiB",
        ),
        Target(
            "idle_cpu",
            "idle daemon CPU over the idle window",
            "< 1 % of a core",
            _idle("idle_cpu_percent"),
            lambda v: v < 1.0,
            " %",
        ),
    ]
    return rows
