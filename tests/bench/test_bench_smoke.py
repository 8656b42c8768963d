"""The bench must keep running: its quickest configuration end to end, plus its parsers.

The smoke run builds the tiny MLP archive, starts the echo server and a real daemon,
measures raw torch, drives two closed-loop cases for half a second each, and writes the
JSON and the plot; the test checks the document's shape and that the figures are sane.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.cases import all_cases, select
from bench.drivers import with_id
from bench.profile import summarize_stacks
from bench.report import median_tree, telemetry_table
from bench.targets import case_ratios, targets
from edgeserve.proto import kserve_v2_pb2 as pb

REPO = Path(__file__).resolve().parents[2]
CASE_KEYS = {"throughput", "ok", "p50_ms", "p95_ms", "p99_ms", "errors", "cpu", "attempts"}


@pytest.mark.slow
def test_quick_bench_writes_sane_json(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "bench", "--quick", "--no-idle", "--retries", "0",
        "--only", "echo-uds-c1,mlp-uds-c1", "--duration", "0.5", "--warmup", "0.2",
        "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (json_path,) = tmp_path.glob("bench-*.json")
    assert (json_path.with_suffix(".png")).stat().st_size > 0
    document = json.loads(json_path.read_text())
    assert set(document) >= {"meta", "median", "repeats"}
    cases = document["median"]["cases"]
    assert set(cases) == {"echo-uds-c1", "mlp-uds-c1"}
    for name, figures in cases.items():
        assert CASE_KEYS <= set(figures), name
        assert figures["throughput"] > 0, name
        assert 0 < figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"], name
        assert figures["errors"] == {}, name
    assert cases["mlp-uds-c1"]["mean_batch"] == pytest.approx(1.0)
    raw = document["median"]["raw"]["mlp"]
    assert raw["best_throughput"] > 0 and raw["batch1"]["p50_ms"] > 0
    assert raw["batch1_after_idle"]["p50_ms"] > 0 and raw["batch1_after_idle"]["gap_ms"] == 1.0
    assert re.search(r"raw torch mlp .* ms after 1 ms idle", done.stdout)
    ratios = document["median"]["ratios"]["mlp-uds-c1"]
    assert ratios["vs_echo_throughput"] > 0 and ratios["vs_raw_throughput"] > 0
    verdicts = {row["key"]: row["verdict"] for row in document["median"]["targets"]}
    assert verdicts["c32_uds"] == "n/a"  # not measured in this run: never a verdict
    assert "verdict" in done.stdout and "mlp-uds-c1" in done.stdout  # both tables printed


@pytest.mark.slow
def test_telemetry_pair_runs_and_reports_its_ratios_and_write_cost(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "bench", "--quick", "--no-idle", "--retries", "0",
        "--only", "telemetry", "--duration", "0.3", "--warmup", "0.1",
        "--telemetry-intervals", "2", "--out", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (json_path,) = tmp_path.glob("bench-*.json")
    median = json.loads(json_path.read_text())["median"]
    for level in (8, 32):
        on, off = (
            median["cases"][f"mlp-telon-uds-c{level}"],
            median["cases"][f"mlp-teloff-uds-c{level}"],
        )
        assert on["throughput"] > 0 and off["throughput"] > 0 and on["errors"] == {}
        ratio = median["ratios"][f"mlp-telon-uds-c{level}"]["vs_mlp-teloff_throughput"]
        assert ratio == pytest.approx(on["throughput"] / off["throughput"])
    cost = median["telemetry_cost"]
    assert cost["rows_per_interval"] >= 5 and cost["append_ms_p50"] > 0
    verdicts = {row["key"]: row["verdict"] for row in median["targets"]}
    assert verdicts["telemetry_c32"] in {"PASS", "MISS"}
    assert "telemetry on/off uds-c32 throughput" in done.stdout
    assert "buffer writes per interval" in done.stdout


def test_the_telemetry_pair_is_opt_in_and_interleaved() -> None:
    default = {c.name for c in select(all_cases(), None)}
    assert not any(name.startswith("mlp-tel") for name in default)
    assert [c.name for c in select(all_cases(), "telemetry")] == [
        "mlp-teloff-uds-c8",
        "mlp-telon-uds-c8",
        "mlp-telon-uds-c32",
        "mlp-teloff-uds-c32",
    ]


def test_the_telemetry_upload_pair_is_registered_opt_in_and_reported() -> None:
    """Its run needs a Mosquitto (bench/broker.py), so CI checks the registration, the
    ratio and the printed lines; the run itself is ``--only telemetry-upload``."""
    default = {c.name for c in select(all_cases(), None)}
    assert not any(name.startswith("mlp-telup") for name in default)
    chosen = select(all_cases(), "telemetry-upload")
    assert [(c.name, c.phase) for c in chosen] == [
        ("mlp-telup-uds-c8-idle", "idle"),
        ("mlp-telup-uds-c8-upload", "upload"),
    ]
    assert not any(c.name.startswith("mlp-telup") for c in select(all_cases(), "telemetry"))
    repeat = {
        "cases": {
            "mlp-telup-uds-c8-idle": {"throughput": 500.0, "p50_ms": 10.0, "p99_ms": 20.0},
            "mlp-telup-uds-c8-upload": {"throughput": 490.0, "p50_ms": 10.5, "p99_ms": 21.0},
        }
    }
    ratios = case_ratios(repeat, chosen[1])
    assert ratios["vs_idle_p99_ms"] == pytest.approx(1.05)
    (target,) = [t for t in targets() if t.key == "telemetry_upload_p99"]
    assert target.measure(repeat) == pytest.approx(1.05) and target.passes(1.05)
    upload = {"upload_bytes_per_s": 65536.0, "upload_vs_cap": 1.0, "rate_cap_bytes_per_s": 65536}
    summary = {
        "cases": {**repeat["cases"], "mlp-telup-uds-c8-upload": {
            **repeat["cases"]["mlp-telup-uds-c8-upload"],
            "upload": {**upload, "backlog_rows_before": 900, "backlog_rows_after": 800},
        }},
        "ratios": {"mlp-telup-uds-c8-upload": ratios},
    }  # fmt: skip
    table = telemetry_table(summary) or ""
    assert "uploading/idle p99 1.050" in table and "1.00 of upload_bytes_per_s" in table


def test_streamed_request_ids_are_appended_to_the_serialized_payload() -> None:
    request = pb.ModelInferRequest(model_name="mlp")
    request.raw_input_contents.append(b"\x00" * 8)
    payload = request.SerializeToString()
    parsed = pb.ModelInferRequest.FromString(with_id(payload, b"1234"))
    assert parsed.id == "1234"
    assert parsed.model_name == "mlp" and parsed.raw_input_contents[0] == b"\x00" * 8


def test_median_tree_takes_medians_of_numbers_key_by_key() -> None:
    merged = median_tree([{"a": 1.0, "b": {"c": 5}}, {"a": 3.0, "b": {"c": 1}}, {"a": 2.0}])
    assert merged == {"a": 2.0, "b": {"c": 3.0}}
    assert median_tree([None, None]) is None


def test_profile_summary_attributes_libc_time_to_its_caller() -> None:
    stacks = (
        "thread (7): MainThread;run (asyncio/base_events.py:1);"
        "0x1 (grpc/_cython/cygrpc.so);sendmsg (libc.so.6) 3\n"
        "thread (7): MainThread;run (asyncio/base_events.py:1);"
        "submit (agent/serving/batching.py:9) 1\n"
    )
    summary = summarize_stacks(stacks)
    assert summary["samples"] == 4
    assert dict(summary["owners"]) == {
        "grpc (Cython/C core)": 0.75,
        "edgeserve.serving.batching": 0.25,
    }
    assert dict(summary["areas_self"])["libc sendmsg"] == 0.75
    assert math.isclose(dict(summary["threads"])["MainThread"], 1.0)
