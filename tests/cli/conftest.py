"""Fixtures for the command-line tests: a real daemon per module, and the checks every
error path shares (one clean line on stderr, never a traceback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonFactory, RunningDaemon
from tests.management.conftest import management_address


@pytest.fixture(scope="module")
def served(
    tmp_path_factory: pytest.TempPathFactory,
    signing_key: tuple[Path, Path],
    mlp_archive_factory: Any,
) -> Iterator[RunningDaemon]:
    """One real daemon for the module, serving mlp version 1 (built by `edgeserve package`).

    Tests that change what is live put it back as they found it."""
    factory = DaemonFactory(tmp_path_factory.mktemp("cli-daemon"), signing_key[1])
    try:
        yield factory.start(mlp_archive_factory("1"))
    finally:
        factory.stop_all()


@pytest.fixture
def at(served: RunningDaemon) -> tuple[str, str]:
    """``--management ADDR`` of the module's daemon."""
    return ("--management", management_address(served))


def assert_one_error_line(err: str, *fragments: str) -> str:
    """stderr is exactly one ``edgeserve: error: ...`` line naming every fragment."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert lines[0].startswith("edgeserve: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def assert_usage_error(err: str, command: str, *fragments: str) -> str:
    """argparse's refusal: the usage, then ``edgeserve COMMAND: error: ...`` naming each
    fragment; no traceback."""
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: edgeserve"), err
    prefix = f"edgeserve {command}: error: " if command else "edgeserve: error: "
    assert lines[-1].startswith(prefix), f"{prefix!r} does not start {lines[-1]!r}"
    for fragment in fragments:
        assert fragment in lines[-1], f"{fragment!r} not in {lines[-1]!r}"
    return lines[-1]
