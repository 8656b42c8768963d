"""Fixtures for the fleet tests: real Mosquitto brokers on free loopback ports.

``mosquitto`` (session) is a plain anonymous broker shared by tests that leave it running;
``fresh_mosquitto`` is a broker of the test's own, for tests that stop or kill it;
``mosquitto_factory`` builds brokers with options (users, ACL, TLS, packet limit). Every
broker is killed in ``finally``, whatever the test did.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.mqtt_broker import Mosquitto


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    broker = Mosquitto(tmp_path_factory.mktemp("mosquitto"))
    try:
        broker.start()
        yield broker
    finally:
        broker.close()


@pytest.fixture
def mosquitto_factory(tmp_path: Path) -> Iterator[Callable[..., Mosquitto]]:
    brokers: list[Mosquitto] = []

    def make(**options: Any) -> Mosquitto:
        broker = Mosquitto(tmp_path / f"mosquitto-{len(brokers)}", **options)
        brokers.append(broker)
        broker.start()
        return broker

    try:
        yield make
    finally:
        for broker in brokers:
            broker.close()


@pytest.fixture
def fresh_mosquitto(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory()


@pytest.fixture(scope="session")
def device_keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Keys and roots for the device tests: root.key/.pub with root.json (threshold 1),
    second.key/.pub with root-2of2.json (root and second, threshold 2), stranger.key (in
    no root)."""
    from tests.cli.support import edgeserve_ok, keygen  # noqa: PLC0415 - only these tests

    folder = tmp_path_factory.mktemp("device-keys")
    for name in ("root", "second", "stranger"):
        keygen(folder / name)
    edgeserve_ok(
        "fleet", "root", "init", "--key", folder / "root.pub", "--threshold", "1",
        "-o", folder / "root.json",
    )  # fmt: skip
    edgeserve_ok(
        "fleet", "root", "init", "--key", folder / "root.pub", "--key", folder / "second.pub",
        "--threshold", "2", "-o", folder / "root-2of2.json",
    )  # fmt: skip
    return folder


@pytest.fixture
def prefix() -> str:
    """A topic prefix of the test's own, so tests sharing a broker never see each other."""
    return f"t{uuid.uuid4().hex[:10]}/v1"
