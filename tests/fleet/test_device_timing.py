"""When a deployment goes live: the activation window (device-local time, injected through
the daemon's ``TZ``), a newer serial superseding one that waits, and a broker that is
SIGKILLed in the middle of a deployment.

Local time is injected honestly: the daemon runs with a POSIX ``TZ`` whose offset (to
the second) puts its local clock just before the window, so the real clock carries it
into the window a few seconds later.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonFactory
from tests.fleet.device_support import (
    fleet_config,
    live,
    publish,
    reported,
    serves,
    state_of,
    wait,
    wait_for_state,
)
from tests.mqtt_broker import Mosquitto
from tests.waiting import eventually

pytestmark = pytest.mark.slow

WINDOW = "12:00-13:00"
LEAD_S = 45  # the window opens this long after the daemon starts (slow machines: margin)


def tz_with_local_time(seconds_of_day: int) -> str:
    """A POSIX TZ under which the local time is now ``seconds_of_day`` after midnight."""
    now = int(time.time()) % 86_400
    offset = (now - seconds_of_day) % 86_400  # local = UTC - offset
    if offset > 43_200:
        offset -= 86_400
    sign = "-" if offset < 0 else "+"
    offset = abs(offset)
    return f"EST{sign}{offset // 3600:02d}:{offset % 3600 // 60:02d}:{offset % 60:02d}"


def test_tz_with_local_time_sets_the_clock() -> None:
    import os  # noqa: PLC0415 - only here

    old = os.environ.get("TZ")
    try:
        os.environ["TZ"] = tz_with_local_time(12 * 3600 - 30)
        time.tzset()
        local = time.localtime()
        assert abs(local.tm_hour * 3600 + local.tm_min * 60 + local.tm_sec - (12 * 3600 - 30)) < 3
    finally:
        if old is None:
            os.environ.pop("TZ", None)
        else:
            os.environ["TZ"] = old
        time.tzset()


def _start_before_window(
    daemons: DaemonFactory, monkeypatch: pytest.MonkeyPatch, config: str, archive: Path
) -> tuple[Any, float]:
    """A daemon whose local time is LEAD_S before 12:00; returns it and the window's epoch."""
    monkeypatch.setenv("TZ", tz_with_local_time(12 * 3600 - LEAD_S))
    opens = time.time() + LEAD_S
    daemon = daemons.start(archive, extra_config=config)
    monkeypatch.delenv("TZ")
    return daemon, opens


def _observe(
    broker: Mosquitto, prefix: str, until: Callable[[dict[str, Any]], bool], timeout: float = 90
) -> list[tuple[float, Any]]:
    """(time, state) of every reported state seen until ``until`` holds."""
    seen: list[tuple[float, Any]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = reported(broker, prefix)
        seen.append((time.time(), state_of(row)[1] if row else None))
        if row and until(row):
            break
        time.sleep(0.3)
    return seen


def test_downloaded_outside_the_window_activated_inside_it(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = fleet_config(mosquitto, prefix, device_keys / "root.json", probation_s=0)
    daemon, opens = _start_before_window(daemons, monkeypatch, config, mlp_archive_factory("1"))
    assert publish(mosquitto, prefix, device_keys / "root.key", "--model",
                   mlp_archive_factory("2"), "--activation-window", WINDOW).code == 0  # fmt: skip
    assert time.time() < opens - 10, "the machine is too slow for this window's lead"
    seen = _observe(mosquitto, prefix, lambda r: state_of(r)[1] == "committed")
    deferred = [t for t, s in seen if s == "deferred"]
    assert deferred and deferred[0] < opens, (seen, daemon.log()[-3000:])
    row = reported(mosquitto, prefix)
    assert state_of(row)[1] == "committed" and seen[-1][0] >= opens - 1
    assert live(row) == {("mlp", "2", True)}


def test_a_newer_serial_supersedes_a_deployment_waiting_for_its_window(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
) -> None:
    config = fleet_config(mosquitto, prefix, device_keys / "root.json", probation_s=0)
    daemon = daemons.start(mlp_archive_factory("1"), extra_config=config)
    now = time.localtime()
    far = f"{(now.tm_hour + 6) % 24:02d}:00-{(now.tm_hour + 7) % 24:02d}:00"  # hours away
    key = device_keys / "root.key"
    assert publish(mosquitto, prefix, key, "--model", mlp_archive_factory("2"),
                   "--activation-window", far).code == 0  # fmt: skip
    wait_for_state(mosquitto, prefix, lambda r: state_of(r)[1] == "deferred")
    assert publish(mosquitto, prefix, key, "--model", mlp_archive_factory("3")).code == 0
    assert wait(mosquitto, prefix, 2).code == 0, daemon.log()[-3000:]
    assert serves(daemon) == "3"
    assert "fleet: deployment 1 rejected: superseded" in daemon.log()
    assert "deployment 2 committed" in daemon.log()


def _wait_saved_since(broker: Mosquitto, since: float) -> None:
    """Until the broker has written its persistence file twice after ``since``: the second
    save began after the first ended, so it holds everything retained before ``since``."""
    db = broker.directory / "data" / "mosquitto.db"

    def saved_after(moment: float) -> float:
        return db.stat().st_mtime if db.exists() and db.stat().st_mtime > moment else 0.0

    first = eventually(lambda: saved_after(since), "the broker's autosave", 30)
    eventually(lambda: saved_after(first), "a second autosave", 30)


def test_broker_sigkilled_mid_deployment_the_device_serves_and_reconverges(
    daemons: DaemonFactory,
    mosquitto_factory: Callable[..., Mosquitto],
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    broker = mosquitto_factory(autosave_interval=1)
    config = fleet_config(broker, prefix, device_keys / "root.json", probation_s=0)
    daemon, opens = _start_before_window(daemons, monkeypatch, config, mlp_archive_factory("1"))
    assert publish(broker, prefix, device_keys / "root.key", "--model",
                   mlp_archive_factory("2"), "--activation-window", WINDOW).code == 0  # fmt: skip
    wait_for_state(broker, prefix, lambda r: state_of(r)[1] == "deferred")
    _wait_saved_since(broker, time.time())  # the retained documents survive the SIGKILL
    broker.kill()
    versions = set()
    while time.time() < opens + 8:  # the window opens while the broker is away
        versions.add(serves(daemon))
        time.sleep(0.2)
    assert versions == {"1", "2"}  # no failed request: serves() raises on one
    broker.start()
    row = wait_for_state(broker, prefix, lambda r: state_of(r)[1] == "committed")
    assert state_of(row) == (1, "committed", None), daemon.log()[-3000:]
    assert row["online"] is True and live(row) == {("mlp", "2", True)}
    # The retained document came again after the reconnect (and its QoS 1 redelivery):
    # applied once.
    time.sleep(2)
    assert daemon.log().count("fleet: deployment 1 committed") == 1

    # A device started while the broker is down serves its committed set.
    assert daemon.terminate() == 0
    broker.kill()
    again = daemons.start(mlp_archive_factory("1"), state_dir=daemon.state_dir, extra_config=config)
    assert serves(again) == "2"
