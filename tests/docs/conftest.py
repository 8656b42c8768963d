"""Fixtures for the docs tests: a working folder that looks like a user's, and its PATH."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

# The venv that runs the tests; `edgeserve` below is its real console script.
VENV_BIN = Path(sys.executable).parent


@pytest.fixture
def workdir() -> Iterator[Path]:
    """An empty folder under /tmp, short enough for Unix socket paths below it.

    It holds a ``.venv`` link to the test venv, so the quick start's ``.venv/bin/edgeserve``
    resolves as it does in a checkout; nothing else is prepared.
    """
    path = Path(tempfile.mkdtemp(prefix="es-readme-"))
    (path / ".venv").symlink_to(VENV_BIN.parent, target_is_directory=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def user_env() -> dict[str, str]:
    """The environment a user with the venv on PATH has; no EDGESERVE_* leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGESERVE_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env
