"""Trust-root rotation on a real daemon over a real Mosquitto: rotations retained one topic
per version (``P/root/<version>``), walked forward one version at a time, each needing a
threshold of the old keys and of the new ones, persisted before use."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgeserve.fleet.documents import parse_root
from tests.cli.support import edgeserve_ok, keygen
from tests.conftest import DaemonFactory
from tests.fleet.device_support import (
    broker_args,
    fleet_config,
    live,
    publish,
    retain,
    serves,
    sign_raw,
    state_of,
    wait,
    wait_for_state,
)
from tests.mqtt_broker import Mosquitto

pytestmark = pytest.mark.slow


def _version(row: dict[str, Any]) -> int | None:
    return row.get("root_version")


def test_rotation_walks_one_version_at_a_time_with_both_thresholds(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
    tmp_path: Path,
) -> None:
    keys = device_keys
    third = keygen(tmp_path / "third")[0]
    # v2: the second key alone; v3: the third key alone. Written by the controller.
    edgeserve_ok(
        "fleet", "root", "rotate", "--root", keys / "root.json", "--key", keys / "second.pub",
        "--threshold", "1", "--sign-key", keys / "root.key", "--sign-key", keys / "second.key",
        "-o", tmp_path / "root-2.json",
    )  # fmt: skip
    out = edgeserve_ok(
        "fleet", "root", "rotate", "--root", tmp_path / "root-2.json",
        "--key", tmp_path / "third.pub", "--threshold", "1", "--sign-key", keys / "second.key",
        "--sign-key", third, "-o", tmp_path / "root-3.json", *broker_args(mosquitto, prefix),
    )  # fmt: skip
    assert f"{prefix}/root/3" in out
    # A forged v2, signed by the new key only (no threshold of the v1 keys).
    good_v2 = parse_root((tmp_path / "root-2.json").read_bytes())
    forged = good_v2.to_signed()
    forged["expires"] = (datetime.now(UTC) + timedelta(days=2)).strftime("%Y-%m-%dT%H:%M:%SZ")
    retain(mosquitto, f"{prefix}/root/2", sign_raw(forged, keys / "second.key"))

    config = fleet_config(mosquitto, prefix, keys / "root.json", probation_s=0)
    daemon = daemons.start(mlp_archive_factory("1"), extra_config=config)
    # A deployment signed by the v3 key arrives before the device can trust that key.
    signed_by_new = ["--model", mlp_archive_factory("2"), "--serial", "1"]
    assert publish(mosquitto, prefix, third, *signed_by_new).code == 0
    waited = wait(mosquitto, prefix, 1)
    assert waited.code == 1 and "unknown_key" in waited.out + waited.err
    row = wait_for_state(mosquitto, prefix, lambda r: state_of(r)[1] == "rejected")
    assert _version(row) == 1  # v3 alone skips a version; the forged v2 lacks v1's threshold
    assert "root rotation refused" in daemon.log()

    # The genuine v2 appears: the device walks v1 -> v2 -> v3, and looks again at the
    # document it refused for its signature.
    retain(mosquitto, f"{prefix}/root/2", (tmp_path / "root-2.json").read_bytes())
    row = wait_for_state(mosquitto, prefix, lambda r: _version(r) == 3)
    assert _version(row) == 3, daemon.log()[-3000:]
    assert wait(mosquitto, prefix, 1).code == 0
    row = wait_for_state(mosquitto, prefix, lambda r: r.get("committed_serial") == 1)
    assert live(row) == {("mlp", "2", True)}
    persisted = daemon.state_dir / "fleet" / "root.json"
    assert persisted.read_bytes() == (tmp_path / "root-3.json").read_bytes()

    # Old keys no longer sign deployments; a restart comes back on the persisted v3.
    assert daemon.terminate() == 0
    again = daemons.start(mlp_archive_factory("1"), state_dir=daemon.state_dir, extra_config=config)
    assert publish(mosquitto, prefix, keys / "root.key", "--model", mlp_archive_factory("3"),
                   "--serial", "2").code == 0  # fmt: skip
    waited = wait(mosquitto, prefix, 2)
    assert waited.code == 1 and "unknown_key" in waited.out + waited.err
    row = wait_for_state(mosquitto, prefix, lambda r: state_of(r)[0] == 2)
    assert _version(row) == 3
    assert serves(again) == "2"
