"""Ratios against the references, and issue 3's targets, from the figures of one repeat.

Every function here reads one repeat (``{"cases": {name: figures}, "raw": {model: ...},
"idle": ..., "baselines": ...}``) and returns numbers or None when a figure it needs
was not measured (a case left out by ``--only``). The bench takes medians over repeats
of these per-repeat values, so each ratio pairs figures measured minutes apart, not
the medians of different runs.
"""

from __future__ import annotations

import math
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
    gross = _get(repeat, case.name, "server_us_per_request")
    if case.target == ECHO:
        out["server_net_us_per_request"] = gross
    raw = repeat.get("raw", {}).get(MODELS[case.model].raw_key)
    if raw and case.target != ECHO:
        model_us = model_cpu_us(raw, _get(repeat, case.name, "mean_batch"))
        out["model_cpu_us_per_request"] = model_us
        out["server_net_us_per_request"] = _sub(gross, model_us)
        out["vs_raw_throughput"] = _div(
            _get(repeat, case.name, "throughput"), raw["best_throughput"]
        )
        out["vs_raw_p50_delta_ms"] = _sub(
            _get(repeat, case.name, "p50_ms"), raw["batch1"]["p50_ms"]
        )
    return out


def model_cpu_us(raw: dict[str, Any], mean_batch: float | None) -> float | None:
    """The model's own CPU per request (microseconds) at a mean batch size: raw torch's
    one-thread CPU time of one call per row (``cpu_ms``), interpolated between the
    sweep's batch sizes (on log2 of the size), clamped to the sweep's ends; batch 1 when
    the batch is unknown."""
    points = sorted(
        (int(size), entry["cpu_ms"] * 1e3 / int(size))
        for size, entry in raw.get("sweep", {}).items()
        if "cpu_ms" in entry
    )
    if not points:
        return None
    batch = max(1.0, mean_batch or 1.0)
    if batch <= points[0][0]:
        return points[0][1]
    for (lo, lo_us), (hi, hi_us) in zip(points, points[1:], strict=False):
        if batch <= hi:
            share = (math.log2(batch) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
            return lo_us + share * (hi_us - lo_us)
    return points[-1][1]


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


TS_CONFIGS = ("b32", "nb")
"""TorchServe's two configurations per model: batch 32 / 5 ms, no batching."""


def net_cpu_us(repeat: Repeat, case: str) -> float | None:
    """Server CPU per request minus the model's own (raw torch at the case's mean
    batch); the echo ceiling has no model."""
    gross = _get(repeat, case, "server_us_per_request")
    target = case.rsplit("-", 2)[0]
    if target == ECHO:
        return gross
    raw = repeat.get("raw", {}).get(MODELS[target].raw_key)
    model_us = model_cpu_us(raw, _get(repeat, case, "mean_batch")) if raw else None
    return _sub(gross, model_us)


def _figure(repeat: Repeat, case: str, key: str) -> float | None:
    return net_cpu_us(repeat, case) if key == "net_cpu" else _get(repeat, case, key)


def torchserve_best(repeat: Repeat, kind: str, level: int, key: str) -> tuple[float, str] | None:
    """TorchServe's best value of ``key`` over its two configurations at one cell, and
    which configuration gave it (highest throughput, lowest anything else)."""
    found = [
        (value, config)
        for config in TS_CONFIGS
        if (value := _figure(repeat, f"ts-{kind}-{config}-tcp-c{level}", key)) is not None
    ]
    if not found:
        return None
    return max(found) if key == "throughput" else min(found)


def _vs_torchserve(kind: str, level: int, key: str) -> Callable[[Repeat], float | None]:
    def measure(repeat: Repeat) -> float | None:
        best = torchserve_best(repeat, kind, level, key)
        return _div(_figure(repeat, f"{kind}-peer-tcp-c{level}", key), best[0] if best else None)

    return measure


def _peer_idle(key: str, other: str | None = None) -> Callable[[Repeat], float | None]:
    def measure(repeat: Repeat) -> float | None:
        idle = repeat.get("peers_idle") or {}
        return _div(idle.get(key), idle.get(other)) if other else idle.get(key)

    return measure


def _peer_raw(repeat: Repeat) -> float | None:
    raw = repeat.get("raw", {}).get("cnn-peer")
    return _div(
        _get(repeat, "cnn-peer-tcp-c32", "throughput"), raw["best_throughput"] if raw else None
    )


def peer_targets() -> list[Target]:
    """Issue 12's targets against TorchServe's best configuration per cell."""
    rows = []
    for kind in ("mlp", "cnn"):
        rows += [
            Target(
                f"peer_{kind}_c1_p50",
                f"{kind.upper()} c=1 p50, edgeserve / TorchServe's best, tcp",
                "<= 0.66",
                _vs_torchserve(kind, 1, "p50_ms"),
                lambda v: v <= 0.66,
            ),
            Target(
                f"peer_{kind}_c32_throughput",
                f"{kind.upper()} c=32 throughput, edgeserve / TorchServe's best, tcp",
                ">= 1.25",
                _vs_torchserve(kind, 32, "throughput"),
                lambda v: v >= 1.25,
            ),
        ]
        rows += [
            Target(
                f"peer_{kind}_c{level}_cpu",
                f"{kind.upper()} c={level} server CPU/request net of the model, "
                "edgeserve / TorchServe's best",
                "<= 0.5",
                _vs_torchserve(kind, level, "net_cpu"),
                lambda v: v <= 0.5,
            )
            for level in (1, 32)
        ]
    rows += [
        Target(
            "peer_cnn_c32_p99",
            "CNN c=32 p99, edgeserve / TorchServe's best, tcp",
            "<= 0.5",
            _vs_torchserve("cnn", 32, "p99_ms"),
            lambda v: v <= 0.5,
        ),
        Target(
            "peer_cnn_raw",
            "CNN (issue 12's) c=32 / raw torch best, tcp",
            ">= 0.85",
            _peer_raw,
            lambda v: v >= 0.85,
        ),
        Target(
            "peer_idle_rss",
            "idle RSS, both models: edgeserve / TorchServe (front end + 2 workers)",
            "<= 0.5",
            _peer_idle("edgeserve_rss_mb", "torchserve_rss_mb"),
            lambda v: v <= 0.5,
        ),
        Target(
            "peer_idle_cpu",
            "idle CPU, edgeserve with both models",
            "< 1 % of a core",
            _peer_idle("edgeserve_cpu_percent"),
            lambda v: v < 1.0,
            " %",
        ),
    ]
    return rows


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
                f"stream_vs_unary_{t}",
                f"ModelStreamInfer 32 in flight / own unary c=32, {t}",
                ">= 1.5",
                _ratio(f"mlp-{t}-stream32", f"mlp-{t}-c32", "throughput"),
                lambda v: v >= 1.5,
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
    return rows + peer_targets()
