"""The daemon's link as a deployment sees it: a broker whose certificate a wrong CA cannot
verify is refused (no plaintext fallback) while the device serves on; and a device held by
an ACL to its own topics (plus the root and the artifacts) still deploys, because it never
needs anyone else's."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cli.support import edgeserve
from tests.conftest import DaemonFactory
from tests.fleet.device_support import DEVICE, serves
from tests.mqtt_broker import Mosquitto
from tests.waiting import eventually

pytestmark = pytest.mark.slow


def test_tls_with_a_wrong_ca_is_refused_and_the_device_serves_on(
    daemons: DaemonFactory,
    mosquitto_factory: Callable[..., Mosquitto],
    device_keys: Path,
    mlp_archive_factory: Any,
) -> None:
    broker = mosquitto_factory(tls=True)
    files = broker.tls_files
    assert files is not None
    config = (
        "fleet:\n"
        f"  broker: mqtts://{broker.host}:{broker.tls_port}\n"
        f"  device_id: {DEVICE}\n"
        f"  root: {device_keys / 'root.json'}\n"
        f"  tls: {{ca_file: {files.wrong_ca_file}, cert_file: {files.client_cert},"
        f" key_file: {files.client_key}}}\n"
    )
    daemon = daemons.start(mlp_archive_factory("1"), extra_config=config)

    def failed_link() -> dict[str, Any] | None:
        done = edgeserve("status", "--config", daemon.config, "--json", "--timeout", "10")
        fleet: dict[str, Any] = json.loads(done.out)["fleet"]
        return fleet if fleet["last_error"] else None

    fleet = eventually(failed_link, "the link's first error in status", 30)
    assert fleet["connected"] is False
    assert "certificate" in str(fleet["last_error"]).lower(), fleet
    assert serves(daemon) == "1"
    assert f"New client connected from {broker.host}" not in broker.log_tail(200)


ACL = """\
user controller
topic readwrite #

user {device}
topic readwrite {prefix}/devices/{device}/#
topic read {prefix}/root
topic read {prefix}/root/+
topic read {prefix}/artifacts/#
"""


def test_a_device_held_to_its_own_topics_by_an_acl_still_deploys(
    daemons: DaemonFactory,
    mosquitto_factory: Callable[..., Mosquitto],
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
    tmp_path: Path,
) -> None:
    users = {"controller": "controller-secret", DEVICE: "device-secret"}
    broker = mosquitto_factory(
        allow_anonymous=False, users=users, acl=ACL.format(device=DEVICE, prefix=prefix)
    )
    for user, password in users.items():
        (tmp_path / user).write_text(password + "\n")
        (tmp_path / user).chmod(0o600)
    config = (
        "fleet:\n"
        f"  broker: mqtt://{broker.host}:{broker.port}\n"
        f"  device_id: {DEVICE}\n"
        f"  topic_prefix: {prefix}\n"
        f"  root: {device_keys / 'root.json'}\n"
        f"  username: {DEVICE}\n"
        f"  password_file: {tmp_path / DEVICE}\n"
        "  probation_s: 0\n"
    )
    daemon = daemons.start(mlp_archive_factory("1"), extra_config=config)
    controller = [
        "--broker", f"mqtt://{broker.host}:{broker.port}", "--topic-prefix", prefix,
        "--username", "controller", "--password-file", tmp_path / "controller",
    ]  # fmt: skip
    key = device_keys / "root.key"
    # Another device's desired document exists; this device can neither read nor write it.
    for device, version in (("dev-2", "3"), (DEVICE, "2")):
        done = edgeserve("fleet", "publish", *controller, "--device", device,
                         "--model", mlp_archive_factory(version), "--sign-key", key)  # fmt: skip
        assert done.code == 0, done.err
    waited = edgeserve("fleet", "wait", *controller, "--device", DEVICE, "--serial", "1",
                       "--timeout", "90")  # fmt: skip
    assert waited.code == 0, waited.out + waited.err + daemon.log()[-3000:]
    assert serves(daemon) == "2"
    assert "dev-2" not in daemon.log()
