"""``edgeserve fleet report`` over a real records file written through ``RecordStore``."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgeserve.cli import main
from edgeserve.telemetry.collection import Batch, RecordStore, iso
from edgeserve.telemetry.drift import DriftSketch
from edgeserve.telemetry.report import PSI_THRESHOLD, archive_baseline, build_report, psi

NOW = datetime.now(UTC).replace(microsecond=0)
BOUNDS = [0.001, 0.002, 0.004, 0.008]


def rollup(model: str, counts: list[int], codes: dict[str, int], drift: Any = None) -> dict:
    body: dict[str, Any] = {
        "model": model,
        "version": "1",
        "requests": codes,
        "latency_s": {"bounds": BOUNDS, "total": {"counts": counts, "sum": 0.0}},
    }
    if drift is not None:
        body["drift"] = drift
    return body


def sketch(stable: dict[str, int], moving: dict[str, int]) -> dict:
    """A ``telemetry/drift.py`` sketch: sparse per-request histograms by bucket index."""

    def entry(counts: dict[str, int]) -> dict:
        n = sum(counts.values())
        hist = {"mean": counts, "min": counts, "max": counts}
        return {"count": n, "mean": 1.0, "variance": 0.5, "per_request": hist}

    return {"buckets": "log10x10", "inputs": {"stable": entry(stable), "moving": entry(moving)}}


def write(db: Path, device: str, rows: list[tuple[int, str, str, datetime, dict]]) -> None:
    store = RecordStore(db)
    try:
        records = [(i, cls, kind, iso(t), json.dumps(body)) for i, cls, kind, t, body in rows]
        store.store(Batch(device, records, 0), iso(NOW))
    finally:
        store.close()


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "fleet.db"
    start = NOW - timedelta(hours=30)
    rows: list[tuple[int, str, str, datetime, dict]] = []
    # Day one (the drift baseline): two rollups 10 s apart.
    for n in range(2):
        rows.append(
            (
                1 + n,
                "rollup",
                "model",
                start + timedelta(seconds=10 * n),
                rollup(
                    "m",
                    [10, 0, 0, 0, 0],
                    {"OK": 10},
                    sketch({"120": 50, "121": 50}, {"120": 50, "121": 50}),
                ),
            )
        )
    # The last hour: rollups every 10 s, a 5-minute outage, samples, a drop event.
    t0 = NOW - timedelta(hours=1)
    ident = 100
    for n in range(60):
        if 20 <= n < 50:
            continue  # the daemon was down
        moment = t0 + timedelta(seconds=10 * n)
        body = rollup(
            "m",
            [10, 0, 0, 0, 0] if n % 2 else [0, 0, 10, 0, 0],
            {"OK": 9, "INTERNAL": 1},
            sketch({"120": 50, "121": 50}, {"121": 10, "122": 90}),
        )
        rows.append((ident, "rollup", "model", moment, body))
        rows.append((ident + 1, "sample", "system", moment + timedelta(seconds=5), {"cpu": 0.5}))
        ident += 2
    # ids 200..209 went to the budget (described), 220..224 vanished (not described)
    rows.append(
        (
            230,
            "event",
            "drop",
            NOW - timedelta(minutes=1),
            {
                "class": "sample",
                "count": 10,
                "first_id": 200,
                "last_id": 209,
                "first_time": iso(t0),
                "last_time": iso(t0),
            },
        )
    )
    rows.append((231, "event", "restart", NOW, {"kind_of": "unknown shapes are ignored"}))
    rows.append((219, "sample", "system", NOW - timedelta(minutes=2), {}))
    rows.append((210, "sample", "system", NOW - timedelta(minutes=2), {}))
    for i in range(211, 219):
        rows.append((i, "sample", "system", NOW - timedelta(minutes=2), {}))
    for i in range(225, 230):
        rows.append((i, "sample", "system", NOW - timedelta(minutes=2), {}))
    write(path, "dev-1", rows)
    return path


def report(db: Path, hours: float = 48) -> dict:
    store = RecordStore(db, create=False)
    try:
        return build_report(store, since=NOW - timedelta(hours=hours), now=NOW)
    finally:
        store.close()


def test_gaps_covered_by_drop_events_are_explained_the_rest_listed(db: Path) -> None:
    dev = report(db)["devices"][0]
    assert dev["explained_gaps"] == [[200, 209]]
    assert [3, 99] in dev["unexplained_gaps"]  # between day one and the last hour
    assert [160, 199] in dev["unexplained_gaps"]  # the outage issued no ids; lost, not dropped
    assert [220, 224] in dev["unexplained_gaps"]
    assert dev["dropped"] == {"sample": 10}


def test_unexplained_gaps_are_empty_when_nothing_was_lost(tmp_path: Path) -> None:
    path = tmp_path / "clean.db"
    t = NOW - timedelta(minutes=5)
    rows: list[tuple[int, str, str, datetime, dict]]
    rows = [(i, "rollup", "model", t + timedelta(seconds=i), {}) for i in range(1, 11)]
    rows += [
        (
            11,
            "event",
            "drop",
            t + timedelta(seconds=11),
            {"class": "rollup", "count": 4, "first_id": 12, "last_id": 15},
        )
    ]
    rows += [(i, "rollup", "model", t + timedelta(seconds=i), {}) for i in range(16, 20)]
    # a fresh buffer started above the ids reserved before it
    rows += [
        (
            4200,
            "event",
            "buffer_reset",
            t + timedelta(seconds=30),
            {"reason": "file missing", "moved_aside": None, "ids_issued_up_to": 4199},
        )
    ]
    write(path, "dev-2", rows)
    dev = report(path)["devices"][0]
    assert dev["unexplained_gaps"] == []
    assert dev["explained_gaps"] == [[12, 15]] and dev["reset_gaps"] == [[20, 4199]]


def test_offline_spans_and_last_seen(db: Path) -> None:
    dev = report(db, hours=2)["devices"][0]
    t0 = NOW - timedelta(hours=1)
    outage = [iso(t0 + timedelta(seconds=195)), iso(t0 + timedelta(seconds=500))]
    assert outage in dev["offline_spans"]
    assert dev["last_seen"] == iso(NOW)


def test_percentiles_come_from_merged_histograms(db: Path) -> None:
    model = report(db, hours=2)["devices"][0]["models"][0]
    # 30 rollups: 15 with 10 requests in (0, 1 ms], 15 with 10 in (2, 4 ms] -> 300 requests.
    # p50: rank 150 ends bucket one exactly -> 1 ms; p99: rank 297 is 147/150 into (2, 4]
    # -> 2 + 2 * 147/150 = 3.96 ms. Errors: 1 of every 10.
    summary = model["summary"]
    assert summary["requests"] == 300 and summary["errors"] == 30
    assert summary["p50_ms"] == pytest.approx(1.0)
    assert summary["p99_ms"] == pytest.approx(3.96)
    assert summary["error_rate"] == pytest.approx(0.1)
    assert sum(p["requests"] for p in model["trend"]) == 300
    assert all(p["p50_ms"] is not None for p in model["trend"])


def test_psi_flags_a_shifted_input_and_not_a_stable_one(db: Path) -> None:
    drift = {d["name"]: d for d in report(db)["devices"][0]["models"][0]["drift"]}
    assert drift["stable"]["max_psi"] == pytest.approx(0.0)
    assert not drift["stable"]["flagged"]
    assert drift["moving"]["max_psi"] > PSI_THRESHOLD and drift["moving"]["flagged"]
    assert psi([50, 50], [50, 50]) == 0.0
    assert psi([90, 10], [10, 90]) > 1.0


def test_json_shape_through_the_cli(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "report", "--db", str(db), "--since", "48h", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"generated", "since", "bucket_s", "psi_threshold", "devices"}
    dev = doc["devices"][0]
    assert dev["device"] == "dev-1"
    for key in (
        "last_seen",
        "offline_spans",
        "records",
        "by_class",
        "id_range",
        "explained_gaps",
        "unexplained_gaps",
        "dropped",
        "models",
    ):
        assert key in dev
    assert all(isinstance(g, list) and len(g) == 2 for g in dev["unexplained_gaps"])
    assert {"model", "version", "summary", "trend", "drift"} <= set(dev["models"][0])


def test_table_and_plot(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png = tmp_path / "fleet.png"
    assert main(["fleet", "report", "--db", str(db), "--since", "2h", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "device dev-1" in out and "unexplained 160..199, 220..224" in out and "moving" in out
    data = png.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


def test_a_missing_records_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["fleet", "report", "--db", str(tmp_path / "none.db")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no telemetry records file" in err
    assert main(["fleet", "report", "--db", str(tmp_path / "none.db"), "--since", "soon"]) == 2


# -- --baseline ARCHIVE: the archive's sample inputs as the drift baseline ------------------


@pytest.fixture
def sample_rows(tmp_path: Path) -> np.ndarray:
    """Eight rows of the MLP's input ``x`` (16 floats), well away from zero."""
    rows = np.random.default_rng(7).uniform(0.5, 2.0, (8, 16)).astype(np.float32)
    np.save(tmp_path / "sample.npy", rows)
    return rows


@pytest.fixture
def sampled_archive(mlp_archive_factory: Any, sample_rows: np.ndarray, tmp_path: Path) -> Path:
    """An MLP archive (``edgeserve package --sample-input x=...``) holding ``sample_rows``."""
    return mlp_archive_factory(
        "1", name="mlp", sample_inputs=[("x", tmp_path / "sample.npy")], max_batch_size=8
    )


def device_rollups(db: Path, device: str, batches: list[np.ndarray]) -> None:
    """Rollups of ``mlp`` version 1 every 10 s over the last hour, each with the drift
    sketch the device makes (``DriftSketch.take()``) of one batch of ``x``."""
    start = NOW - timedelta(minutes=50)
    rows: list[tuple[int, str, str, datetime, dict]] = []
    for n, batch in enumerate(batches):
        sketcher = DriftSketch(budget=1.0)
        sketcher.observe_batch({"x": torch.from_numpy(batch)}, {})
        body = rollup("mlp", [10, 0, 0, 0, 0], {"OK": 10}, sketcher.take())
        rows.append((n + 1, "rollup", "model", start + timedelta(seconds=10 * n), body))
    write(db, device, rows)


def test_an_archive_baseline_flags_shifted_inputs_not_matching_ones(
    sampled_archive: Path, sample_rows: np.ndarray, tmp_path: Path
) -> None:
    db = tmp_path / "fleet.db"
    device_rollups(db, "same", [sample_rows[i % 8 :][:4] for i in range(30)])
    device_rollups(db, "shifted", [sample_rows[:4] * 10.0 for _ in range(30)])
    baseline = archive_baseline(sampled_archive)
    assert (baseline.model, baseline.version, baseline.rows) == ("mlp", "1", 8)
    store = RecordStore(db, create=False)
    try:
        doc = build_report(store, since=NOW - timedelta(hours=2), now=NOW, baselines=[baseline])
    finally:
        store.close()
    by_device = {d["device"]: d["models"][0] for d in doc["devices"]}
    for device, flagged in (("same", False), ("shifted", True)):
        model = by_device[device]
        assert model["baseline"] == "archive"
        (entry,) = model["drift"]
        assert entry["name"] == "x" and entry["baseline"] == "archive"
        assert entry["flagged"] is flagged, (device, entry)
        assert entry["baseline_rows"] == 8 and entry["few_baseline_rows"]
    assert by_device["same"]["drift"][0]["max_psi"] < 0.1
    assert doc["baselines"] == [
        {
            "archive": str(sampled_archive),
            "model": "mlp",
            "version": "1",
            "rows": 8,
            "few_rows": True,
        }
    ]


def test_baseline_through_the_cli(
    sampled_archive: Path,
    sample_rows: np.ndarray,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    db = tmp_path / "fleet.db"
    device_rollups(db, "dev", [sample_rows[:4] * 10.0 for _ in range(30)])
    argv = ["fleet", "report", "--db", str(db), "--since", "2h"]
    assert main([*argv, "--json", "--baseline", str(sampled_archive)]) == 0
    model = json.loads(capsys.readouterr().out)["devices"][0]["models"][0]
    assert model["baseline"] == "archive" and model["drift"][0]["flagged"]
    assert main([*argv, "--json"]) == 0  # without it: the first day, as before
    assert json.loads(capsys.readouterr().out)["devices"][0]["models"][0]["baseline"] == (
        "first_day"
    )
    assert main([*argv, "--baseline", str(sampled_archive)]) == 0
    out = capsys.readouterr().out
    assert "baseline: archive samples, 8 rows, few rows: < 30" in out
    assert "8 sample rows of" in out and "x " in out


def test_a_missing_or_corrupt_baseline_exits_2(
    sampled_archive: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = tmp_path / "fleet.db"
    device_rollups(db, "dev", [np.ones((2, 16), np.float32)])
    corrupt = tmp_path / "corrupt.esar"
    data = bytearray(sampled_archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    for archive, said in ((tmp_path / "none.esar", "no such file"), (corrupt, "corrupt.esar")):
        assert main(["fleet", "report", "--db", str(db), "--baseline", str(archive)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and said in err, err
    twice = ["--baseline", str(sampled_archive)] * 2
    assert main(["fleet", "report", "--db", str(db), *twice]) == 2
    assert "two archives of mlp version 1" in capsys.readouterr().err
