"""``python -m bench.frontend_ceiling``: several echo processes on one port, as typed.

The command runs end to end (short windows) and prints, per process count, the figures
and each process's share of the servers' CPU (which process served is the kernel's
choice per connection, so the test asserts the shares add up, not how they fall).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_command_prints_a_row_per_process_count() -> None:
    command = [
        sys.executable, "-m", "bench.frontend_ceiling",
        "--processes", "1,2", "--duration", "0.5", "--repeats", "1", "--in-flight", "4",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"\s+\d+ ", line)]
    assert [row[0] for row in rows] == ["1", "2"]
    for row in rows:
        assert float(row[1]) > 0  # req/s
    shares = [float(value) for value in rows[1][6:]]
    assert len(shares) == 2 and sum(shares) == pytest.approx(1.0, abs=0.02)


def test_a_process_count_below_one_is_refused() -> None:
    command = [sys.executable, "-m", "bench.frontend_ceiling", "--processes", "0"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "--processes" in done.stderr and "Traceback" not in done.stderr
