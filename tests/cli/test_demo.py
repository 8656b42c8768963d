"""`edgeserve demo` through main(): keygen, package, a real daemon, requests, SIGTERM."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.cli import main
from tests.cli.conftest import assert_one_error_line, assert_usage_error


@pytest.mark.slow
def test_the_demo_runs_and_stops_cleanly(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "demo"
    assert main(["demo", "--state-dir", str(state), "--requests", "5"]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    lines = out.splitlines()
    assert lines[0] == f"edgeserve demo: working in {state}"
    assert lines[1].startswith("packaged demo-mlp-1.esar: int8 dynamic-quantized MLP, signed")
    assert "daemon ready in" in out
    assert "request 1 -> demo-mlp v1: output__0 [1, 10]" in out
    assert "5 sequential requests over the Unix socket: p50" in out
    assert lines[-1] == "daemon stopped cleanly (exit 0)"
    assert (state / "keys" / "demo.key").is_file() and (state / "demo-mlp-1.esar").is_file()


@pytest.mark.parametrize("count", ["0", "-3", "many"])
def test_requests_must_be_a_positive_count(
    count: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    state = tmp_path / "demo"
    assert main(["demo", "--state-dir", str(state), "--requests", count]) == 2
    assert_usage_error(capsys.readouterr().err, "demo", "argument --requests:")
    assert not state.exists(), "refused before anything was built"


def test_a_state_dir_that_cannot_be_made(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "plain").write_text("a file, not a folder")
    state = tmp_path / "plain" / "demo"
    assert main(["demo", "--state-dir", str(state)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_one_error_line(err, f"demo: --state-dir {state}: Not a directory")
