"""kill -9 at every deployer step, then a restart: exactly one complete set is live (the old
or the new), the state machine resumes or undoes, and nothing is left half-installed.

The daemon is stopped at an exact step by ``EDGESERVE_FLEET_HOLD_AT=<state>`` (set in the
environment of the first start only): the deployer persists that state, logs ``holding
at``, and waits for good while the daemon goes on serving; the test then kills it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import DaemonFactory, RunningDaemon
from tests.fleet.device_support import (
    fleet_config,
    live,
    publish,
    serves,
    state_of,
    wait_for_state,
)
from tests.mqtt_broker import Mosquitto
from tests.waiting import eventually

pytestmark = pytest.mark.slow

FORWARD = ["received", "verified", "downloading", "downloaded", "installing", "warming",
           "probation", "committed"]  # fmt: skip


def _held(daemon: RunningDaemon, state: str, timeout: float = 90) -> None:
    def holding() -> bool:
        assert daemon.process.poll() is None, daemon.log()[-3000:]
        return f"holding at {state}" in daemon.log()

    try:
        eventually(holding, f"the deployment to hold at {state}", timeout)
    except AssertionError as exc:
        raise AssertionError(f"{exc}:\n{daemon.log()[-3000:]}") from None


def _persisted_state(daemon: RunningDaemon) -> dict[str, Any]:
    return json.loads((daemon.state_dir / "fleet" / "deployment.json").read_bytes())


def _nothing_half_installed(state_dir: Path) -> None:
    staging = state_dir / "models" / ".staging"
    assert not staging.exists() or not list(staging.iterdir())
    assert not list((state_dir / "fleet").glob(".*.tmp"))
    assert not list((state_dir / "fleet" / "staging").glob("*.part"))


@pytest.mark.parametrize("step", [*FORWARD, "rolling_back"])
def test_kill_9_at_each_step_then_restart_ends_on_one_whole_set(
    daemons: DaemonFactory,
    mosquitto: Mosquitto,
    prefix: str,
    device_keys: Path,
    mlp_archive_factory: Any,
    picky_archive: Any,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    config = fleet_config(mosquitto, prefix, device_keys / "root.json", probation_s=1)
    if step == "rolling_back":  # a candidate that fails its warm-up starts the undo
        model, (old, _), (new, flag) = "picky", picky_archive("1"), picky_archive("2")
        flag.touch()
    else:
        model, old, new = "mlp", mlp_archive_factory("1"), mlp_archive_factory("2")
    monkeypatch.setenv("EDGESERVE_FLEET_HOLD_AT", step)
    daemon = daemons.start(old, extra_config=config)
    monkeypatch.delenv("EDGESERVE_FLEET_HOLD_AT")
    assert publish(mosquitto, prefix, device_keys / "root.key", "--model", new).code == 0
    _held(daemon, step)
    assert _persisted_state(daemon)["state"] in (step, "warming")  # rolling back from warming
    assert serves(daemon, model) in ("1", "2")  # serving goes on at every step
    daemon.process.kill()
    daemon.process.wait()

    again = daemons.start(old, state_dir=daemon.state_dir, extra_config=config)
    final = "rolled_back" if step == "rolling_back" else "committed"
    expected = "1" if step == "rolling_back" else "2"
    row = wait_for_state(
        mosquitto, prefix, lambda r: state_of(r)[1] == final and bool(r["live"])
    )  # the restarted daemon's report, once its restore is done
    assert state_of(row)[:2] == (1, final), again.log()[-3000:]
    assert live(row) == {(model, expected, True)}
    assert serves(again, model) == expected
    assert row["committed_serial"] == (0 if step == "rolling_back" else 1)
    _nothing_half_installed(again.state_dir)
    persisted = json.loads((again.state_dir / "live.json").read_bytes())["models"]
    assert [(m["name"], m["version"]) for m in persisted] == [(model, expected)]
