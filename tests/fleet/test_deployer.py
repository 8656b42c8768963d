"""Signed updates end to end: real Mosquitto, real daemons, real archives, and the
controller side through ``edgeserve fleet publish`` and ``edgeserve fleet wait``."""

from __future__ import annotations

import json
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgeserve.api.client import ClientError
from tests.cli.support import Outcome, edgeserve, edgeserve_ok, keygen
from tests.conftest import PICKY_MARK, DaemonFactory, RunningDaemon
from tests.mqtt_broker import Mosquitto

pytestmark = pytest.mark.slow

X = np.ones((2, 16), dtype=np.float32)


@pytest.fixture(scope="module")
def fleet_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """root.key/.pub and root.json (threshold 1), stranger.key (not in the root)."""
    folder = tmp_path_factory.mktemp("fleet-keys")
    keygen(folder / "root")
    keygen(folder / "stranger")
    edgeserve_ok(
        "fleet", "root", "init", "--key", folder / "root.pub", "--threshold", "1",
        "-o", folder / "root.json",
    )  # fmt: skip
    return folder


@pytest.fixture
def prefix() -> str:
    return f"d{uuid.uuid4().hex[:10]}/v1"


def broker_args(broker: Mosquitto, prefix: str) -> list[str]:
    return ["--broker", f"mqtt://{broker.host}:{broker.port}", "--topic-prefix", prefix]


def fleet_config(broker: Mosquitto, prefix: str, keys: Path, probation_s: float = 2) -> str:
    return (
        "fleet:\n"
        f"  broker: mqtt://{broker.host}:{broker.port}\n"
        "  device_id: dev-1\n"
        f"  topic_prefix: {prefix}\n"
        f"  root: {keys / 'root.json'}\n"
        f"  probation_s: {probation_s}\n"
        "  probation: {min_requests: 5}\n"
    )


def publish(broker: Mosquitto, prefix: str, key: Path, *extra: str | Path) -> Outcome:
    return edgeserve(
        "fleet", "publish", *broker_args(broker, prefix), "--device", "dev-1",
        "--sign-key", key, *extra,
    )  # fmt: skip


def wait(broker: Mosquitto, prefix: str, serial: int, timeout: float = 90) -> Outcome:
    return edgeserve(
        "fleet", "wait", *broker_args(broker, prefix), "--device", "dev-1",
        "--serial", str(serial), "--timeout", str(timeout),
    )  # fmt: skip


def reported(broker: Mosquitto, prefix: str) -> dict[str, Any]:
    out = edgeserve_ok("fleet", "devices", *broker_args(broker, prefix), "--json")
    [row] = [r for r in json.loads(out) if r["device"] == "dev-1"]
    return row


def live(row: dict[str, Any]) -> set[tuple[str, str, bool]]:
    return {(m["name"], m["version"], m["default"]) for m in row["live"]}


class Load:
    """Four client threads calling the default version until stopped."""

    def __init__(self, daemon: RunningDaemon, model: str = "mlp") -> None:
        self.ok = 0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(daemon, model)) for _ in range(4)]

    def _run(self, daemon: RunningDaemon, model: str) -> None:
        with daemon.client() as client:
            while not self._stop.is_set():
                try:
                    version, _ = client.infer(model, {"x": X})
                    with self._lock:
                        self.ok += 1
                        self.versions.add(str(version))
                except ClientError as exc:
                    with self._lock:
                        self.failures.append(str(exc)[:200])

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_happy_path_under_load_commits_with_zero_failed_requests(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    fleet_keys: Path,
    mlp_archive_factory: Any,
) -> None:
    daemon = daemons.start(
        mlp_archive_factory("1"), extra_config=fleet_config(mosquitto, prefix, fleet_keys)
    )
    with Load(daemon) as load:
        done = publish(mosquitto, prefix, fleet_keys / "root.key", "--model",
                       mlp_archive_factory("2"))  # fmt: skip
        assert done.code == 0, done.err
        waited = wait(mosquitto, prefix, 1)
        assert waited.code == 0, waited.err + waited.out + daemon.log()[-3000:]
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
        extra_config=fleet_config(mosquitto, prefix, fleet_keys),
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
    fleet_keys: Path,
    mlp_archive_factory: Any,
    extra: Any,
    reason: str,
) -> None:
    key = fleet_keys / "root.key"
    argv = ["--model", mlp_archive_factory("2"), "--serial", "1"]
    if extra == "stranger":
        key = fleet_keys / "stranger.key"
    elif extra == "expired":  # published while the device was away; it expired meanwhile
        expires = datetime.now(UTC) + timedelta(seconds=2)
        argv += ["--expires", expires.strftime("%Y-%m-%dT%H:%M:%SZ")]
    else:
        argv += extra
    assert publish(mosquitto, prefix, key, *argv).code == 0
    if extra == "expired":
        time.sleep(max(0.0, (expires - datetime.now(UTC)).total_seconds() + 1))
    daemon = daemons.start(
        mlp_archive_factory("1"), extra_config=fleet_config(mosquitto, prefix, fleet_keys)
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
    daemons: DaemonFactory, mosquitto: Mosquitto, prefix: str, fleet_keys: Path, picky_archive: Any
) -> None:
    first, _ = picky_archive("1")
    broken, flag = picky_archive("2")
    flag.touch()
    daemon = daemons.start(first, extra_config=fleet_config(mosquitto, prefix, fleet_keys))
    with Load(daemon, "picky") as load:
        assert publish(mosquitto, prefix, fleet_keys / "root.key", "--model", broken).code == 0
        waited = wait(mosquitto, prefix, 1)
    assert waited.code == 1 and "warmup" in waited.out + waited.err
    assert load.failures == [] and load.versions == {"1"}
    row = reported(mosquitto, prefix)
    assert row["deployment"]["state"] == "rolled_back"
    assert live(row) == {("picky", "1", True)}


def test_errors_on_live_traffic_during_probation_roll_back(
    daemons: DaemonFactory, mosquitto: Mosquitto, prefix: str, fleet_keys: Path, picky_archive: Any
) -> None:
    first, _ = picky_archive("1")
    second, flag = picky_archive("2")
    config = fleet_config(mosquitto, prefix, fleet_keys, probation_s=30)
    daemon = daemons.start(first, extra_config=config)
    assert publish(mosquitto, prefix, fleet_keys / "root.key", "--model", second).code == 0
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
    fleet_keys: Path,
    mlp_archive_factory: Any,
) -> None:
    config = fleet_config(mosquitto, prefix, fleet_keys, probation_s=600)
    daemon = daemons.start(mlp_archive_factory("1"), extra_config=config)
    assert publish(mosquitto, prefix, fleet_keys / "root.key", "--model",
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
