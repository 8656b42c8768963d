"""Fixtures for config tests: real YAML files on disk, real key / archive / token files."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

WriteYaml = Callable[[str], Path]


@pytest.fixture
def write_yaml(tmp_path: Path) -> WriteYaml:
    """Write ``text`` (dedented) to ``<tmp>/etc/config.yaml`` and return the path."""

    def write(text: str) -> Path:
        path = tmp_path / "etc" / "config.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return write


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    """An archive, a public key and a token file (mode 0640), all real files."""
    out = {
        "archive": tmp_path / "etc" / "mlp-1.esar",
        "key": tmp_path / "etc" / "fleet.pub",
        "token": tmp_path / "etc" / "token",
    }
    for name, path in out.items():
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"not inspected by config; it only has to exist: " + name.encode())
    out["token"].chmod(0o640)
    return out
