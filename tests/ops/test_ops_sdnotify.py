"""sd_notify over a real AF_UNIX datagram socket, as systemd would receive it."""

from __future__ import annotations

import logging
import os
import time

import pytest

from edgeserve.sdnotify import Notifier


def test_ready_stopping_watchdog_status(notify_socket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    assert notifier.ready("serving mlp/1")
    assert notify_socket.receive() == "READY=1\nSTATUS=serving mlp/1"
    assert notifier.watchdog()
    assert notify_socket.receive() == "WATCHDOG=1"
    assert notifier.status("two\nlines  and\ttabs")
    assert notify_socket.receive() == "STATUS=two lines and tabs"  # one line, always
    assert notifier.extend_timeout(1.5)
    assert notify_socket.receive() == "EXTEND_TIMEOUT_USEC=1500000"
    assert notifier.stopping()
    assert notify_socket.receive() == "STOPPING=1"


def test_reloading_carries_the_monotonic_clock(notify_socket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = notify_socket.receive().split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_abstract_socket_address(abstract_notify_socket) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": abstract_notify_socket.address})
    assert notifier.ready()
    assert abstract_notify_socket.receive() == "READY=1"


def test_without_notify_socket_everything_is_a_no_op(notify_socket) -> None:
    notifier = Notifier.from_env({})
    assert not notifier.status("nothing to send to")  # no socket: a no-op, False
    assert [notifier.ready(), notifier.watchdog(), notifier.stopping()] == [False] * 3
    assert notifier.watchdog_interval() is None
    assert not notify_socket.pending()


def test_a_relative_notify_socket_is_ignored(caplog) -> None:
    with caplog.at_level(logging.WARNING, logger="edgeserve.sdnotify"):
        notifier = Notifier.from_env({"NOTIFY_SOCKET": "relative/path"})
    assert not notifier.status("nothing to send to")  # no socket: a no-op, False
    assert "ignoring NOTIFY_SOCKET" in caplog.text


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "500000", "WATCHDOG_PID": str(os.getpid())}, 0.5),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
    ids=["set", "our-pid", "other-pid", "zero", "garbage", "unset"],
)
def test_watchdog_interval(notify_socket, env, interval) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address, **env})
    assert notifier.watchdog_interval() == interval


def test_a_vanished_socket_is_logged_not_raised(notify_socket, caplog) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": notify_socket.address})
    os.unlink(notify_socket.address)
    with caplog.at_level(logging.WARNING, logger="edgeserve.sdnotify"):
        assert notifier.watchdog() is False
    assert "sd_notify to" in caplog.text


def test_the_daemon_extends_its_start_timeout_before_each_model_load(
    daemons, mlp_archive_factory, notify_socket, monkeypatch
) -> None:
    # A real daemon under a real notify socket, as systemd runs it (Type=notify): one
    # EXTEND_TIMEOUT_USEC for the restore and one per configured model, then READY=1.
    monkeypatch.setenv("NOTIFY_SOCKET", notify_socket.address)
    daemon = daemons.start(mlp_archive_factory("1"), mlp_archive_factory("2"), wait=False)
    messages = []
    while not any(m.startswith("READY=1") for m in messages):
        messages.append(notify_socket.receive(timeout=90.0))
    extends = [m for m in messages if m.startswith("EXTEND_TIMEOUT_USEC=")]
    assert extends == ["EXTEND_TIMEOUT_USEC=120000000"] * 2, messages
    ready_at = next(i for i, m in enumerate(messages) if m.startswith("READY=1"))
    assert all(messages.index(m) < ready_at for m in extends)
    assert daemon.process.poll() is None
