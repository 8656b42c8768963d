"""Medians over repeats, the printed tables, the JSON document and the plot."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.cases import ECHO, Case
from bench.targets import case_ratios, net_cpu_us, targets, torchserve_best


def median_tree(values: Sequence[Any]) -> Any:
    """Median of numbers; dicts merged key by key; anything else: the first value."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return statistics.median(present)
    if all(isinstance(v, dict) for v in present):
        keys: list[str] = []
        for value in present:
            keys += [k for k in value if k not in keys]
        return {k: median_tree([v.get(k) for v in present]) for k in keys}
    return present[0]


def _zero_filled_errors(repeats: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-repeat case figures whose ``errors`` list every code seen in any repeat (0 where
    a repeat had none), so that the median of a code seen once is 0, not its count."""
    codes: dict[str, set[str]] = {}
    for repeat in repeats:
        for name, figures in repeat["cases"].items():
            codes.setdefault(name, set()).update(figures["errors"])
    filled = []
    for repeat in repeats:
        cases = {}
        for name, figures in repeat["cases"].items():
            errors = {code: figures["errors"].get(code, 0) for code in sorted(codes[name])}
            cases[name] = {**figures, "errors": errors}
        filled.append(cases)
    return filled


def summarize_repeats(repeats: list[dict[str, Any]], cases: list[Case]) -> dict[str, Any]:
    """Medians of figures, of per-repeat ratios and of per-repeat target values."""
    ratios = {
        case.name: median_tree([case_ratios(r, case) for r in repeats])
        for case in cases
        if any(case.name in r["cases"] for r in repeats)
    }
    rows = []
    for target in targets():
        values = [target.measure(r) for r in repeats]
        value = median_tree([v for v in values if v is not None])
        verdict = "n/a" if value is None else ("PASS" if target.passes(value) else "MISS")
        rows.append(
            {
                "key": target.key,
                "target": target.text,
                "threshold": target.threshold,
                "value": value,
                "per_repeat": values,
                "unit": target.unit,
                "verdict": verdict,
            }
        )
    return {
        "cases": median_tree(_zero_filled_errors(repeats)),
        "ratios": ratios,
        "raw": median_tree([r.get("raw") for r in repeats]),
        "idle": median_tree([r.get("idle") for r in repeats]),
        "baselines": median_tree([r.get("baselines") for r in repeats]),
        "daemon": median_tree([r.get("daemon") for r in repeats]),
        "telemetry_cost": median_tree([r.get("telemetry_cost") for r in repeats]),
        "perf_analyzer": median_tree([r.get("perf_analyzer") for r in repeats]),
        "peers_idle": median_tree([r.get("peers_idle") for r in repeats]),
        "targets": rows,
    }


def _f(value: Any, digits: int = 2, suffix: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return f"{value:.{digits}f}{suffix}"


def case_table(summary: dict[str, Any], cases: list[Case]) -> str:
    head = (
        f"{'case':<24}{'req/s':>8}{'p50':>8}{'p95':>8}{'p99':>8}{'batch':>7}"
        f"{'/echo':>7}{'d50echo':>8}{'/raw':>7}{'srv us':>7}{'net us':>7}{'cpu c/s/o':>16}"
        "  errors"
    )
    lines = [head, "-" * len(head)]
    for case in cases:
        fig = summary["cases"].get(case.name)
        if not fig:
            continue
        ratio = summary["ratios"].get(case.name, {})
        cpu = fig["cpu"]
        errors = ", ".join(f"{k}:{v:.0f}" for k, v in fig["errors"].items() if v) or "-"
        lines.append(
            f"{case.name:<24}{fig['throughput']:>8.0f}{_f(fig['p50_ms'], 3):>8}"
            f"{_f(fig['p95_ms'], 3):>8}{_f(fig['p99_ms'], 3):>8}"
            f"{_f(fig.get('mean_batch'), 1):>7}{_f(ratio.get('vs_echo_throughput')):>7}"
            f"{_f(ratio.get('vs_echo_p50_delta_ms'), 3):>8}"
            f"{_f(ratio.get('vs_raw_throughput')):>7}"
            f"{_f(fig.get('server_us_per_request'), 0):>7}"
            f"{_f(ratio.get('server_net_us_per_request'), 0):>7}"
            f"{cpu['client']:>6.2f}/{cpu['server']:.2f}/{cpu['other']:.2f}  {errors}"
        )
    lines.append(
        "req/s: OK replies per second; p50/p95/p99 in ms; batch: mean rows per batch; /echo, "
        "d50echo: throughput ratio and p50 difference (ms) against the echo case with the "
        "same transport and in-flight count; /raw: throughput against raw torch's best; "
        "srv us: server CPU microseconds per request (every process of the server), net us: "
        "the same minus the model's own CPU at the case's mean batch (raw torch's); "
        "cpu c/s/o: cores used by the load processes / the server / everything else."
    )
    return "\n".join(lines)


_PEER_ROWS = (
    # label, model, level, figure key, target key
    ("MLP c=1 p50 ms", "mlp", 1, "p50_ms", "peer_mlp_c1_p50"),
    ("MLP c=32 req/s", "mlp", 32, "throughput", "peer_mlp_c32_throughput"),
    ("CNN c=1 p50 ms", "cnn", 1, "p50_ms", "peer_cnn_c1_p50"),
    ("CNN c=32 req/s", "cnn", 32, "throughput", "peer_cnn_c32_throughput"),
    ("CNN c=32 p99 ms", "cnn", 32, "p99_ms", "peer_cnn_c32_p99"),
    ("MLP c=1 server CPU us/req (net)", "mlp", 1, "net_cpu", "peer_mlp_c1_cpu"),
    ("MLP c=32 server CPU us/req (net)", "mlp", 32, "net_cpu", "peer_mlp_c32_cpu"),
    ("CNN c=1 server CPU us/req (net)", "cnn", 1, "net_cpu", "peer_cnn_c1_cpu"),
    ("CNN c=32 server CPU us/req (net)", "cnn", 32, "net_cpu", "peer_cnn_c32_cpu"),
)


def _raw_cell(raw: dict[str, Any] | None, key: str) -> float | None:
    if not raw:
        return None
    return {"p50_ms": raw["batch1"]["p50_ms"], "throughput": raw["best_throughput"]}.get(key)


def peer_table(summary: dict[str, Any]) -> str | None:
    """Issue 12's cells: edgeserve, TorchServe's best configuration (which one), the
    echo ceiling and raw torch (medians), and the target ratio (median of per-repeat
    ratios); None when TorchServe did not run."""
    cases = summary["cases"]
    if not any(name.startswith("ts-") for name in cases):
        return None
    medians = {"cases": cases, "raw": summary.get("raw") or {}}
    verdicts = {row["key"]: row for row in summary["targets"]}
    head = (
        f"{'cell':<34}{'edgeserve':>10}{'TorchServe':>11}{'(config)':>9}{'echo':>9}"
        f"{'raw':>9}{'ratio':>8}  {'wanted':<17}verdict"
    )
    lines = [head, "-" * len(head)]
    for label, kind, level, key, target in _PEER_ROWS:
        peer = f"{kind}-peer-tcp-c{level}"
        best = torchserve_best(medians, kind, level, key)
        mine = net_cpu_us(medians, peer) if key == "net_cpu" else (cases.get(peer) or {}).get(key)
        echo_case = f"{ECHO}-tcp-c{level}"
        echo = (
            net_cpu_us(medians, echo_case)
            if key == "net_cpu"
            else (cases.get(echo_case) or {}).get(key)
        )
        raw = None if key == "net_cpu" else _raw_cell(medians["raw"].get(f"{kind}-peer"), key)
        row = verdicts.get(target, {})
        digits = 3 if key.endswith("ms") else 0
        lines.append(
            f"{label:<34}{_f(mine, digits):>10}{_f(best[0] if best else None, digits):>11}"
            f"{(best[1] if best else '-'):>9}{_f(echo, digits):>9}{_f(raw, digits):>9}"
            f"{_f(row.get('value'), 3):>8}  {row.get('threshold', ''):<17}{row.get('verdict', '')}"
        )
    idle = summary.get("peers_idle") or {}
    for label, target, mine, theirs in (
        ("idle RSS MiB, both models", "peer_idle_rss", "edgeserve_rss_mb", "torchserve_rss_mb"),
        ("idle CPU %", "peer_idle_cpu", "edgeserve_cpu_percent", "torchserve_cpu_percent"),
    ):
        row = verdicts.get(target, {})
        lines.append(
            f"{label:<34}{_f(idle.get(mine), 1):>10}{_f(idle.get(theirs), 1):>11}{'':>9}"
            f"{'':>9}{'':>9}{_f(row.get('value'), 3):>8}  {row.get('threshold', ''):<17}"
            f"{row.get('verdict', '')}"
        )
    lines.append(
        "TorchServe 0.12 at its best per cell of (b32: batch 32 / 5 ms, nb: no batching; "
        "one worker); all over loopback TCP (TorchServe's gRPC). Server CPU per request: "
        "the server's processes' CPU over the window / requests answered, minus the "
        "model's own compute at the case's mean batch (raw torch in-process, one thread's "
        "CPU time per call)."
    )
    return "\n".join(lines)


def client_table(summary: dict[str, Any], cases: list[Case]) -> str | None:
    """``--client both``: each case by the Python load generator and by perf_analyzer,
    side by side (medians); None when perf_analyzer did not run beside it."""
    other = summary.get("perf_analyzer")
    if not other:
        return None
    head = (
        f"{'case':<24}{'python req/s':>13}{'p50':>8}{'p99':>8}{'cli us':>7}"
        f"{'perf_an req/s':>14}{'p50':>8}{'p99':>8}{'cli us':>7}{'srv us':>7}{'srv us':>7}"
    )
    lines = [head, "-" * len(head)]
    for case in cases:
        py, pa = summary["cases"].get(case.name), other.get(case.name)
        if not py or not pa:
            continue
        lines.append(
            f"{case.name:<24}{py['throughput']:>13.0f}{_f(py['p50_ms'], 3):>8}"
            f"{_f(py['p99_ms'], 3):>8}{_f(py.get('client_us_per_request'), 0):>7}"
            f"{pa['throughput']:>14.0f}{_f(pa['p50_ms'], 3):>8}{_f(pa['p99_ms'], 3):>8}"
            f"{_f(pa.get('client_us_per_request'), 0):>7}"
            f"{_f(py.get('server_us_per_request'), 0):>7}"
            f"{_f(pa.get('server_us_per_request'), 0):>7}"
            + (f"  FAILED: {pa['failed']}" if pa.get("failed") else "")
        )
    lines.append(
        "the same case driven by the Python load generator and by perf_analyzer, back to "
        "back; cli us / srv us: client / server CPU microseconds per request (python's, "
        "then perf_analyzer's)."
    )
    return "\n".join(lines)


def _upload_lines(summary: dict[str, Any]) -> list[str]:
    """The telemetry upload case: p50/p99 idle and while uploading, the ratios (medians of
    per-repeat ratios) and the upload rate achieved in the windows against the cap."""
    lines = []
    for name, ratio in sorted(summary["ratios"].items()):
        if "vs_idle_p99_ms" not in ratio:
            continue
        idle = summary["cases"].get(name.removesuffix("-upload") + "-idle") or {}
        fig = summary["cases"].get(name) or {}
        up = fig.get("upload") or {}
        lines.append(
            f"telemetry upload {name.removeprefix('mlp-telup-').removesuffix('-upload')}: "
            f"p50 idle {_f(idle.get('p50_ms'), 3)} / uploading {_f(fig.get('p50_ms'), 3)} ms, "
            f"p99 idle {_f(idle.get('p99_ms'), 3)} / uploading {_f(fig.get('p99_ms'), 3)} ms; "
            f"uploading/idle p99 {_f(ratio['vs_idle_p99_ms'], 3)}, p50 "
            f"{_f(ratio['vs_idle_p50_ms'], 3)}, throughput {_f(ratio['vs_idle_throughput'], 3)}"
        )
        if up:
            lines.append(
                f"  upload in the window {_f((up.get('upload_bytes_per_s') or 0) / 1024, 1)} "
                f"KiB/s = {_f(up.get('upload_vs_cap'), 2)} of upload_bytes_per_s "
                f"({_f(up.get('rate_cap_bytes_per_s', 0) / 1024, 0)} KiB/s); backlog rows "
                f"{_f(up.get('backlog_rows_before'), 0)} -> {_f(up.get('backlog_rows_after'), 0)}"
                " across the window (medians)"
            )
    return lines


def telemetry_table(summary: dict[str, Any]) -> str | None:
    """Telemetry on / off per load level (medians of per-repeat ratios) and the buffer's
    write cost per interval; None when neither was measured."""
    lines = []
    for name, ratio in sorted(summary["ratios"].items()):
        if "vs_mlp-teloff_throughput" in ratio:
            lines.append(
                f"telemetry on/off {name.removeprefix('mlp-telon-'):<6} throughput "
                f"{_f(ratio['vs_mlp-teloff_throughput'], 3)}  p50 "
                f"{_f(ratio['vs_mlp-teloff_p50_ms'], 3)}  p99 "
                f"{_f(ratio['vs_mlp-teloff_p99_ms'], 3)}"
            )
    lines += _upload_lines(summary)
    cost = summary.get("telemetry_cost")
    if cost:
        lines.append(
            f"buffer writes per interval ({cost['models']:.0f} models, "
            f"{cost['rows_per_interval']:.0f} rows, "
            f"{cost['body_bytes_per_interval'] / 1024:.1f} KiB): append "
            f"{_f(cost['append_ms_p50'], 2)} ms (p90 {_f(cost['append_ms_p90'], 2)}), collect "
            f"{_f(cost['collect_ms_p50'], 2)} ms, one sample row "
            f"{_f(cost['sample_append_ms_p50'], 2)} ms (p90 {_f(cost['sample_append_ms_p90'], 2)}),"
            f" all of an interval with {cost['samples_per_interval']:.0f} samples "
            f"{_f(cost['writes_ms_per_interval_p50'], 2)} ms"
        )
    return "\n".join(lines) or None


def target_table(summary: dict[str, Any]) -> str:
    lines = [f"{'target':<72}{'measured':>12}  {'wanted':<28}verdict"]
    lines.append("-" * len(lines[0]))
    for row in summary["targets"]:
        measured = _f(row["value"], 3, row["unit"])
        lines.append(f"{row['target']:<72}{measured:>12}  {row['threshold']:<28}{row['verdict']}")
    return "\n".join(lines)


def reference_table(summary: dict[str, Any]) -> str:
    lines = []
    for model, raw in (summary.get("raw") or {}).items():
        idle = raw.get("batch1_after_idle")  # absent from results written before it
        after = f", {idle['p50_ms']:.3f} ms after {idle['gap_ms']:.0f} ms idle" if idle else ""
        lines.append(
            f"raw torch {model:<10} {raw['threads']} thread(s): batch 1 p50 "
            f"{raw['batch1']['p50_ms']:.3f} ms ({raw['batch1']['throughput']:.0f}/s){after}; "
            f"best batch {raw['best_batch']}: {raw['best_throughput']:.0f} samples/s"
        )
    idle, base, daemon = summary.get("idle"), summary.get("baselines"), summary.get("daemon")
    if idle:
        lines.append(
            f"tiny-MLP daemon: READY {idle['ready_s']:.2f} s after start; idle RSS "
            f"{idle['idle_rss_mb']:.0f} MiB; idle CPU {idle['idle_cpu_percent']:.2f} % "
            f"over {idle['idle_window_s']:.0f} s"
        )
    if base:
        lines.append(
            f"bare python RSS {base['python_rss_mb']:.0f} MiB; python + import torch "
            f"{base['import_torch_rss_mb']:.0f} MiB"
        )
    if daemon:
        lines.append(
            f"bench daemon ({daemon.get('models')} models): READY {daemon['ready_s']:.2f} s; "
            f"RSS after load {_f(daemon.get('rss_after_load_mb'), 0)} MiB"
        )
    lines += _scaling_lines(summary["cases"])
    return "\n".join(lines)


def _scaling_lines(cases: dict[str, Any]) -> list[str]:
    """The scaling curve: tiny MLP c=64 with the server's threads on 1, 2, ... CPUs."""
    points = sorted(
        (int(name.rsplit("cpu", 1)[1]), fig)
        for name, fig in cases.items()
        if name.startswith("mlp-uds-c64-cpu")
    )
    if not points:
        return []
    base = points[0][1]["throughput"]
    cells = [
        f"{n} CPU{'s' if n > 1 else ''} {fig['throughput']:.0f} req/s "
        f"({_f(fig['throughput'] / base if base else None, 2)}x, p99 {_f(fig['p99_ms'], 1)} ms, "
        f"server {fig['cpu']['server']:.2f} cores)"
        for n, fig in points
    ]
    return ["scaling, tiny MLP c=64 over UDS, server pinned (taskset -a): " + "; ".join(cells)]


def write_json(path: Path, document: dict[str, Any]) -> None:
    def default(value: Any) -> Any:
        return str(value)

    path.write_text(json.dumps(document, indent=1, default=default, allow_nan=True) + "\n")


def plot(path: Path, summary: dict[str, Any], cases: list[Case]) -> None:
    """Latency (p50 solid, p99 dotted) against throughput, one panel per transport."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for axis, transport in zip(axes, ("uds", "tcp"), strict=True):
        for target in (ECHO, "mlp", "mlp-int8", "cnn"):
            points = [
                (c, summary["cases"][c.name])
                for c in cases
                if c.target == target
                and c.transport == transport
                and c.kind == "closed"
                and not c.procs
                and c.name in summary["cases"]
            ]
            points.sort(key=lambda p: p[0].concurrency)
            if not points:
                continue
            xs = [p[1]["throughput"] for p in points]
            line = axis.plot(xs, [p[1]["p50_ms"] for p in points], "o-", label=f"{target} p50")
            color = line[0].get_color()
            axis.plot(xs, [p[1]["p99_ms"] for p in points], ":", color=color, label=f"{target} p99")
            for case, fig in points:
                axis.annotate(
                    f"c{case.concurrency}", (fig["throughput"], fig["p50_ms"]), fontsize=7
                )
            opens = [
                summary["cases"][c.name]
                for c in cases
                if c.target == target
                and c.transport == transport
                and c.kind != "closed"
                and c.name in summary["cases"]
            ]
            if opens:
                axis.plot(
                    [f["throughput"] for f in opens],
                    [f["p50_ms"] for f in opens],
                    "x",
                    color=color,
                    label=f"{target} open/stream p50",
                )
        axis.set_xlabel("throughput (responses/s)")
        axis.set_title(f"over {transport.upper()}")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.set_xscale("log")
            axis.legend(fontsize=7)
    axes[0].set_ylabel("latency (ms)")
    figure.suptitle("edgeserve bench: latency against throughput (medians over repeats)")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
