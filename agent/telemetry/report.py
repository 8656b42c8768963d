"""``edgeserve fleet report``: what the collected records say about each device.

``build_report`` makes one plain-data document (the ``--json`` output); ``render_table``
and ``telemetry/plot.py`` are renderers of it. Per device:

- ``last_seen`` (the collector's latest arrival time), records by class in the window;
- ``offline_spans``: gaps between consecutive record times longer than
  ``OFFLINE_FACTOR`` (3) times the device's median interval (a device keeps recording
  while it cannot reach the broker, so a gap in record times means the daemon was down);
- ids: between the lowest and highest id in the window, every missing id is explained by
  a drop event (``first_id..last_id`` of some class went to the byte budget), by a
  ``buffer_reset`` event (a fresh buffer starts above the ids reserved before it: the
  range just below the reset event's id), or listed in ``unexplained_gaps`` as
  ``[first, last]``. Nothing lost means ``unexplained_gaps == []``; records still on their
  way (a backlog upload runs after the live data) show there until they arrive;
- per model version (rollup rows of kind ``model``; each holds one interval's counts):
  requests, error rate, p50 and p99 per time bucket, from the fixed-bucket latency
  histograms summed bucket by bucket and interpolated linearly inside the bucket
  (``recorders.quantile``), so the error is bounded by the bucket width;
- drift per input (and output) summary statistic (``per_request`` mean, min and max,
  and the ``argmax`` class of classifiers, from ``telemetry/drift.py``): the population
  stability index ``PSI = sum((c_i - b_i) * ln(c_i / b_i))`` over the fixed buckets,
  ``b``/``c`` the bucket shares (floored at ``PSI_EPSILON``) of the baseline (the first
  day of records of that model version on that device) and of the rest of the window
  (``--since``, after that first day). PSI above
  ``PSI_THRESHOLD`` (0.2, the usual "significant shift" line) is flagged.

Unknown record kinds are ignored and missing fields tolerated: a row that lacks what a
figure needs does not count towards it.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from edgeserve.telemetry.collection import Record, RecordStore, iso, parse_time
from edgeserve.telemetry.recorders import quantile

OFFLINE_FACTOR = 3.0
PSI_THRESHOLD = 0.2
PSI_EPSILON = 1e-4
BASELINE = timedelta(days=1)
BUCKET_CHOICES_S = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86_400)
MAX_BUCKETS = 48
Hist = tuple[tuple[float, ...], list[int]]


def build_report(
    store: RecordStore, *, since: datetime, now: datetime, devices: Sequence[str] = ()
) -> dict[str, Any]:
    """The report document for ``devices`` (all with records when empty)."""
    names = sorted(set(devices)) or store.devices()
    span_s = (now - since).total_seconds()
    fits = [b for b in BUCKET_CHOICES_S if b * MAX_BUCKETS >= span_s]
    bucket_s = fits[0] if fits else BUCKET_CHOICES_S[-1]
    return {
        "generated": iso(now),
        "since": iso(since),
        "bucket_s": bucket_s,
        "psi_threshold": PSI_THRESHOLD,
        "devices": [_device(store, name, since, bucket_s) for name in names],
    }


def _device(store: RecordStore, device: str, since: datetime, bucket_s: int) -> dict[str, Any]:
    window = list(store.records(device, since=iso(since)))
    events = list(store.records(device, kinds=("drop", "buffer_reset"), classes=("event",)))
    models = list(store.records(device, kinds=("model",), classes=("rollup",)))
    ids = _id_report(store, device, window, events)
    return {
        "device": device,
        "last_seen": max((r.received for r in window), default=None),
        "last_record_time": max((r.time for r in window), default=None),
        "records": len(window),
        "by_class": dict(sorted(Counter(r.cls for r in window).items())),
        "offline_spans": offline_spans([t for r in window if (t := parse_time(r.time))]),
        **ids,
        "models": _models(models, since, bucket_s),
        "system": next((r.data() for r in reversed(window) if r.kind == "system"), None),
    }


# -- ids and gaps --------------------------------------------------------------------------


def _id_report(
    store: RecordStore, device: str, window: list[Record], events: list[Record]
) -> dict[str, Any]:
    if not window:
        empty: list[list[int]] = []
        return {
            "id_range": None,
            "dropped": {},
            "explained_gaps": empty,
            "reset_gaps": empty,
            "unexplained_gaps": empty,
        }
    first, last = window[0].id, window[-1].id
    missing = missing_ranges(store.ids_between(device, first, last), first, last)
    drops = [r.data() for r in events if r.kind == "drop"]
    dropped: Counter[str] = Counter()
    covered: list[tuple[int, int]] = []
    for body in drops:
        lo, hi = body.get("first_id"), body.get("last_id")
        if isinstance(lo, int) and isinstance(hi, int) and lo <= hi:
            covered.append((lo, hi))
            if hi >= first and lo <= last:
                dropped[str(body.get("class", "?"))] += int(body.get("count", 0) or 0)
    rest = subtract(missing, covered)
    explained = subtract(missing, rest)
    resets = {r.id for r in events if r.kind == "buffer_reset"}
    reset_gaps = [g for g in rest if g[1] + 1 in resets]
    return {
        "id_range": [first, last],
        "dropped": dict(sorted(dropped.items())),
        "explained_gaps": [list(g) for g in explained],
        "reset_gaps": [list(g) for g in reset_gaps],
        "unexplained_gaps": [list(g) for g in rest if g[1] + 1 not in resets],
    }


def missing_ranges(present: Sequence[int], first: int, last: int) -> list[tuple[int, int]]:
    """``[a, b]`` ranges of ids in ``[first, last]`` not in ``present`` (ascending)."""
    out: list[tuple[int, int]] = []
    expect = first
    for i in present:
        if i > expect:
            out.append((expect, i - 1))
        expect = max(expect, i + 1)
    if expect <= last:
        out.append((expect, last))
    return out


def subtract(
    ranges: Iterable[tuple[int, int]], cover: Iterable[tuple[int, int]]
) -> list[tuple[int, int]]:
    """The parts of ``ranges`` that no range of ``cover`` contains."""
    spans = sorted(cover)
    out: list[tuple[int, int]] = []
    for lo, hi in ranges:
        start = lo
        for c_lo, c_hi in spans:
            if c_hi < start or c_lo > hi:
                continue
            if c_lo > start:
                out.append((start, c_lo - 1))
            start = max(start, c_hi + 1)
            if start > hi:
                break
        if start <= hi:
            out.append((start, hi))
    return out


def offline_spans(times: Iterable[datetime]) -> list[list[str]]:
    """``[start, end]`` of gaps longer than ``OFFLINE_FACTOR`` x the median interval."""
    moments = sorted(set(times))
    steps = [(b - a).total_seconds() for a, b in zip(moments, moments[1:], strict=False)]
    if len(steps) < 2:
        return []
    limit = OFFLINE_FACTOR * statistics.median(steps)
    return [
        [iso(a), iso(b)]
        for a, b, step in zip(moments, moments[1:], steps, strict=False)
        if step > limit
    ]


# -- models: trends and drift --------------------------------------------------------------


def _models(rows: list[Record], since: datetime, bucket_s: int) -> list[dict[str, Any]]:
    by_version: dict[tuple[str, str], list[tuple[datetime, dict[str, Any]]]] = defaultdict(list)
    for row in rows:
        body, moment = row.data(), parse_time(row.time)
        name, version = body.get("model"), body.get("version")
        if moment is not None and isinstance(name, str) and isinstance(version, str | int):
            by_version[(name, str(version))].append((moment, body))
    out = []
    for (name, version), entries in sorted(by_version.items()):
        entries.sort(key=lambda e: e[0])
        recent = [(t, b) for t, b in entries if t >= since]
        out.append(
            {
                "model": name,
                "version": version,
                "summary": _summary([b for _, b in recent]),
                "trend": trend(recent, bucket_s),
                "drift": drift(entries, since),
            }
        )
    return out


def _summary(bodies: list[dict[str, Any]]) -> dict[str, Any]:
    hist = merge_histograms(_latency(b) for b in bodies)
    codes = _codes(bodies)
    total = sum(codes.values())
    return {
        "requests": total,
        "errors": total - codes.get("OK", 0),
        "error_rate": (total - codes.get("OK", 0)) / total if total else None,
        "p50_ms": _ms(hist, 0.5),
        "p99_ms": _ms(hist, 0.99),
    }


def trend(entries: list[tuple[datetime, dict[str, Any]]], bucket_s: int) -> list[dict[str, Any]]:
    """Per time bucket: requests, errors, error rate, throughput, p50 and p99 (ms)."""
    buckets: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for moment, body in entries:
        buckets[int(moment.timestamp() // bucket_s * bucket_s)].append(body)
    out = []
    for start, bodies in sorted(buckets.items()):
        point = _summary(bodies)
        point["start"] = iso(datetime.fromtimestamp(start, tz=UTC))
        point["throughput_per_s"] = point["requests"] / bucket_s
        out.append(point)
    return out


def _codes(bodies: Iterable[Mapping[str, Any]]) -> Counter[str]:
    codes: Counter[str] = Counter()
    for body in bodies:
        requests = body.get("requests")
        if isinstance(requests, Mapping):
            for code, n in requests.items():
                if isinstance(n, int) and n > 0:
                    codes[str(code)] += n
    return codes


def _latency(body: Mapping[str, Any]) -> Hist | None:
    """``latency_s.total`` (``telemetry/rollup.py``: the bounds beside it, or inside it)."""
    latency = body.get("latency_s")
    if not isinstance(latency, Mapping) or not isinstance(latency.get("total"), Mapping):
        return None
    return as_histogram({"bounds": latency.get("bounds"), **latency["total"]})


def _ms(hist: Hist | None, q: float) -> float | None:
    if hist is None:
        return None
    value = quantile(hist[0], hist[1], q)
    return None if value is None else round(value * 1000.0, 3)


def as_histogram(value: object) -> Hist | None:
    """``{"bounds": [...], "counts": [...]}`` (counts per bucket, +Inf last) or None."""
    if not isinstance(value, Mapping):
        return None
    bounds, counts = value.get("bounds"), value.get("counts")
    if not (isinstance(bounds, list) and isinstance(counts, list) and bounds):
        return None
    if len(counts) not in (len(bounds), len(bounds) + 1):
        return None
    if not all(isinstance(b, int | float) for b in bounds):
        return None
    if not all(isinstance(c, int) and c >= 0 for c in counts):
        return None
    padded = list(counts) + [0] * (len(bounds) + 1 - len(counts))
    return tuple(float(b) for b in bounds), padded


def merge_histograms(hists: Iterable[Hist | None]) -> Hist | None:
    """Bucket-by-bucket sums of the histograms with the first one's bounds (others skipped)."""
    merged: Hist | None = None
    for hist in hists:
        if hist is None:
            continue
        if merged is None:
            merged = (hist[0], list(hist[1]))
        elif hist[0] == merged[0]:
            merged = (merged[0], [a + b for a, b in zip(merged[1], hist[1], strict=True)])
    return merged


def psi(baseline: Sequence[int], current: Sequence[int]) -> float:
    """Population stability index of two count vectors over the same buckets."""
    b_total, c_total = sum(baseline), sum(current)
    if not b_total or not c_total:
        return 0.0
    out = 0.0
    for b, c in zip(baseline, current, strict=True):
        bp, cp = max(b / b_total, PSI_EPSILON), max(c / c_total, PSI_EPSILON)
        out += (cp - bp) * math.log(cp / bp)
    return out


def drift(entries: list[tuple[datetime, dict[str, Any]]], since: datetime) -> list[dict[str, Any]]:
    """Per input/output summary: PSI of the window after the baseline day against it."""
    if not entries:
        return []
    end = entries[0][0] + BASELINE
    scheme = next((e[1]["drift"].get("buckets") for e in entries if _sketch(e[1])), None)
    base = _sketches((b for t, b in entries if t < end), scheme)
    now = _sketches((b for t, b in entries if t >= end and t >= since), scheme)
    out = []
    for key in sorted(base):
        side, name = key
        stats = {}
        for stat, b_counts in sorted(base[key].items()):
            c_counts = now.get(key, {}).get(stat)
            if not c_counts or not sum(b_counts.values()):
                continue
            buckets = sorted(set(b_counts) | set(c_counts))
            values = [b_counts.get(k, 0) for k in buckets], [c_counts.get(k, 0) for k in buckets]
            stats[stat] = round(psi(*values), 4)
        worst = max(stats.values(), default=None)
        out.append(
            {
                "side": side,
                "name": name,
                "psi": stats,
                "max_psi": worst,
                "flagged": worst is not None and worst > PSI_THRESHOLD,
                "baseline_until": iso(end),
            }
        )
    return out


def _sketch(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    sketch = body.get("drift")
    return sketch if isinstance(sketch, Mapping) else None


def _sketches(
    bodies: Iterable[Mapping[str, Any]], scheme: object
) -> dict[tuple[str, str], dict[str, Counter[str]]]:
    """Summed bucket counts per (side, name) and statistic, from each body's ``drift``
    (``telemetry/drift.py``: sparse ``per_request`` histograms and ``argmax``); sketches
    of another bucket scheme than the first one seen are left out."""
    out: dict[tuple[str, str], dict[str, Counter[str]]] = defaultdict(dict)
    for body in bodies:
        sketch = _sketch(body)
        if sketch is None or sketch.get("buckets") != scheme:
            continue
        for side in ("inputs", "outputs"):
            entries = sketch.get(side)
            if not isinstance(entries, Mapping):
                continue
            for name, entry in entries.items():
                if not isinstance(entry, Mapping):
                    continue
                for stat, counts in _stat_counts(entry).items():
                    out[(side, str(name))].setdefault(stat, Counter()).update(counts)
    return out


def _stat_counts(entry: Mapping[str, Any]) -> dict[str, dict[str, int]]:
    per_request = entry.get("per_request")
    found = {
        stat: counts
        for stat, value in (per_request.items() if isinstance(per_request, Mapping) else ())
        if (counts := _sparse(value)) is not None
    }
    argmax = _sparse(entry.get("argmax"))
    if argmax is not None:
        found["argmax"] = argmax
    return found


def _sparse(value: object) -> dict[str, int] | None:
    """``{"<bucket>": count}`` (or a dense ``{bounds, counts}``) as bucket -> count."""
    dense = as_histogram(value)
    if dense is not None:
        return {str(i): n for i, n in enumerate(dense[1]) if n}
    if not isinstance(value, Mapping):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value.values()):
        return None
    return {str(k): int(n) for k, n in value.items() if n}


# -- the human table -----------------------------------------------------------------------


def render_table(report: Mapping[str, Any]) -> str:
    """A compact table per device."""
    lines = [f"since {report['since']} (buckets of {report['bucket_s']} s)"]
    if not report["devices"]:
        lines.append("no records")
    for dev in report["devices"]:
        classes = ", ".join(f"{k} {v}" for k, v in dev["by_class"].items()) or "none"
        lines += [
            "",
            f"device {dev['device']}  last seen {dev['last_seen'] or '-'}",
            f"  records   {dev['records']} ({classes})",
            f"  ids       {_range(dev['id_range'])}  dropped {_dropped(dev['dropped'])}",
            f"  gaps      explained {len(dev['explained_gaps'])}, after a buffer reset "
            f"{len(dev['reset_gaps'])}, unexplained {_ranges(dev['unexplained_gaps'])}",
            f"  offline   {_spans(dev['offline_spans'])}",
        ]
        if dev["models"]:
            lines.append(
                f"  {'MODEL':<20} {'VERSION':<8} {'REQUESTS':>9} {'ERR %':>6} "
                f"{'P50 ms':>8} {'P99 ms':>8}  DRIFT (PSI > {report['psi_threshold']})"
            )
        for m in dev["models"]:
            s = m["summary"]
            err = "-" if s["error_rate"] is None else f"{100 * s['error_rate']:.2f}"
            flagged = [f"{d['name']} {d['max_psi']:.2f}" for d in m["drift"] if d["flagged"]]
            lines.append(
                f"  {m['model']:<20} {m['version']:<8} {s['requests']:>9} {err:>6} "
                f"{_num(s['p50_ms']):>8} {_num(s['p99_ms']):>8}  {', '.join(flagged) or 'none'}"
            )
    return "\n".join(lines)


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _range(value: Sequence[int] | None) -> str:
    return "-" if value is None else f"{value[0]}..{value[1]}"


def _ranges(values: Sequence[Sequence[int]]) -> str:
    if not values:
        return "none"
    shown = ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in values[:5])
    return shown + (f" (+{len(values) - 5} more)" if len(values) > 5 else "")


def _dropped(by_class: Mapping[str, int]) -> str:
    total = sum(by_class.values())
    return f"{total} ({', '.join(f'{k} {v}' for k, v in by_class.items())})" if total else "0"


def _spans(spans: Sequence[Sequence[str]]) -> str:
    if not spans:
        return "none"
    shown = ", ".join(f"{a} .. {b}" for a, b in spans[:3])
    return shown + (f" (+{len(spans) - 3} more)" if len(spans) > 3 else "")
