"""Served requests are queued and folded in groups: every read still sees each one, in the
window slot of the time it was served, and a request queued past the window counts only in
the cumulative figures."""

from __future__ import annotations

import threading

from edgeserve.telemetry.recorders import FOLD_EVERY, WINDOW_SLOT_S, WINDOW_SLOTS, Recorders

from .conftest import FakeClock


def test_a_read_sees_requests_not_yet_folded(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    for _ in range(FOLD_EVERY - 1):  # fewer than a group: nothing has folded them yet
        rec.observe_request("OK", 0.002, 0.001, 0.0005, 0.0001, 0.0002)
    totals = rec.totals()
    assert totals.served.count == FOLD_EVERY - 1
    assert totals.decode.count == totals.encode.count == FOLD_EVERY - 1
    snap = rec.snapshot()
    assert snap["requests"] == {"OK": FOLD_EVERY - 1}
    assert snap["latency_s"]["queue"]["count"] == FOLD_EVERY - 1
    assert snap["window"]["requests"] == FOLD_EVERY - 1


def test_each_request_counts_in_the_slot_of_the_time_it_was_served(
    recorders: Recorders, clock: FakeClock
) -> None:
    rec = recorders.for_model("m", "1")
    rec.observe_request("OK", 0.001, None, None)
    clock.advance(WINDOW_SLOT_S * (WINDOW_SLOTS - 1))  # the first slot is still inside
    rec.observe_request("OK", 0.001, None, None)
    assert rec.snapshot()["window"]["requests"] == 2
    clock.advance(WINDOW_SLOT_S)  # now it has left the window; the second has not
    assert rec.snapshot()["window"]["requests"] == 1
    assert rec.snapshot()["requests"] == {"OK": 2}


def test_a_request_queued_past_the_window_counts_only_in_the_totals(
    recorders: Recorders, clock: FakeClock
) -> None:
    rec = recorders.for_model("m", "1")
    rec.observe_request("OK", 0.001, None, None)  # queued, no read for two minutes
    clock.advance(2 * WINDOW_SLOT_S * WINDOW_SLOTS)
    rec.observe_request("UNAVAILABLE", 0.001, None, None)  # takes the old request's slot
    rec.observe_request("OK", 0.001, None, None)
    snap = rec.snapshot()
    assert snap["requests"] == {"OK": 2, "UNAVAILABLE": 1}
    assert snap["window"]["requests"] == 2
    assert snap["window"]["errors"] == {"UNAVAILABLE": 1}
    assert rec.totals().served.count == 2


def test_writers_in_threads_and_a_reader_lose_nothing(recorders: Recorders) -> None:
    rec = recorders.for_model("m", "1")
    per_thread, threads = 5_000, 4
    reading = threading.Event()

    def write() -> None:
        for _ in range(per_thread):
            rec.observe_request("OK", 0.001, 0.0005, 0.0005, 0.0001, 0.0001)

    def read() -> None:
        while not reading.is_set():
            rec.totals()

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write) for _ in range(threads)]
    for thread in writers:
        thread.start()
    for thread in writers:
        thread.join()
    reading.set()
    reader.join()
    totals = rec.totals()
    assert totals.served.count == totals.queue.count == per_thread * threads
    assert totals.decode.count == per_thread * threads
    assert rec.snapshot()["requests"] == {"OK": per_thread * threads}
