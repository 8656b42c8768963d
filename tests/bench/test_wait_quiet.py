"""``bench.server.wait_quiet``: a bench daemon starts once the machine is quiet.

The machine's real CPU use is measured: a child process that spins one core keeps it
busy, and the wait gives up at its timeout, saying how busy the machine still was.
"""

from __future__ import annotations

import subprocess
import sys

import psutil

from bench.server import QUIET_WINDOW_S, wait_quiet


def test_a_quiet_enough_machine_is_not_waited_for() -> None:
    # Every core may be busy: the first window answers.
    waited, busy = wait_quiet(float(psutil.cpu_count() or 1), timeout_s=30.0)
    assert waited < 3 * QUIET_WINDOW_S
    assert busy <= psutil.cpu_count()


def test_a_busy_machine_is_waited_for_until_the_timeout() -> None:
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])  # noqa: S603
    try:
        waited, busy = wait_quiet(0.5, timeout_s=1.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert waited >= 1.5
    assert busy > 0.5  # the spinning child alone uses about one core
