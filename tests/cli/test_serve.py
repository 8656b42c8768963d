"""`edgeserve serve` refusing a bad configuration: exit 2, one line naming the key (and
where it is), no traceback, and no daemon started. (A good configuration starts a daemon
that runs until SIGTERM: every daemon fixture runs `serve` as a child process.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from edgeserve.cli import main
from tests.cli.conftest import assert_one_error_line


def _serve(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, config_text: str | None, *flags: str
) -> str:
    argv = ["serve", "--state-dir", str(tmp_path / "state")]
    if config_text is not None:
        config = tmp_path / "config.yaml"
        config.write_text(config_text)
        argv += ["--config", str(config)]
    assert main([*argv, *flags]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert not (tmp_path / "state" / "models").exists(), "nothing started"
    return err


def test_a_value_out_of_range_names_the_key_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _serve(capsys, tmp_path, "server:\n  grace_period_s: -1\n")
    assert_one_error_line(err, "server.grace_period_s: must be", "got -1", "config.yaml line 2")


def test_an_unknown_key_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = _serve(capsys, tmp_path, "batching:\n  max_batch_sise: 4\n")
    assert_one_error_line(err, "batching.max_batch_sise")


def test_invalid_yaml_names_the_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _serve(capsys, tmp_path, "server: [\n")
    assert_one_error_line(err, "config.yaml: invalid YAML at line 2")


def test_a_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nowhere.yaml"
    assert main(["serve", "--config", str(missing), "--state-dir", str(tmp_path / "s")]) == 2
    assert_one_error_line(capsys.readouterr().err, f"{missing}: cannot read")


@pytest.mark.parametrize(
    ("flag", "key"),
    [
        (("--listen", "bogus"), "server.listen"),
        (("--device", "tpu"), "runtime.device"),
        (("--log-level", "loud"), "logging.level"),
        (("--management", "http://127.0.0.1:1"), "management.listen"),
        (("--model", "/nonexistent/mlp-1.esar"), "models[0].archive: file not found"),
    ],
    ids=lambda v: v[0] if isinstance(v, tuple) else None,
)
def test_a_bad_flag_names_the_key_it_sets(
    flag: tuple[str, str], key: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    err = _serve(capsys, tmp_path, None, *flag)
    assert_one_error_line(err, key, flag[1])
