"""Helpers for the end-to-end device tests: real daemons following a real Mosquitto, driven
through the controller commands (``fleet publish``, ``wait``, ``devices``) or, for
documents the controller would never write, signed here and published with a plain client."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np

from edgeserve.api.client import ClientError
from edgeserve.archive.signing import load_private_key
from edgeserve.fleet.artifacts import hash_file
from edgeserve.fleet.verifier import sign, to_bytes
from tests.cli.support import Outcome, edgeserve, edgeserve_ok
from tests.conftest import RunningDaemon
from tests.mqtt_broker import Mosquitto

X = np.ones((2, 16), dtype=np.float32)
DEVICE = "dev-1"


def broker_args(broker: Mosquitto, prefix: str) -> list[str]:
    return ["--broker", f"mqtt://{broker.host}:{broker.port}", "--topic-prefix", prefix]


def fleet_config(
    broker: Mosquitto, prefix: str, root: Path, probation_s: float = 2, extra: str = ""
) -> str:
    return (
        "fleet:\n"
        f"  broker: mqtt://{broker.host}:{broker.port}\n"
        f"  device_id: {DEVICE}\n"
        f"  topic_prefix: {prefix}\n"
        f"  root: {root}\n"
        f"  probation_s: {probation_s}\n"
        "  probation: {min_requests: 5}\n"
    ) + extra


def publish(
    broker: Mosquitto, prefix: str, key: Path, *extra: str | Path, device: str = DEVICE
) -> Outcome:
    return edgeserve(
        "fleet", "publish", *broker_args(broker, prefix), "--device", device,
        "--sign-key", key, *extra,
    )  # fmt: skip


def wait(broker: Mosquitto, prefix: str, serial: int, timeout: float = 90) -> Outcome:
    return edgeserve(
        "fleet", "wait", *broker_args(broker, prefix), "--device", DEVICE,
        "--serial", str(serial), "--timeout", str(timeout),
    )  # fmt: skip


def reported(broker: Mosquitto, prefix: str) -> dict[str, Any]:
    out = edgeserve_ok("fleet", "devices", *broker_args(broker, prefix), "--json")
    rows = [r for r in json.loads(out) if r["device"] == DEVICE]
    return rows[0] if rows else {}


def wait_for_state(
    broker: Mosquitto,
    prefix: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 90,
) -> dict[str, Any]:
    """Poll the retained reported state until ``done`` says so (the last row otherwise)."""
    deadline = time.monotonic() + timeout
    row: dict[str, Any] = {}
    while time.monotonic() < deadline:
        row = reported(broker, prefix)
        if row and done(row):
            return row
        time.sleep(0.3)
    return row


def state_of(row: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    deployment = row.get("deployment") or {}
    return deployment.get("serial"), deployment.get("state"), deployment.get("reason")


def live(row: Mapping[str, Any]) -> set[tuple[str, str, bool]]:
    return {(m["name"], m["version"], m["default"]) for m in row.get("live") or []}


def serves(daemon: RunningDaemon, model: str = "mlp") -> str:
    with daemon.client() as client:
        return str(client.infer(model, {"x": X})[0])


def entry(archive: Path, name: str, version: str, **overrides: Any) -> dict[str, Any]:
    sha256, length = hash_file(archive)
    return {
        "name": name,
        "version": version,
        "sha256": sha256,
        "length": length,
        "source": {"mqtt": True},
        "default": True,
        "batching": None,
    } | overrides


def signed_fields(models: list[dict[str, Any]], serial: int, **overrides: Any) -> dict[str, Any]:
    expires = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {
        "type": "deployment",
        "serial": serial,
        "expires": expires,
        "target": {"devices": [DEVICE], "groups": []},
        "requires": {
            "arch": None,
            "min_free_disk_mb": 0,
            "min_free_memory_mb": 0,
            "accelerator": None,
        },
        "probation_s": 1,
        "activation_window": None,
        "models": models,
    } | overrides


def sign_raw(signed: Mapping[str, Any], *keys: Path) -> bytes:
    """Sign without the controller's validation (so tests can sign what it refuses)."""
    return to_bytes(sign(signed, [load_private_key(k) for k in keys]))


def retain(broker: Mosquitto, topic: str, payload: bytes) -> None:
    client = broker.client()
    client.loop_start()
    try:
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
    finally:
        client.loop_stop()
        client.disconnect()


def desired(prefix: str) -> str:
    return f"{prefix}/devices/{DEVICE}/desired"


def upload(broker: Mosquitto, prefix: str, key: Path, archive: Path) -> None:
    """The archive's chunks, retained, by publishing it to a device that does not exist."""
    done = publish(broker, prefix, key, "--model", archive, device="nobody")
    assert done.code == 0, done.err


class Load:
    """Four client threads calling the default version until stopped."""

    def __init__(self, daemon: RunningDaemon, model: str = "mlp") -> None:
        self.ok = 0
        self.max_latency_s = 0.0
        self.failures: list[str] = []
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(daemon, model)) for _ in range(4)]

    def _run(self, daemon: RunningDaemon, model: str) -> None:
        with daemon.client() as client:
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    version, _ = client.infer(model, {"x": X})
                    with self._lock:
                        self.ok += 1
                        self.versions.add(str(version))
                        self.max_latency_s = max(self.max_latency_s, time.perf_counter() - started)
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
