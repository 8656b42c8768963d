"""A download killed part-way resumes where it was: the daemon is kill -9ed while it fetches
a 64 MiB artifact as MQTT chunks (once its saved chunk map covers a quarter), and the
restarted one moves only what was missing.

The artifact is random bytes under a signed deployment: the device fetches and verifies
it (a resumed file that did not hash right would be refused ``sha256``), then refuses it
at install (``install``: it is no archive), which is after what this test is about.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from edgeserve.fleet.artifacts import CHUNK_BYTES, ChunkMap, publish_artifact
from edgeserve.fleet.link import FleetLink
from tests.conftest import DaemonFactory
from tests.fleet.device_support import (
    DEVICE,
    desired,
    fleet_config,
    retain,
    sign_raw,
    signed_fields,
)
from tests.mqtt_broker import Mosquitto, Observer
from tests.waiting import eventually

pytestmark = pytest.mark.slow

SIZE = 64 << 20


async def _upload(broker: Mosquitto, prefix: str, path: Path) -> tuple[str, int]:
    link = FleetLink(host=broker.host, port=broker.port, client_id="test-upload",
                     session_expiry_s=0)  # fmt: skip
    await link.start()
    try:
        await link.wait_connected(30)
        return await publish_artifact(link, prefix, path)
    finally:
        await link.close()


def _deployment(report: dict[str, Any]) -> dict[str, Any]:
    return report.get("deployment") or {}


def _report_until(observer: Observer, done: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        report = json.loads(observer.get(max(0.1, deadline - time.monotonic())).payload)
        if done(report):
            return report
    raise AssertionError("the device never reported that")


def _saved_bytes(chunks: Path, length: int) -> int:
    """Bytes the sidecar map marks as on disk (0 while it has not been written)."""
    saved = ChunkMap.load(chunks, length)
    return 0 if saved is None else length - len(saved.missing()) * CHUNK_BYTES


def test_a_download_killed_part_way_resumes_from_where_it_was(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
    tmp_path: Path,
) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(os.urandom(SIZE))
    sha256, length = asyncio.run(_upload(mosquitto, prefix, blob))
    model = {"name": "blob", "version": "1", "sha256": sha256, "length": length,
             "source": {"mqtt": True}, "default": True, "batching": None}  # fmt: skip
    extra = f"  max_artifact_bytes: {128 << 20}\n"
    config = fleet_config(mosquitto, prefix, device_keys / "root.json", extra=extra)
    observer = Observer(mosquitto, f"{prefix}/devices/{DEVICE}/reported")
    try:
        daemon = daemons.start(mlp_archive_factory("1"), extra_config=config)
        document = sign_raw(signed_fields([model], 1), device_keys / "root.key")
        retain(mosquitto, desired(prefix), document)
        # Killed on the device's own saved chunk map, not on a report: progress is
        # reported at most once a second, and on a quiet machine the whole artifact can
        # arrive between two reports.
        chunks = daemon.state_dir / "fleet" / "staging" / f"{sha256}.chunks"
        eventually(lambda: _saved_bytes(chunks, length) >= SIZE // 4, "a quarter saved")
        daemon.process.kill()
        daemon.process.wait()
        first = _saved_bytes(chunks, length)  # what the restarted daemon can keep
        assert SIZE // 4 <= first < SIZE, "nothing left to resume"

        again = daemons.start(
            mlp_archive_factory("1"), state_dir=daemon.state_dir, extra_config=config
        )
        end = _report_until(observer, lambda r: _deployment(r).get("state") == "rejected")
    finally:
        observer.close()
    assert end["deployment"]["reason"] == "install", again.log()[-3000:]  # it hashed right
    second = end["network_bytes"]["artifacts"]
    # Only what was missing moved again: at most the last unsaved map's chunks (16) over.
    assert second <= SIZE - first + 16 * CHUNK_BYTES
    assert first + second < 1.3 * SIZE
