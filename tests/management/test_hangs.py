"""A model whose warm-up never returns cannot wedge the daemon (issue 10, finding 1).

Real daemons, a real TorchScript model whose handler hangs while a flag file exists:
the load fails with DEADLINE_EXCEEDED naming the stage after ``runtime.load_timeout_s``,
other management changes go through at once, status counts the abandoned thread (and
forgets it once it returns), and SIGTERM ends the daemon within ``grace_period_s`` plus
the margin whatever the model does; a second signal exits at once.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgeserve.api.client import ClientError
from edgeserve.api.management_client import ManagementClient
from tests.management.conftest import drop_in, management_address
from tests.management.faults_support import hang_archive, start
from tests.waiting import eventually

GRACE_S = 3.0
MARGIN_S = 5.0  # daemon.SHUTDOWN_MARGIN_S
X = np.ones((1, 16), dtype=np.float32)


def _abandoned(document: dict) -> list[str]:
    return [p for p in document["problems"] if "abandoned" in p]


def _hung(folder: Path) -> Path:
    flag = folder / "hang"
    flag.touch()
    return flag


def _wait_entered(flag: Path) -> None:
    eventually(lambda: Path(f"{flag}.entered").exists(), "the model to start hanging")


def _sigterm_to_exit(daemon, *, second_after_s: float | None = None) -> tuple[float, int]:
    """Seconds from SIGTERM to exit, and the exit code (the test fails past 120 s)."""
    started = time.monotonic()
    daemon.process.send_signal(signal.SIGTERM)
    if second_after_s is not None:
        time.sleep(second_after_s)
        daemon.process.send_signal(signal.SIGTERM)
    code = daemon.process.wait(timeout=120)
    return time.monotonic() - started, code


def test_a_hung_warm_up_times_out_and_releases_the_lock(
    daemons, mlp_archive_factory, tmp_path: Path
) -> None:
    hang = hang_archive(mlp_archive_factory, tmp_path)  # packaging runs it: flag after
    flag = _hung(tmp_path)
    daemon = start(
        daemons,
        mlp_archive_factory("1"),
        state_dir=tmp_path / "state",
        home=tmp_path / "home",
        sections={"runtime": {"load_timeout_s": 6}, "server": {"grace_period_s": GRACE_S}},
    )
    with ManagementClient(management_address(daemon), timeout=60) as client:
        asked = time.monotonic()
        with pytest.raises(ClientError) as caught:
            client.load(archive=str(drop_in(daemon, hang)))
        took = time.monotonic() - asked
        assert caught.value.code == grpc.StatusCode.DEADLINE_EXCEEDED, caught.value
        assert "warm-up" in caught.value.message and "load_timeout_s" in caught.value.message
        assert 6 <= took < 25, f"the load answered after {took:.1f} s"

        # The lifecycle lock is free: other models change at once.
        changed = time.monotonic()
        client.load(archive=str(drop_in(daemon, mlp_archive_factory("2"))))
        client.set_default("mlp", "2")
        client.unload("mlp", "1")
        assert time.monotonic() - changed < 30
        assert [(m["name"], m["version"]) for m in client.list_models()] == [("mlp", "2")]
        with daemon.client() as inference:
            assert inference.infer("mlp", {"x": X})[0] == "2"

        document = client.status()
        assert document["health"] == "degraded"
        [problem] = _abandoned(document)
        assert problem.startswith("1 thread(s) abandoned") and "warm-up of hang/1" in problem
        assert "not reclaimable" in problem

        flag.unlink()  # the hung thread returns: it is no longer counted
        eventually(lambda: not _abandoned(client.status()), "the late thread to be forgotten")
    assert "the abandoned warm-up returned" in daemon.log()
    assert daemon.terminate() == 0


def test_sigterm_ends_a_daemon_whose_load_hangs(
    daemons, mlp_archive_factory, tmp_path: Path
) -> None:
    """A management load hangs (no timeout in sight); SIGTERM still ends the daemon
    within the grace period plus the margin, exit 0, and the client gets an answer."""
    hang = hang_archive(mlp_archive_factory, tmp_path)  # packaging runs it: flag after
    flag = _hung(tmp_path)
    daemon = start(
        daemons,
        mlp_archive_factory("1"),
        state_dir=tmp_path / "state",
        home=tmp_path / "home",
        sections={"server": {"grace_period_s": GRACE_S}},  # load_timeout_s: 120 s, the default
    )
    answers: list[BaseException] = []

    def load() -> None:
        with ManagementClient(management_address(daemon), timeout=120) as client:
            try:
                client.load(archive=str(drop_in(daemon, hang)))
            except ClientError as exc:
                answers.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    _wait_entered(flag)
    took, code = _sigterm_to_exit(daemon)
    loader.join(timeout=30)
    print(f"\nSIGTERM to exit with a hung warm-up (grace {GRACE_S:g} s): {took:.2f} s")
    assert code == 0, daemon.log()
    assert took < GRACE_S + MARGIN_S, f"{took:.1f} s from SIGTERM to exit"
    assert answers and answers[0].code in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
    assert "warm-up still running; its thread is abandoned" in daemon.log()


def test_sigterm_during_startup_with_a_hung_configured_model(
    daemons, mlp_archive_factory, tmp_path: Path
) -> None:
    """The configured model hangs in warm-up before the daemon is ever ready."""
    hang = hang_archive(mlp_archive_factory, tmp_path)  # packaging runs it: flag after
    flag = _hung(tmp_path)
    daemon = start(
        daemons,
        hang,
        state_dir=tmp_path / "state",
        home=tmp_path / "home",
        sections={"server": {"grace_period_s": GRACE_S}},  # load_timeout_s: 120 s, the default
        wait=False,
    )
    _wait_entered(flag)
    took, code = _sigterm_to_exit(daemon)
    print(f"\nSIGTERM to exit during a hung startup load (grace {GRACE_S:g} s): {took:.2f} s")
    assert code == 0, daemon.log()
    assert took < GRACE_S + MARGIN_S, f"{took:.1f} s from SIGTERM to exit"
    assert "stopping during startup" in daemon.log()


def test_a_second_signal_exits_at_once(daemons, mlp_archive_factory, tmp_path: Path) -> None:
    """With a long grace period and a hung load, the second SIGTERM ends it now."""
    hang = hang_archive(mlp_archive_factory, tmp_path)  # packaging runs it: flag after
    flag = _hung(tmp_path)
    daemon = start(
        daemons,
        hang,
        state_dir=tmp_path / "state",
        home=tmp_path / "home",
        sections={"server": {"grace_period_s": 300}},
        wait=False,
    )
    _wait_entered(flag)
    took, code = _sigterm_to_exit(daemon, second_after_s=1.0)
    print(f"\nSIGTERM, SIGTERM 1 s later: exit after {took:.2f} s")
    assert code == 1 and took < 1.0 + 5.0, f"exit {code} after {took:.1f} s"
    assert "second signal: exiting without waiting for the drain" in daemon.log()
