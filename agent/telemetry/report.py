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
  ``b``/``c`` the bucket shares (floored at ``PSI_EPSILON``) of the baseline and of the
  window. PSI above ``PSI_THRESHOLD`` (0.2, the usual "significant shift" line) is flagged.
  Each drift entry says which baseline it used (``baseline``):

  - ``"archive"`` (inputs, when ``--baseline ARCHIVE`` names that model name and version):
    the archive's sample inputs, each sample fed as one batch through the device's own
    ``DriftSketch`` (``archive_baseline``), so the rows and buckets are the device's by
    construction; compared with the whole window. Samples are few (often 1-8 rows), so
    the PSI of an archive baseline is taken over *smoothed* shares: both sides' counts
    spread over the neighbouring buckets with the weights ``SMOOTHING`` (+-2 buckets,
    a factor of 10**0.2 = 1.6 either side), which keeps identical inputs at 0 and a
    shift of a bucket or two small, while a shift of a decade (10 buckets) still scores
    far above the threshold. With fewer than ``BASELINE_MIN_ROWS`` (30) rows the entry
    says ``few_baseline_rows: true`` (the table: "few rows"): read its PSI as a hint.
    The archive is read without a signature check (``trust=None``; its member hashes
    are still checked): the baseline is informational, nothing is deployed from it.
  - ``"first_day"`` (otherwise, and always for outputs): the first day of records of
    that model version on that device, against the rest of the window (``--since``,
    after that first day).

Unknown record kinds are ignored and missing fields tolerated: a row that lacks what a
figure needs does not count towards it.
"""

from __future__ import annotations

import math
import statistics
import tempfile
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from edgeserve.telemetry.collection import Record, RecordStore, iso, parse_time
from edgeserve.telemetry.recorders import quantile

OFFLINE_FACTOR = 3.0
PSI_THRESHOLD = 0.2
PSI_EPSILON = 1e-4
BASELINE = timedelta(days=1)
BUCKET_CHOICES_S = (10, 30, 60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 86_400)
MAX_BUCKETS = 48
BASELINE_MIN_ROWS = 30
SMOOTHING = (1, 2, 3, 2, 1)
"""Archive baselines: each bucket's count spread over its neighbours with these weights."""
Hist = tuple[tuple[float, ...], list[int]]
Counts = dict[tuple[str, str], dict[str, Counter[str]]]


@dataclass(frozen=True)
class ArchiveBaseline:
    """The drift baseline of one model version, from its archive's sample inputs."""

    source: str
    model: str
    version: str
    buckets: str
    rows: int
    """Sample rows sketched (the fewest of any input)."""
    counts: Counts
    """Bucket counts per ``("inputs", name)`` and statistic (as ``_sketches`` gives)."""

    def describe(self) -> dict[str, Any]:
        return {
            "archive": self.source,
            "model": self.model,
            "version": self.version,
            "rows": self.rows,
            "few_rows": self.rows < BASELINE_MIN_ROWS,
        }


def archive_baseline(path: Path) -> ArchiveBaseline:
    """The sample inputs of an archive (a ``.zip`` file or an unpacked model directory)
    sketched by ``DriftSketch`` as the device would, one sample per batch, per row.

    ``ArchiveError`` when it cannot be read, has no samples, or a sample input is not in
    the manifest's signature (a handler with its own served signature is not loaded
    here: reading a baseline never runs an archive's code). No signature check.
    """
    from edgeserve.archive.format import extract_archive, verify_tree
    from edgeserve.errors import ArchiveError
    from edgeserve.serving.warmup import load_sample
    from edgeserve.telemetry.drift import DriftSketch

    source = str(path)
    if not path.exists():
        raise ArchiveError(f"archive '{source}': no such file or directory")
    with tempfile.TemporaryDirectory(prefix="edgeserve-baseline-") as tmp:
        if path.is_dir():
            model_dir, manifest = path, verify_tree(path, trust=None)
        else:
            model_dir = Path(tmp) / "model"
            manifest = extract_archive(path, model_dir, trust=None)
        label = f"archive '{source}' ({manifest.name} version {manifest.version})"
        if not manifest.samples:
            raise ArchiveError(f"{label}: has no sample inputs to use as a drift baseline")
        sketch = DriftSketch(budget=1.0)
        for sample in manifest.samples:
            inputs, _ = load_sample(
                model_dir, manifest, sample, signature=(manifest.inputs, manifest.outputs)
            )
            sketch.observe_batch(inputs, {})
        taken = sketch.take()
    if taken["failures"] or taken["batches"]["skipped"]:
        raise ArchiveError(f"{label}: its sample inputs could not be sketched")
    rows = min((int(e.get("count", 0)) for e in taken["inputs"].values()), default=0)
    return ArchiveBaseline(
        source,
        manifest.name,
        manifest.version,
        str(taken["buckets"]),
        rows,
        _sketches([{"drift": taken}], taken["buckets"]),
    )


def build_report(
    store: RecordStore,
    *,
    since: datetime,
    now: datetime,
    devices: Sequence[str] = (),
    baselines: Sequence[ArchiveBaseline] = (),
) -> dict[str, Any]:
    """The report document for ``devices`` (all with records when empty); ``baselines``
    replace the first-day drift baseline of their model versions' inputs."""
    by_version = {(b.model, b.version): b for b in baselines}
    names = sorted(set(devices)) or store.devices()
    span_s = (now - since).total_seconds()
    fits = [b for b in BUCKET_CHOICES_S if b * MAX_BUCKETS >= span_s]
    bucket_s = fits[0] if fits else BUCKET_CHOICES_S[-1]
    return {
        "generated": iso(now),
        "since": iso(since),
        "bucket_s": bucket_s,
        "psi_threshold": PSI_THRESHOLD,
        "baselines": [b.describe() for b in baselines],
        "devices": [_device(store, name, since, bucket_s, by_version) for name in names],
    }


def _device(
    store: RecordStore,
    device: str,
    since: datetime,
    bucket_s: int,
    baselines: Mapping[tuple[str, str], ArchiveBaseline],
) -> dict[str, Any]:
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
        "models": _models(models, since, bucket_s, baselines),
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


def _models(
    rows: list[Record],
    since: datetime,
    bucket_s: int,
    baselines: Mapping[tuple[str, str], ArchiveBaseline],
) -> list[dict[str, Any]]:
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
        found = drift(entries, since, baselines.get((name, version)))
        archive = any(d["baseline"] == "archive" for d in found)
        out.append(
            {
                "model": name,
                "version": version,
                "summary": _summary([b for _, b in recent]),
                "trend": trend(recent, bucket_s),
                "baseline": "archive" if archive else "first_day",
                "drift": found,
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


def psi(baseline: Sequence[float], current: Sequence[float]) -> float:
    """Population stability index of two count vectors over the same buckets."""
    b_total, c_total = sum(baseline), sum(current)
    if not b_total or not c_total:
        return 0.0
    out = 0.0
    for b, c in zip(baseline, current, strict=True):
        bp, cp = max(b / b_total, PSI_EPSILON), max(c / c_total, PSI_EPSILON)
        out += (cp - bp) * math.log(cp / bp)
    return out


def drift(
    entries: list[tuple[datetime, dict[str, Any]]],
    since: datetime,
    archive: ArchiveBaseline | None = None,
) -> list[dict[str, Any]]:
    """Per input/output summary: PSI of the window against its baseline (the module
    docstring): ``archive``'s sample inputs when given, else the first day."""
    if not entries:
        return []
    end = entries[0][0] + BASELINE
    scheme = next((e[1]["drift"].get("buckets") for e in entries if _sketch(e[1])), None)
    base = _sketches((b for t, b in entries if t < end), scheme)
    now = _sketches((b for t, b in entries if t >= end and t >= since), scheme)
    if archive is not None and archive.buckets != scheme:
        archive = None  # sketches of another bucket scheme cannot be compared
    everything: Counts = {}
    if archive is not None:
        everything = _sketches((b for t, b in entries if t >= since), scheme)
    out = []
    for key in sorted(set(base) | (set(archive.counts) if archive else set())):
        side, name = key
        from_archive = archive is not None and key in archive.counts
        b_side = archive.counts[key] if archive is not None and from_archive else base[key]
        c_side = (everything if from_archive else now).get(key, {})
        stats = {}
        for stat, b_raw in sorted(b_side.items()):
            c_raw = c_side.get(stat)
            if not c_raw or not sum(b_raw.values()):
                continue
            b_counts: Mapping[str, float] = smooth(b_raw) if from_archive else b_raw
            c_counts: Mapping[str, float] = smooth(c_raw) if from_archive else c_raw
            buckets = sorted(set(b_counts) | set(c_counts))
            values = [b_counts.get(k, 0) for k in buckets], [c_counts.get(k, 0) for k in buckets]
            stats[stat] = round(psi(*values), 4)
        worst = max(stats.values(), default=None)
        rows = archive.rows if archive is not None and from_archive else None
        out.append(
            {
                "side": side,
                "name": name,
                "psi": stats,
                "max_psi": worst,
                "flagged": worst is not None and worst > PSI_THRESHOLD,
                "baseline": "archive" if from_archive else "first_day",
                "baseline_until": None if from_archive else iso(end),
                "baseline_rows": rows,
                "few_baseline_rows": rows is not None and rows < BASELINE_MIN_ROWS,
            }
        )
    return out


def smooth(counts: Mapping[str, float]) -> dict[str, float]:
    """Counts spread over neighbouring buckets with the ``SMOOTHING`` weights (numeric
    bucket keys; others kept as they are). Used on both sides of an archive baseline."""
    out: dict[str, float] = defaultdict(float)
    reach, total = len(SMOOTHING) // 2, sum(SMOOTHING)
    for key, n in counts.items():
        if not key.isdigit():
            out[key] += n
            continue
        for offset, weight in enumerate(SMOOTHING, start=-reach):
            out[str(int(key) + offset)] += n * weight / total
    return dict(out)


def _sketch(body: Mapping[str, Any]) -> Mapping[str, Any] | None:
    sketch = body.get("drift")
    return sketch if isinstance(sketch, Mapping) else None


def _sketches(bodies: Iterable[Mapping[str, Any]], scheme: object) -> Counts:
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
    for base in report.get("baselines", ()):
        few = f" (fewer than {BASELINE_MIN_ROWS}: PSI is a hint)" if base["few_rows"] else ""
        lines.append(
            f"drift baseline of {base['model']} {base['version']}: {base['rows']} sample rows "
            f"of {base['archive']}{few}"
        )
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
                f" (baseline: {_baseline(m)})"
            )
    return "\n".join(lines)


def _baseline(model: Mapping[str, Any]) -> str:
    rows = next((d["baseline_rows"] for d in model["drift"] if d["baseline"] == "archive"), None)
    if rows is None:
        return "first day"
    few = f", few rows: < {BASELINE_MIN_ROWS}" if rows < BASELINE_MIN_ROWS else ""
    return f"archive samples, {rows} rows{few}"


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
