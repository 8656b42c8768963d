"""`edgeserve` itself: no command, --version, --help, and a help page for every command."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve import __version__
from edgeserve.cli import COMMANDS, main
from edgeserve.cli.models import ACTIONS
from tests.cli.conftest import assert_usage_error


def test_no_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert_usage_error(err, "", "COMMAND")


def test_unknown_command_names_the_choices(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["deploy"]) == 2
    line = assert_usage_error(capsys.readouterr().err, "", "'deploy'")
    for name in COMMANDS:
        assert name in line


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    out, err = capsys.readouterr()
    assert out.strip() == f"edgeserve {__version__}"
    assert err == ""


def test_top_level_help_lists_every_command_and_the_exit_codes(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert f"    {name}" in out
    assert "exit codes: 0 success, 1 operation failed, 2 usage/config/archive error" in out
    assert "3 daemon not reachable" in out


@pytest.mark.parametrize(
    "argv",
    [[name] for name in COMMANDS if name != "models"] + [["models", a] for a in ACTIONS],
    ids=lambda argv: " ".join(argv),
)
def test_every_command_has_help_with_an_example(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([*argv, "--help"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert out.startswith(f"usage: edgeserve {' '.join(argv)}")
    assert "example:\n  edgeserve " + " ".join(argv) in out
    assert "exit codes:" in out


def test_models_without_an_action_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 2
    line = assert_usage_error(capsys.readouterr().err, "models", "ACTION")
    assert "required" in line


def test_an_unknown_option_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--colour"]) == 2
    assert_usage_error(capsys.readouterr().err, "", "unrecognized arguments: --colour")


def test_a_reader_that_goes_away_ends_the_command_quietly(tmp_path: Path) -> None:
    # `edgeserve keygen ... | head -0`: the pipe is closed before anything is written.
    import subprocess
    import sys

    with subprocess.Popen(
        [sys.executable, "-m", "edgeserve", "keygen", "--out", str(tmp_path / "k")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as child:
        assert child.stdout is not None and child.stderr is not None
        child.stdout.close()
        stderr = child.stderr.read().decode()
        assert child.wait(timeout=60) == 141, stderr
    assert stderr == ""
