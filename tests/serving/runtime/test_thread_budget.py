"""The intra-op thread budget is measured, and more threads must clearly pay."""

from __future__ import annotations

import time

import torch

from edgeserve.serving.thread_budget import choose_intra_op_threads, first_row, full_batch_of
from edgeserve.types import BytesTensor

Cost = float | dict[int, float]


def _costs(one_thread: Cost, more_threads: Cost, seen: list[int] | None = None):
    """A run whose cost depends on the intra-op thread count of the calling thread, and
    on the rows of its input where a cost is given per row count; ``seen`` collects the
    thread counts it ran with."""

    def run(inputs):
        threads = torch.get_num_threads()
        if seen is not None:
            seen.append(threads)
        cost = one_thread if threads == 1 else more_threads
        time.sleep(cost[int(inputs["x"].shape[0])] if isinstance(cost, dict) else cost)

    return run


def test_more_threads_are_kept_only_when_clearly_faster():
    x = {"x": torch.zeros(1, 4)}
    full = {"x": torch.zeros(8, 4)}
    faster = choose_intra_op_threads(_costs(0.004, 0.001), x, full, 2, budget_s=0.2)
    assert faster.threads == 2
    assert set(faster.timings_s) == {"1x1", "1x8", "2x1", "2x8"}
    slower = choose_intra_op_threads(_costs(0.001, 0.004), x, full, 2, budget_s=0.2)
    assert slower.threads == 1
    marginal = choose_intra_op_threads(_costs(0.002, 0.0019), x, None, 2, budget_s=0.2)
    assert marginal.threads == 1


def test_a_heavy_row_is_judged_by_the_full_batch():
    x = {"x": torch.zeros(1, 4)}
    full = {"x": torch.zeros(8, 4)}
    # 2 ms a row either way (the one-row figure is noise there), the full batch halved.
    heavy = _costs({1: 0.002, 8: 0.012}, {1: 0.002, 8: 0.006})
    assert choose_intra_op_threads(heavy, x, full, 2, budget_s=0.4).threads == 2
    # The same shape of costs on a light row (the issue-12 MLP): one thread stays.
    light = _costs({1: 0.0002, 8: 0.004}, {1: 0.0002, 8: 0.002})
    assert choose_intra_op_threads(light, x, full, 2, budget_s=0.4).threads == 1
    # A heavy row that more threads make clearly slower: one thread stays.
    slower = _costs({1: 0.002, 8: 0.012}, {1: 0.004, 8: 0.006})
    assert choose_intra_op_threads(slower, x, full, 2, budget_s=0.4).threads == 1
    # Without a full batch to judge by, a heavy row must itself be clearly faster.
    alone = _costs({1: 0.002}, {1: 0.002})
    assert choose_intra_op_threads(alone, x, None, 2, budget_s=0.2).threads == 1


def test_thread_counts_take_turns_one_size_at_a_time():
    seen: list[int] = []
    run = _costs({1: 0.0005, 8: 0.001}, {1: 0.0005, 8: 0.001}, seen)
    x = {"x": torch.zeros(1, 4)}
    choose_intra_op_threads(run, x, {"x": torch.zeros(8, 4)}, 2, budget_s=0.1)
    # Per size: one first run with each count, then rounds of 1, 2 (never 1, 1 or 2, 2).
    assert seen[:4] == [1, 2, 1, 2]
    assert all(a != b for a, b in zip(seen, seen[1:], strict=False))


def test_the_callers_thread_budget_is_untouched():
    before = torch.get_num_threads()
    choose_intra_op_threads(_costs(0.001, 0.001), {"x": torch.zeros(1)}, None, 2, budget_s=0.05)
    assert torch.get_num_threads() == before


def test_one_core_times_one_thread_only():
    choice = choose_intra_op_threads(
        _costs(0.001, 0.0), {"x": torch.zeros(1)}, None, 1, budget_s=0.05
    )
    assert choice.threads == 1 and set(choice.timings_s) == {"1x1"}
    assert 0.001 <= choice.one_thread_s < 0.01


def test_rows_are_cut_and_repeated_along_dim_0():
    sample = {"x": torch.arange(6.0).reshape(2, 3), "s": BytesTensor([b"a", b"b"], (2,))}
    one = first_row(sample)
    assert one["x"].shape == (1, 3) and one["s"].items == [b"a"]
    full = full_batch_of(sample, 5)
    assert full["x"].shape == (5, 3) and full["x"][4].tolist() == [0.0, 1.0, 2.0]
    assert full["s"].items == [b"a", b"b", b"a", b"b", b"a"] and full["s"].shape == (5,)


def test_a_slow_model_is_not_probed_beyond_the_budget():
    calls = []

    def slow(inputs):
        calls.append(1)
        time.sleep(0.12)

    started = time.monotonic()
    choice = choose_intra_op_threads(
        slow, {"x": torch.zeros(1, 2)}, {"x": torch.zeros(4, 2)}, 2, budget_s=0.1
    )
    # The first run of one row already exceeds the budget: stop there.
    assert len(calls) == 1 and choice.threads == 1
    assert time.monotonic() - started < 0.5


def test_a_full_batch_of_one_row_is_not_timed_twice():
    choice = choose_intra_op_threads(
        _costs(0.001, 0.002), {"x": torch.zeros(1, 2)}, {"x": torch.zeros(1, 2)}, 2, budget_s=0.05
    )
    assert set(choice.timings_s) == {"1x1", "2x1"}
