"""`edgeserve status`: 0 for a healthy daemon, and 3 with the offline document (what the
state files say was live) when the daemon cannot be reached."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeserve.cli import main
from tests.cli.conftest import assert_one_error_line
from tests.conftest import RunningDaemon


def _status(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["status", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_healthy_daemon_exits_0(
    served: RunningDaemon, at: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _status(capsys, *at)
    assert (code, err) == (0, "")
    assert "daemon up, ready" in out and "health: HEALTHY" in out
    row = next(line for line in out.splitlines() if line.startswith("mlp"))
    assert row.split()[:4] == ["mlp", "1", "*", "READY"]

    code, out, err = _status(capsys, *at, "--json")
    assert (code, err) == (0, "")
    doc = json.loads(out)
    assert doc["health"] == "healthy" and doc["daemon"]["up"] is True
    assert doc["daemon"]["pid"] == served.process.pid
    assert [(m["name"], m["version"]) for m in doc["models"]] == [("mlp", "1")]


def test_an_unreachable_daemon_exits_3_with_the_state_files(
    served: RunningDaemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The daemon's config (its state_dir) with an address nobody listens on: the document
    is built from the state files, as for a stopped daemon."""
    nobody = f"unix://{tmp_path}/none.sock"
    argv = ("--config", str(served.config), "--management", nobody, "--timeout", "10")
    code, out, err = _status(capsys, *argv)
    assert (code, err) == (3, "")
    lines = out.splitlines()
    assert lines[0] == (
        f"edgeserve: daemon is DOWN (not reachable at {nobody}); live set from the state files"
    )
    row = next(line for line in lines if line.startswith("mlp"))
    assert row.split()[:2] == ["mlp", "1"]
    assert any(f"daemon not reachable at {nobody}" in line for line in lines), out

    code, out, err = _status(capsys, *argv, "--json")
    assert (code, err) == (3, "")
    doc = json.loads(out)
    assert doc["health"] == "down" and doc["daemon"]["up"] is False
    assert [(m["name"], m["version"]) for m in doc["models"]] == [("mlp", "1")]


def test_no_state_files_and_no_daemon_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\nrun_dir: {tmp_path / 'run'}\n")
    code, out, err = _status(capsys, "--config", str(config), "--json")
    assert (code, err) == (3, "")
    doc = json.loads(out)
    assert doc["daemon"]["up"] is False and doc["models"] == []


def test_a_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("management:\n  listen: 42\n")
    code, out, err = _status(capsys, "--config", str(config))
    assert (code, out) == (2, "")
    assert_one_error_line(err, "management.listen")
