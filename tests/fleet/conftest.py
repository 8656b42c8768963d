"""Fixtures for the fleet tests: real Mosquitto brokers on free loopback ports.

``mosquitto`` (session) is a plain anonymous broker shared by tests that leave it running;
``fresh_mosquitto`` is a broker of the test's own, for tests that stop or kill it;
``mosquitto_factory`` builds brokers with options (users, ACL, TLS, packet limit). Every
broker is killed in ``finally``, whatever the test did.
"""

from __future__ import annotations

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
