"""Fixtures for the telemetry tests: a hand-driven clock and recorders that read it."""

from __future__ import annotations

import pytest

from edgeserve.telemetry.recorders import Recorders


class FakeClock:
    """A clock the test moves; monotonic and wall time advance together."""

    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return 1_700_000_000.0 + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def recorders(clock: FakeClock) -> Recorders:
    return Recorders(clock=clock, wall_clock=clock.wall)
