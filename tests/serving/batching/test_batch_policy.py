"""The batch policy on a fake clock: plain numbers in, decisions out."""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass, field

import pytest

from edgeserve.serving.batch_policy import ArrivalRate, Dispatch, ServiceTimeFit, Wait, decide

A, B = 0.0001, 0.002  # 0.1 ms per row, 2 ms per batch: a model where batching pays


def fitted(a: float = A, b: float = B, sizes: range = range(1, 17)) -> ServiceTimeFit:
    fit = ServiceTimeFit()
    for n in sizes:
        fit.record(n, a * n + b)
    return fit


def ask(
    fit: ServiceTimeFit,
    *,
    now: float = 10.0,
    oldest: float = 10.0,
    queued: int = 1,
    max_batch: int = 32,
    delay: float = 0.005,
    preferred: tuple[int, ...] = (),
    rate: float = 0.0,
):
    return decide(now, oldest, queued, max_batch, delay, preferred, rate, fit)


# -- the estimates ----------------------------------------------------------------------


def test_fit_recovers_an_exact_line():
    fit = fitted()
    assert fit.ready
    assert fit.a == pytest.approx(A, rel=1e-6)
    assert fit.b == pytest.approx(B, rel=1e-6)
    assert fit.predict(10) == pytest.approx(A * 10 + B, rel=1e-6)


def test_fit_is_not_ready_on_a_cold_start_or_with_one_batch_size():
    fit = ServiceTimeFit()
    assert not fit.ready
    for _ in range(50):
        fit.record(1, 0.001)
    assert not fit.ready  # the slope (and so the fixed cost) is unknown


def test_fit_is_not_ready_before_enough_points():
    fit = ServiceTimeFit(min_points=8)
    for n in (1, 4, 8):
        fit.record(n, A * n + B)
    assert not fit.ready


def test_fit_follows_a_model_that_got_slower():
    fit = fitted()
    for _ in range(4):
        for n in range(1, 17):
            fit.record(n, 2 * A * n + 3 * B)
    assert fit.a == pytest.approx(2 * A, rel=0.05)
    assert fit.b == pytest.approx(3 * B, rel=0.05)


def test_fit_clamps_a_negative_slope_to_zero():
    fit = ServiceTimeFit(min_points=2)
    fit.record(1, 0.003)
    fit.record(8, 0.001)
    assert fit.a == 0.0
    assert fit.b > 0.0


def test_arrival_rate_from_regular_gaps():
    rate = ArrivalRate()
    assert rate.rate(0.0) == 0.0
    for i in range(20):
        rate.record(i * 0.001)
    assert rate.rate(0.019) == pytest.approx(1000.0, rel=1e-6)


def test_arrival_rate_counts_rows_and_decays_when_arrivals_stop():
    rate = ArrivalRate()
    for i in range(20):
        rate.record(i * 0.001, rows=4)
    assert rate.rate(0.019) == pytest.approx(4000.0, rel=1e-6)
    # One second of silence: the estimate no longer claims thousands per second.
    assert rate.rate(1.019) == pytest.approx(4.0, rel=1e-6)


# -- decide -----------------------------------------------------------------------------


def test_idle_instance_with_no_history_dispatches_at_once():
    assert ask(ServiceTimeFit(), queued=1, rate=1e6) == Dispatch(1)
    assert ask(ServiceTimeFit(), queued=5, rate=1e6) == Dispatch(5)


def test_empty_queue_waits_for_a_change():
    assert ask(fitted(), queued=0, rate=1e6) == Wait(math.inf)


def test_waits_when_the_fit_and_the_rate_say_it_pays():
    # 10k rows/s: 20 rows arrive during one 2 ms fixed cost, far more than the 1 queued.
    decision = ask(fitted(), queued=1, rate=10_000.0, now=10.0, oldest=10.0)
    assert isinstance(decision, Wait)
    assert 10.0 < decision.until <= 10.0 + 0.005


def test_does_not_wait_when_arrivals_are_too_slow_to_pay():
    # 200 rows/s: the next row is 5 ms away, longer than the 2 ms a batch saves.
    assert ask(fitted(), queued=1, rate=200.0, delay=0.050) == Dispatch(1)
    # 10k rows/s, but 25 already queued: more than arrive during one fixed cost.
    assert ask(fitted(), queued=25, rate=10_000.0) == Dispatch(25)


def test_does_not_wait_when_batches_cost_no_fixed_time():
    linear = fitted(a=0.001, b=0.0)
    assert ask(linear, queued=1, rate=1e6) == Dispatch(1)


def test_never_waits_past_the_queue_delay_of_the_oldest():
    fit = fitted()
    oldest, delay = 10.0, 0.005
    assert ask(fit, now=oldest + delay, oldest=oldest, delay=delay, rate=1e5) == Dispatch(1)
    assert ask(fit, now=oldest + 1.0, oldest=oldest, delay=delay, rate=1e5) == Dispatch(1)
    for step in range(50):
        now = oldest + step * delay / 50
        for rate in (1e3, 1e4, 1e5, 1e6):
            decision = ask(fit, now=now, oldest=oldest, delay=delay, rate=rate)
            if isinstance(decision, Wait):
                assert now < decision.until <= oldest + delay


def test_no_wait_when_not_even_one_row_is_expected_before_the_delay_ends():
    # 10k rows/s means one every 0.1 ms; only 0.05 ms of delay is left.
    decision = ask(fitted(), now=10.00495, oldest=10.0, delay=0.005, rate=10_000.0)
    assert decision == Dispatch(1)


def test_zero_queue_delay_never_waits():
    assert ask(fitted(), delay=0.0, rate=1e6) == Dispatch(1)


def test_full_batch_dispatches_at_once_even_when_waiting_would_pay():
    assert ask(fitted(), queued=32, max_batch=32, rate=1e6) == Dispatch(32)
    assert ask(fitted(), queued=40, max_batch=32, rate=1e6) == Dispatch(32)


def test_preferred_sizes_cut_the_batch_when_not_waiting():
    fit = ServiceTimeFit()  # cold: waiting never pays
    assert ask(fit, queued=6, preferred=(4, 8)) == Dispatch(4)
    assert ask(fit, queued=8, preferred=(4, 8)) == Dispatch(8)
    assert ask(fit, queued=13, preferred=(8, 4, 16)) == Dispatch(8)
    assert ask(fit, queued=3, preferred=(4, 8)) == Dispatch(3)  # below every preferred size
    # At the delay bound the oldest must go; a preferred size still includes it.
    assert ask(fitted(), queued=6, preferred=(4,), now=11.0, oldest=10.0, rate=1e6) == Dispatch(4)


def test_preferred_sizes_do_not_stop_a_wait_that_pays():
    decision = ask(fitted(), queued=5, preferred=(4, 8), rate=100_000.0)
    assert isinstance(decision, Wait)


# -- a whole run on a fake clock --------------------------------------------------------


@dataclass
class Run:
    sizes: list[int] = field(default_factory=list)
    idle_waits: list[float] = field(default_factory=list)  # added wait on an idle instance
    waits: int = 0


def simulate(
    rate: float,
    *,
    a: float = A,
    b: float = B,
    max_batch: int = 32,
    delay: float = 0.002,
    count: int = 3000,
    seed: int = 1,
) -> Run:
    """One instance whose batches take a*n + b s, fed Poisson arrivals, driven by decide."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible simulation, not security
    arrivals, t = [], 0.0
    for _ in range(count):
        t += rng.expovariate(rate)
        arrivals.append(t)
    fit, rates, run = ServiceTimeFit(), ArrivalRate(), Run()
    queue: deque[float] = deque()
    now, busy_until, wake, i = 0.0, 0.0, math.inf, 0
    idle_since = 0.0
    while i < count or queue:
        if now >= busy_until and queue:
            decision = decide(now, queue[0], len(queue), max_batch, delay, (), rates.rate(now), fit)
            if isinstance(decision, Dispatch):
                batch = [queue.popleft() for _ in range(min(decision.size, len(queue)))]
                run.idle_waits.append(now - max(batch[0], idle_since))
                run.sizes.append(len(batch))
                busy_until = idle_since = now + a * len(batch) + b
                fit.record(len(batch), a * len(batch) + b)
                wake = math.inf
                continue
            run.waits += 1
            wake = decision.until
        next_arrival = arrivals[i] if i < count else math.inf
        now = min(next_arrival, busy_until if busy_until > now else math.inf, wake)
        if now == wake:
            wake = math.inf
        if now == next_arrival:
            queue.append(now)
            rates.record(now)
            i += 1
    return run


def test_low_load_adds_no_wait_and_runs_batches_of_one():
    run = simulate(rate=50.0, count=500)
    assert run.waits == 0
    assert max(run.idle_waits) == 0.0
    assert sum(run.sizes) / len(run.sizes) < 1.1


def test_overload_runs_full_batches():
    run = simulate(rate=12_000.0)  # above what even full batches can serve
    assert sum(run.sizes) == 3000
    assert run.sizes[2:-1] == [32] * (len(run.sizes) - 3)  # after the cold start


def test_moderate_load_waits_within_the_delay_bound_and_batches():
    # 2k rows/s against a 2 ms fixed cost: ~4 rows arrive per fixed cost, so waiting pays.
    run = simulate(rate=2_000.0, delay=0.005)
    assert sum(run.sizes) == 3000
    assert run.waits > 0
    assert max(run.idle_waits) <= 0.005 + 1e-9
    assert sum(run.sizes) / len(run.sizes) > 3.0
    no_wait = simulate(rate=2_000.0, delay=0.0)
    assert sum(run.sizes) / len(run.sizes) > sum(no_wait.sizes) / len(no_wait.sizes)


def test_high_load_with_no_fixed_cost_never_waits():
    run = simulate(rate=5_000.0, a=0.0001, b=0.0)
    assert run.waits == 0
    assert max(run.idle_waits) == 0.0
