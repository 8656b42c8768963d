"""A config file nested deeper than the YAML parser can recurse is a ConfigError naming the
file, and `edgeserve status` with that file says so in one line (exit 2)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from edgeserve.config.load import load_config
from edgeserve.errors import ConfigError

DEEP = "a: " + "[" * 5000 + "]" * 5000 + "\n"


def test_deep_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(DEEP)
    with pytest.raises(ConfigError) as err:
        load_config(path, env={})
    assert str(err.value) == f"{path}: invalid YAML: nested too deeply"


def test_status_with_a_deep_config_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "deep.yaml"
    path.write_text(DEEP)
    done = subprocess.run(
        [sys.executable, "-m", "edgeserve", "status", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert done.stderr == f"edgeserve: error: {path}: invalid YAML: nested too deeply\n"
