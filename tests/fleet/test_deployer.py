"""Signed updates end to end: real Mosquitto, real daemons, real archives, and the
controller side through ``edgeserve fleet publish`` and ``edgeserve fleet wait``."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from edgeserve.api.client import ClientError
from tests.conftest import PICKY_MARK, DaemonFactory
from tests.fleet.device_support import Load, X, fleet_config, live, publish, reported, wait
from tests.mqtt_broker import Mosquitto

pytestmark = pytest.mark.slow


def test_happy_path_under_load_commits_with_zero_failed_requests(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
) -> None:
    daemon = daemons.start(
        mlp_archive_factory("1"),
        extra_config=fleet_config(mosquitto, prefix, device_keys / "root.json"),
    )
    with Load(daemon) as load:
        done = publish(mosquitto, prefix, device_keys / "root.key", "--model",
                       mlp_archive_factory("2"))  # fmt: skip
        assert done.code == 0, done.err
        waited = wait(mosquitto, prefix, 1)
        assert waited.code == 0, waited.err + waited.out + daemon.log()[-3000:]
    print(  # the swap figures under load, for the record (pytest -s)
        f"swap under load: {load.ok} requests, {len(load.failures)} failed, "
        f"max latency {load.max_latency_s * 1000:.1f} ms"
    )
    assert load.failures == []
    assert load.ok > 0 and load.versions == {"1", "2"}
    row = reported(mosquitto, prefix)
    assert row["committed_serial"] == 1
    assert row["deployment"]["state"] == "committed"
    assert live(row) == {("mlp", "2", True)}  # v1 unloaded at commit
    assert row["network_bytes"]["artifacts"] >= mlp_archive_factory("2").stat().st_size

    # A restart brings back the committed set, not the --model archive of the command line.
    assert daemon.terminate() == 0
    again = daemons.start(
        mlp_archive_factory("1"),
        state_dir=daemon.state_dir,
        extra_config=fleet_config(mosquitto, prefix, device_keys / "root.json"),
    )
    with again.client() as client:
        assert str(client.infer("mlp", {"x": X})[0]) == "2"
    assert "configured model(s) not loaded" in again.log()


@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        ("expired", "expired"),
        (["--require-arch", "s390x"], "requirements"),
        ("stranger", "unknown_key"),
    ],
)
def test_a_refused_document_leaves_the_live_set_and_is_reported(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
    extra: Any,
    reason: str,
) -> None:
    key = device_keys / "root.key"
    argv = ["--model", mlp_archive_factory("2"), "--serial", "1"]
    if extra == "stranger":
        key = device_keys / "stranger.key"
    elif extra == "expired":  # published while the device was away; it expired meanwhile
        expires = datetime.now(UTC) + timedelta(seconds=2)
        argv += ["--expires", expires.strftime("%Y-%m-%dT%H:%M:%SZ")]
    else:
        argv += extra
    assert publish(mosquitto, prefix, key, *argv).code == 0
    if extra == "expired":
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds() + 1))
    daemon = daemons.start(
        mlp_archive_factory("1"),
        extra_config=fleet_config(mosquitto, prefix, device_keys / "root.json"),
    )
    waited = wait(mosquitto, prefix, 1)
    assert waited.code == 1, waited.err + waited.out
    assert reason in waited.out + waited.err
    row = reported(mosquitto, prefix)
    assert row["deployment"]["state"] == "rejected"
    assert row["deployment"]["reason"] == reason
    assert row["committed_serial"] == 0
    assert live(row) == {("mlp", "1", True)}
    with daemon.client() as client:
        assert str(client.infer("mlp", {"x": X})[0]) == "1"


def test_a_candidate_that_fails_warm_up_is_never_activated(
    daemons: DaemonFactory, mosquitto: Mosquitto, prefix: str, device_keys: Path, picky_archive: Any
) -> None:
    first, _ = picky_archive("1")
    broken, flag = picky_archive("2")
    flag.touch()
    daemon = daemons.start(
        first, extra_config=fleet_config(mosquitto, prefix, device_keys / "root.json")
    )
    with Load(daemon, "picky") as load:
        assert publish(mosquitto, prefix, device_keys / "root.key", "--model", broken).code == 0
        waited = wait(mosquitto, prefix, 1)
    assert waited.code == 1 and "warmup" in waited.out + waited.err
    assert load.failures == [] and load.versions == {"1"}
    row = reported(mosquitto, prefix)
    assert row["deployment"]["state"] == "rolled_back"
    assert live(row) == {("picky", "1", True)}


def test_errors_on_live_traffic_during_probation_roll_back(
    daemons: DaemonFactory, mosquitto: Mosquitto, prefix: str, device_keys: Path, picky_archive: Any
) -> None:
    first, _ = picky_archive("1")
    second, flag = picky_archive("2")
    config = fleet_config(mosquitto, prefix, device_keys / "root.json", probation_s=30)
    daemon = daemons.start(first, extra_config=config)
    assert publish(mosquitto, prefix, device_keys / "root.key", "--model", second).code == 0
    bad = X.copy()
    bad[0, 0] = PICKY_MARK
    with daemon.client() as client:
        for _ in range(400):
            if reported(mosquitto, prefix)["deployment"]["state"] == "probation":
                break
        for _ in range(10):
            try:
                client.infer("picky", {"x": bad})
            except ClientError:
                pass
    waited = wait(mosquitto, prefix, 1)
    assert waited.code == 1 and "error_rate" in waited.out + waited.err
    row = reported(mosquitto, prefix)
    assert live(row) == {("picky", "1", True)}


def test_kill_9_during_probation_resumes_then_the_third_start_rolls_back(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
) -> None:
    config = fleet_config(mosquitto, prefix, device_keys / "root.json", probation_s=600)
    daemon = daemons.start(mlp_archive_factory("1"), extra_config=config)
    assert publish(mosquitto, prefix, device_keys / "root.key", "--model",
                   mlp_archive_factory("2")).code == 0  # fmt: skip
    for start in range(4):
        state = None
        for _ in range(600):
            row = reported(mosquitto, prefix)
            state = (row["deployment"] or {}).get("state")
            if state in ("probation", "rolled_back"):
                break
        if start < 3:
            assert state == "probation", daemon.log()[-3000:]
            with daemon.client() as client:  # exactly the new set is the default
                assert str(client.infer("mlp", {"x": X})[0]) == "2"
            daemon.process.kill()
            daemon.process.wait()
            daemon = daemons.start(
                mlp_archive_factory("1"), state_dir=daemon.state_dir, extra_config=config
            )
    assert state == "rolled_back"
    assert row["deployment"]["reason"] == "crash loop"
    assert live(row) == {("mlp", "1", True)}
    with daemon.client() as client:
        assert str(client.infer("mlp", {"x": X})[0]) == "1"
    assert wait(mosquitto, prefix, 1).code == 1
