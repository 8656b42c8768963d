"""`edgeserve status` against a running daemon (healthy, degraded) and a stopped one."""

from __future__ import annotations

import json

from tests.management.conftest import management_address, run_cli


def _status(daemon, *extra: str):
    return run_cli("status", "--management", management_address(daemon), *extra)


def test_status_of_a_healthy_daemon(mdaemons, mlp_archive_factory):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    with daemon.client() as client:
        for _ in range(5):
            client.infer("mlp", {"x": __import__("numpy").ones((1, 16), dtype="float32")})

    table = _status(daemon)
    assert table.returncode == 0, table.stdout + table.stderr
    assert "daemon up, ready" in table.stdout and "health: HEALTHY" in table.stdout
    header = next(line for line in table.stdout.splitlines() if line.startswith("MODEL"))
    for column in ("VERSION", "DEFAULT", "STATE", "INST", "DEVICE", "QUEUE", "REQ/S", "P99_MS"):
        assert column in header
    row = next(line for line in table.stdout.splitlines() if line.startswith("mlp"))
    assert row.split()[:4] == ["mlp", "1", "*", "READY"]
    assert "system: cpu" in table.stdout and "rss" in table.stdout

    done = _status(daemon, "--json")
    assert done.returncode == 0
    doc = json.loads(done.stdout)
    assert doc["health"] == "healthy" and doc["problems"] == []
    assert doc["daemon"]["up"] and doc["daemon"]["ready"] and doc["daemon"]["uptime_s"] > 0
    assert doc["daemon"]["pid"] == daemon.process.pid
    [model] = doc["models"]
    assert (model["name"], model["version"], model["state"], model["default"]) == (
        "mlp",
        "1",
        "READY",
        True,
    )
    assert model["instances"] == 1 and model["device"] == "cpu" and model["last_load_at"] > 0
    assert model["queue_depth"] == 0  # from the batcher, through the recorders
    for key in ("requests_per_s", "p50_ms", "p99_ms", "errors", "requests_total"):
        assert key in model  # figures of the inference edge's recorders (null if none)
    assert doc["system"]["process"]["rss_bytes"] > 50 * 2**20
    assert doc["system"]["disk"]["free_bytes"] > 0


def test_status_is_degraded_after_a_failed_restore(mdaemons, mlp_archive_factory):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    assert daemon.terminate() == 0
    live = daemon.state_dir / "live.json"
    state = json.loads(live.read_text())
    state["models"].append({"name": "mlp", "version": "7", "default": False, "settings": {}})
    live.write_text(json.dumps(state))

    again = mdaemons.start(state_dir=daemon.state_dir)
    done = _status(again, "--json")
    assert done.returncode == 1, done.stdout
    doc = json.loads(done.stdout)
    assert doc["health"] == "degraded"
    assert any("could not restore mlp/7" in e["message"] for e in doc["recent_errors"])
    states = [(m["name"], m["version"], m["state"]) for m in doc["models"]]
    assert states == [("mlp", "1", "READY"), ("mlp", "7", "FAILED")]
    assert "model mlp version 7 is FAILED" in doc["problems"]
    table = _status(again)
    assert table.returncode == 1 and "health: DEGRADED" in table.stdout
    assert "could not restore mlp/7" in table.stdout
    rows = [line.split() for line in table.stdout.splitlines()]
    assert ["mlp", "7", "FAILED"] in [row[:3] for row in rows]


def test_status_of_a_stopped_daemon_reads_the_state_files(mdaemons, mlp_archive_factory):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    assert daemon.terminate() == 0
    at = ("--config", str(daemon.config))

    table = run_cli("status", *at)
    assert table.returncode == 3, table.stdout + table.stderr
    assert "daemon is DOWN" in table.stdout
    row = next(line for line in table.stdout.splitlines() if line.startswith("mlp"))
    assert row.split()[:4] == ["mlp", "1", "*", "NOT_RUNNING"]

    done = run_cli("status", "--json", *at)
    assert done.returncode == 3
    doc = json.loads(done.stdout)
    assert doc["health"] == "down" and doc["daemon"]["up"] is False
    assert [(m["name"], m["version"], m["default"]) for m in doc["models"]] == [("mlp", "1", True)]
    assert doc["system"]["disk"]["path"] == str(daemon.state_dir)
