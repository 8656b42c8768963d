"""The unit's open files limit holds what the daemon's defaults let clients open."""

from __future__ import annotations

from pathlib import Path

from edgeserve.api.peercred import ROOT_RESERVE
from edgeserve.api.server import FD_RESERVE
from edgeserve.config import Config
from tests.ops.test_ops_systemd import parse_unit


def test_limit_nofile_fits_every_listener_at_its_connection_cap(repo_root: Path) -> None:
    unit = parse_unit(repo_root / "systemd" / "edgeserve.service")
    (limit,) = unit["Service"]["LimitNOFILE"]
    defaults = Config()
    inference = len(defaults.server.listen) * defaults.server.max_connections
    # Each relayed management connection holds three descriptors (client, relay, server).
    management = 3 * (defaults.management.max_connections + ROOT_RESERVE)
    assert int(limit) >= inference + FD_RESERVE
    assert FD_RESERVE >= management + 64, "the reserve must cover management and the rest"
