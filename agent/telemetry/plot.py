"""``fleet report --plot``: the report's trends as a PNG, one panel per device and model version.

Each panel shows p50 and p99 latency (ms, left axis) and throughput (requests/s, right
axis) over time, with the device's offline spans shaded. matplotlib is optional (the
``edgeserve[report]`` extra) and imported only here, only when a plot is asked for; the
figure is drawn without pyplot (no global state, no display needed).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from edgeserve.errors import InvalidArgument
from edgeserve.telemetry.collection import parse_time

MAX_PANELS = 16


def require_matplotlib() -> None:
    """Raise ``InvalidArgument`` (a usage error) when matplotlib is not installed."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise InvalidArgument("--plot needs matplotlib: pip install 'edgeserve[report]'") from None


def write_plot(report: Mapping[str, Any], path: str | Path) -> int:
    """Draw ``report`` into the PNG at ``path``; the number of panels drawn."""
    require_matplotlib()
    from matplotlib.dates import date2num
    from matplotlib.figure import Figure

    panels = [(d, m) for d in report["devices"] for m in d["models"] if m["trend"]][:MAX_PANELS]
    fig = Figure(figsize=(10, 2.8 * max(1, len(panels))), layout="constrained")
    if not panels:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no model rollups in this window", ha="center", va="center")
        ax.set_axis_off()
    for n, (device, model) in enumerate(panels, start=1):
        ax = fig.add_subplot(len(panels), 1, n)
        times = [float(date2num(parse_time(p["start"]))) for p in model["trend"]]
        for key, label in (("p50_ms", "p50"), ("p99_ms", "p99")):
            ax.plot(times, [p[key] for p in model["trend"]], marker=".", label=f"{label} ms")
        ax.set_ylabel("latency (ms)")
        rate = ax.twinx()
        rate.plot(
            times,
            [p["throughput_per_s"] for p in model["trend"]],
            color="tab:gray",
            linestyle="--",
            label="requests/s",
        )
        rate.set_ylabel("requests/s")
        for start, end in device["offline_spans"]:
            left, right = (float(date2num(parse_time(t))) for t in (start, end))
            ax.axvspan(left, right, color="tab:red", alpha=0.15)
        ax.xaxis_date()
        ax.set_title(f"{device['device']}: {model['model']} v{model['version']}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    fig.savefig(str(path), format="png", dpi=100)
    return len(panels)
