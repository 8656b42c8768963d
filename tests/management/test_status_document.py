"""The status document on its own: verdicts, renderers, the recent-errors ring."""

from __future__ import annotations

import json
import logging

from edgeserve.store.model_store import LiveEntry
from edgeserve.telemetry.status import (
    DaemonFacts,
    ModelFacts,
    RecentErrors,
    build_status,
    exit_code,
    offline_models,
    render_json,
    render_table,
)
from edgeserve.types import BatchingSettings

NOW = 1_800_000_000.0
UP = DaemonFacts(up=True, ready=True, pid=42, version="0.1.0", started_at=NOW - 3700)
READY = ModelFacts("mlp", "2", "READY", True, {"instances": 1}, 1, "cpu", NOW - 60, 0.2, 0)


def _recorders(errors: dict[str, int]) -> dict:
    window = {"requests_per_s": 12.5, "p50_s": 0.0004, "p99_s": 0.002, "errors": errors}
    return {
        "models": [
            {
                "model": "mlp",
                "version": "2",
                "window": window,
                "queue_depth": 3,
                "requests": {"OK": 100, **errors},
                "last_load_at": NOW - 60,
            }
        ]
    }


def test_healthy_document_with_figures() -> None:
    doc = build_status(daemon=UP, models=[READY], recorders=_recorders({}), now=NOW)
    assert doc["health"] == "healthy" and exit_code(doc) == 0
    [model] = doc["models"]
    assert model["p50_ms"] == 0.4 and model["p99_ms"] == 2.0 and model["queue_depth"] == 3
    assert model["requests_per_s"] == 12.5 and model["errors"] == {}
    assert doc["daemon"]["uptime_s"] == 3700
    assert json.loads(render_json(doc)) == doc
    table = render_table(doc)
    assert "daemon up, ready, uptime 1h01m" in table and "HEALTHY" in table
    assert "12.5" in table and "0.40" in table


def test_figures_are_null_without_recorders() -> None:
    doc = build_status(daemon=UP, models=[READY], now=NOW)
    [model] = doc["models"]
    assert model["p99_ms"] is None and model["errors"] is None and model["queue_depth"] is None
    assert doc["system"] is None
    assert "system: -" in render_table(doc)


def test_degraded_verdicts() -> None:
    loading = ModelFacts("mlp", "3", "LOADING", False)
    cases = [
        build_status(daemon=UP, models=[READY, loading], now=NOW),
        build_status(daemon=UP, models=[READY], recorders=_recorders({"INTERNAL": 2}), now=NOW),
        build_status(daemon=DaemonFacts(up=True, ready=False), models=[], now=NOW),
        build_status(daemon=UP, models=[], notes=["mlp/7: not installed"], now=NOW),
        build_status(
            daemon=UP,
            models=[],
            recent_errors=[{"time": NOW - 5, "level": "ERROR", "logger": "x", "message": "m"}],
            now=NOW,
        ),
    ]
    for doc in cases:
        assert doc["health"] == "degraded" and exit_code(doc) == 1, doc["problems"]
        assert doc["problems"]
    assert "DEGRADED" in render_table(cases[0]) and "mlp version 3 is LOADING" in render_table(
        cases[0]
    )


def test_client_faults_and_old_errors_do_not_degrade() -> None:
    old = [{"time": NOW - 7200, "level": "ERROR", "logger": "x", "message": "long ago"}]
    warning = [{"time": NOW - 1, "level": "WARNING", "logger": "x", "message": "meh"}]
    for errors, recent in (({"INVALID_ARGUMENT": 5}, old), ({"NOT_FOUND": 1}, warning)):
        doc = build_status(
            daemon=UP, models=[READY], recorders=_recorders(errors), recent_errors=recent, now=NOW
        )
        assert doc["health"] == "healthy", doc["problems"]


def test_down_document_from_the_state_files() -> None:
    entries = [
        LiveEntry("mlp", "1", True, BatchingSettings(instances=2), device="cpu"),
        LiveEntry("mlp", "2", False),
    ]
    doc = build_status(
        daemon=DaemonFacts(up=False, address="unix:///run/x.sock"),
        models=offline_models(entries),
        notes=["daemon not reachable"],
        now=NOW,
    )
    assert doc["health"] == "down" and exit_code(doc) == 3
    assert [(m["version"], m["state"], m["instances"]) for m in doc["models"]] == [
        ("1", "NOT_RUNNING", 2),
        ("2", "NOT_RUNNING", None),
    ]
    assert doc["models"][0]["settings"] == {"instances": 2, "device": "cpu"}
    assert doc["models"][0]["device"] == "cpu"
    table = render_table(doc)
    assert "DOWN" in table and "unix:///run/x.sock" in table and "NOT_RUNNING" in table


def test_recent_errors_ring_is_bounded_and_keeps_warnings_up() -> None:
    ring = RecentErrors(capacity=3)
    logger = logging.getLogger("edgeserve.test_ring")
    logger.addHandler(ring)
    logger.propagate = False
    try:
        logger.info("not kept")
        for i in range(5):
            logger.error("failure %d of model %s", i, "mlp")
        logger.warning("last")
    finally:
        logger.removeHandler(ring)
        logger.propagate = True
    entries = ring.entries()
    assert [e["message"] for e in entries] == [
        "failure 3 of model mlp",
        "failure 4 of model mlp",
        "last",
    ]
    assert entries[-1]["level"] == "WARNING" and entries[-1]["logger"] == "edgeserve.test_ring"
