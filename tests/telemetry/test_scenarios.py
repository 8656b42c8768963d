"""Issue 9's "What it must show", end to end: a real daemon, a real Mosquitto, a real
``edgeserve fleet collect`` and real SQLite files on both sides.

Each scenario is the issue's, cut to CI length (the whole file runs in about three minutes
on two cores): ``telemetry.interval_s`` 0.5 s (the smallest accepted) and a sample every
0.1 s make about 14 rows (8.5 KiB of bodies) a second with the MLP under load, so seconds
here stand for the issue's minutes. How each longer version maps is said in each test's
docstring. The figures (rows, drops, ids) are printed (``pytest -s`` shows them).

The controller's broker session. A QoS 1 message the broker has acknowledged is the
broker's to keep: Mosquitto saves sessions on a clean stop (or its autosave), so a broker
killed with SIGKILL comes back with the sessions of its last save. Where a scenario kills
the broker, or starts the collector after the device, the collector first subscribes
once and the broker is restarted cleanly, as a controller's broker with persistence has
the collector's session saved; the scenario itself then kills or starts it as the issue
says.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from tests.conftest import DaemonFactory, RunningDaemon
from tests.mqtt_broker import Mosquitto, Observer
from tests.telemetry.scenario_support import (
    WAIT_S,
    BufferRow,
    Collected,
    Load,
    assert_clean_log,
    broker_pid,
    buffer_rows,
    buffer_top,
    collected,
    eventually,
    fleet_config,
    messages,
    read_only,
    report,
    start_collector,
    start_daemon_with_log_elsewhere,
    status,
    stop_collector,
    telemetry_config,
    unread_from,
)
from tests.telemetry.test_collector import CollectorProcess

TOPIC = "edgeserve/v1/devices/{}/telemetry"


@pytest.fixture
def archive(mlp_archive_factory) -> Path:
    return Path(mlp_archive_factory("1"))


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of the test's own (created, not started: the test starts it)."""
    mosquitto = Mosquitto(tmp_path / "mosquitto")
    try:
        yield mosquitto
    finally:
        mosquitto.close()


@pytest.fixture
def collectors() -> Iterator[list[CollectorProcess]]:
    started: list[CollectorProcess] = []
    try:
        yield started
    finally:
        for process in started:
            process.close()


def saved_session(broker: Mosquitto, collectors: list[CollectorProcess], db: Path) -> None:
    """The collector's persistent session, saved by the broker (see the module docstring):
    the broker is left stopped, the collector not running."""
    broker.start()
    stop_collector(start_collector(collectors, broker, db))
    broker.stop()


def ids(records: list[Collected]) -> list[int]:
    return [r.id for r in records]


def same_row(a_body: str, b_body: str) -> bool:
    return bool(json.loads(a_body) == json.loads(b_body))


def backlog_sent(daemon: RunningDaemon) -> bool:
    """Nothing older than a few intervals waits (``status``: the oldest unsent row's age;
    the buffer always holds the interval just written, so the row count is never 0)."""
    age = status(daemon)["telemetry"]["oldest_unsent_age_s"]
    return age is None or age < 2.0


def intervals_after(db: Path, after_id: int) -> int:
    """How many intervals (``rollup`` rows of kind ``system``) the buffer holds above an id."""
    return sum(
        r.cls == "rollup" and r.kind == "system" for i, r in buffer_rows(db).items() if i > after_id
    )


def next_run(records: list[Collected], accept: Callable[[Collected], bool]) -> list[Collected]:
    """The leading records that ``accept`` takes."""
    run = []
    for record in records:
        if not accept(record):
            break
        run.append(record)
    return run


def wait_all_arrived(db: Path, device: str, buffer_db: Path, first: int) -> list[Collected]:
    """After the daemon stopped: until every id from ``first`` to the buffer's last one is
    at the collector or still in the buffer (rows never sent wait for the next run)."""

    def complete() -> list[Collected] | None:
        got = collected(db, device)
        left = set(buffer_rows(buffer_db))
        wanted = set(range(first, buffer_top(buffer_db) + 1))
        return got if wanted <= {r.id for r in got} | left else None

    return list(eventually(complete, "every id at the collector or in the buffer"))


@pytest.mark.slow
def test_outage_every_id_arrives_once_and_live_data_goes_first(
    daemons: DaemonFactory,
    archive: Path,
    broker: Mosquitto,
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    """**Outage.** The issue's 2 minutes of load with the broker stopped for most of it
    become: load throughout, about 15 s of rows (``OUTAGE_ROWS``) written with the broker
    killed (SIGKILL), then the broker started on the same port and the backlog drained at
    a 32 KiB/s cap in 8 KiB messages. Shown: every id from the first to the last is at the
    collector exactly once (no gap, explained or not); the first message after the
    reconnect that carries rows written since the outage began holds the newest rows,
    and every row of the outage it does not hold arrives after it, oldest first per class;
    not one inference request failed. (The p99 comparison is the bench's.)"""
    outage_rows = 200
    device, fleet_db = "scn-outage", tmp_path / "fleet.db"
    saved_session(broker, collectors, fleet_db)
    broker.start()
    collector = start_collector(collectors, broker, fleet_db)
    config = telemetry_config(batch_bytes=8192, upload_bytes_per_s=32768)
    daemon = daemons.start(archive, extra_config=config + fleet_config(broker, device))
    db = daemon.state_dir / "telemetry.db"
    load = Load(daemon).start()
    started = time.monotonic()
    eventually(lambda: len(collected(fleet_db, device)) >= 20, "records at the collector")

    broker.kill()
    eventually(lambda: not status(daemon)["fleet"]["connected"], "the daemon to see the outage")
    at_kill = buffer_top(db)  # every row above it was written while the link was down
    eventually(lambda: buffer_top(db) >= at_kill + outage_rows, f"{outage_rows} rows offline")
    at_restart = buffer_top(db)
    # Two intervals after it before the broker returns: whatever the reconnect's timing,
    # the daemon's "live" rows (its newest interval) are then all above at_restart.
    eventually(lambda: intervals_after(db, at_restart) >= 2, "two more intervals")
    outage_s = time.monotonic() - started
    broker.start()
    restarted = time.monotonic()
    eventually(lambda: status(daemon)["fleet"]["connected"], "the reconnect", 90.0)
    reconnect_s = time.monotonic() - restarted
    eventually(lambda: backlog_sent(daemon), "the backlog sent", 90.0)
    drained_s = time.monotonic() - restarted
    load.wait_ok(20, "requests after the backlog went")
    load.stop()
    assert daemon.terminate() == 0

    records = wait_all_arrived(fleet_db, device, db, 1)
    stored, duplicates = stop_collector(collector)
    assert load.failed == [] and load.ok > 0
    assert_clean_log(daemon)

    # Each (device, id) once, and every id from the first to the last one collected.
    got = sorted(ids(records))
    assert got == list(range(1, got[-1] + 1)), "ids missing at the collector"
    assert len(set(got)) == len(records) == stored
    left = set(buffer_rows(db))
    assert all(i > at_restart for i in left), "only the last live rows may wait in the buffer"
    found = report(fleet_db, device)
    assert found["id_range"] == [1, got[-1]]
    assert found["unexplained_gaps"] == [] and found["explained_gaps"] == []
    assert found["dropped"] == {}

    # Live data first. In arrival order, the rows written since the outage began: the
    # first ones to arrive are the newest interval's (above at_restart, a rollup among
    # them), in the first message after the reconnect; every outage row comes after them,
    # and the outage rows go oldest first per class.
    since_kill = [r for r in records if r.id > at_kill]
    live = next_run(since_kill, lambda r: r.id > at_restart)
    assert live, f"the first row after the reconnect is {since_kill[0]} (ids <= {at_restart})"
    assert any(r.cls == "rollup" for r in live), live
    first_message = next(m for m in messages(records) if since_kill[0] in m)
    assert first_message[0] == live[0], "the first message does not begin with the live rows"
    outage = [r for r in since_kill if r.id <= at_restart]
    assert {r.id for r in outage} == set(range(at_kill + 1, at_restart + 1))
    assert since_kill.index(outage[0]) >= len(live)
    for cls in ("event", "rollup", "sample"):
        order = [r.id for r in outage if r.cls == cls]
        assert order == sorted(order), f"the {cls} backlog went out of order"
    rest = [m for m in messages(records) if m[0].order > first_message[-1].order]
    print(
        f"\noutage: {at_restart - at_kill} rows offline (ids {at_kill + 1}..{at_restart}) "
        f"after {outage_s:.1f} s; reconnect {reconnect_s:.1f} s, backlog sent "
        f"{drained_s:.1f} s after the broker came back in {len(rest)} later messages; "
        f"first {len(live)} rows after it: ids {min(ids(live))}..{max(ids(live))}; "
        f"collector: {stored} "
        f"records, ids 1..{got[-1]}, {duplicates} duplicates; requests {load.ok} ok, 0 failed"
    )


def integrity(path: Path) -> str:
    with read_only(path) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def assert_rows_kept(
    rows: dict[int, BufferRow], records: list[Collected], left: dict[int, BufferRow]
) -> None:
    """Each row is at the collector or still in the buffer, with the body it had."""
    at_collector = {r.id: r for r in records}
    for i, row in rows.items():
        there = at_collector.get(i) or left.get(i)
        assert there is not None, f"row {i} ({row.cls}/{row.kind}) was lost"
        assert (there.cls, there.kind, there.time) == (row.cls, row.kind, row.time), i
        assert same_row(there.body, row.body), f"row {i} changed: an id was reused"


@pytest.mark.slow
def test_kill_9_during_heavy_writes_keeps_every_committed_row(
    daemons: DaemonFactory,
    archive: Path,
    broker: Mosquitto,
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    """**Crash.** The daemon under load writes a sample every 0.1 s and an interval every
    0.5 s while the uploader, capped at 1 KiB/s in 1 KiB messages, deletes what the
    broker acknowledged: the file takes a commit every few tens of milliseconds, and a
    backlog builds. It is killed with SIGKILL (the issue's "during heavy writes"; one kill
    here, at whatever point the writes are). Shown: ``PRAGMA integrity_check`` is ok on the
    file as the kill left it; every row committed before the kill (a read-only snapshot
    just before it) is at the collector or in the buffer with the same class, kind, time
    and body; the restarted daemon (same state dir) issues ids above every old one, its
    first row is the new ``restart`` event, the old backlog reaches the collector, and the
    collector holds each id once with no gap."""
    device, fleet_db = "scn-crash", tmp_path / "fleet.db"
    broker.start()
    collector = start_collector(collectors, broker, fleet_db)
    slow = telemetry_config(batch_bytes=1024, upload_bytes_per_s=1024)
    daemon = daemons.start(archive, extra_config=slow + fleet_config(broker, device))
    db = daemon.state_dir / "telemetry.db"
    load = Load(daemon).start()
    eventually(lambda: len(collected(fleet_db, device)) >= 5, "records at the collector")
    eventually(lambda: len(buffer_rows(db)) >= 60, "a backlog in the buffer")
    before = buffer_rows(db)
    daemon.process.send_signal(signal.SIGKILL)
    daemon.process.wait(WAIT_S)
    load.stop()
    assert integrity(db) == "ok"
    after_kill = buffer_rows(db)
    top = buffer_top(db)
    assert top >= max(before) and set(after_kill) <= set(range(1, top + 1))
    assert_rows_kept(before, collected(fleet_db, device), after_kill)
    assert_clean_log(daemon)

    fast = telemetry_config(upload_bytes_per_s=65536)
    again = daemons.start(
        archive, state_dir=daemon.state_dir, extra_config=fast + fleet_config(broker, device)
    )
    assert integrity(db) == "ok"
    eventually(lambda: backlog_sent(again), "the old backlog sent", 90.0)
    assert again.terminate() == 0
    records = wait_all_arrived(fleet_db, device, db, 1)
    stored, duplicates = stop_collector(collector)
    assert_clean_log(again)

    left = buffer_rows(db)
    assert_rows_kept(before, records, left)
    assert_rows_kept(after_kill, records, left)
    got = sorted(ids(records))
    assert got == list(range(1, got[-1] + 1)), "ids missing at the collector"
    new = [r for r in records if r.id > top]
    assert min(ids(new)) == top + 1, "the new run's ids do not continue the old ones"
    restarts = [r for r in records if r.kind == "restart"]
    assert len(restarts) == 2 and restarts[1].id > top, (restarts, top)
    assert json.loads(restarts[1].body)["pid"] == again.process.pid
    found = report(fleet_db, device)
    assert found["unexplained_gaps"] == [] and found["explained_gaps"] == []
    print(
        f"\ncrash: killed with {len(after_kill)} rows in the buffer (ids "
        f"{min(after_kill)}..{top}), {len(before)} in the snapshot before the kill; "
        f"integrity ok; new run from id {top + 1}, its restart event {restarts[1].id}; "
        f"collector {stored} records "
        f"(ids 1..{got[-1]}, {len(new)} from the new run), {duplicates} duplicates"
    )


@pytest.mark.slow
def test_kill_9_between_publish_and_puback_sends_the_batch_again(
    daemons: DaemonFactory,
    archive: Path,
    broker: Mosquitto,
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    """**Crash between publish and PUBACK.** The broker is frozen (SIGSTOP): the daemon's
    next batch goes out and sits unread in the broker's socket (seen in ``/proc/net/tcp``),
    so no PUBACK can come. The daemon is killed (SIGKILL), the broker resumed (SIGCONT;
    it may now deliver the dead daemon's message), and the daemon restarted on the same
    state dir. Shown: every row in the buffer at the kill, the batch in flight among them,
    is sent again by the new run (a plain subscriber sees it under the new ``boot_id``);
    the collector holds each id once with the buffer's body; when the dead run's copy was
    delivered too, the collector counted the second copies as duplicates."""
    device, fleet_db = "scn-puback", tmp_path / "fleet.db"
    broker.start()
    collector = start_collector(collectors, broker, fleet_db)
    config = telemetry_config() + fleet_config(broker, device)
    daemon = daemons.start(archive, extra_config=config)
    db = daemon.state_dir / "telemetry.db"
    observer = Observer(broker, TOPIC.format(device))
    seen: list[dict] = []
    try:
        eventually(lambda: drain(observer, seen), "a message from the first run")
        old_boot = seen[0]["boot_id"]
        pid = broker_pid(broker)
        os.kill(pid, signal.SIGSTOP)
        try:
            eventually(lambda: unread_from(daemon.process.pid, broker) > 100, "a publish")
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(WAIT_S)
            drain(observer, seen)
            frozen_at = len(seen)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert_clean_log(daemon)
        held = buffer_rows(db)  # committed and never acknowledged: all of it goes again
        top = buffer_top(db)
        again = daemons.start(archive, state_dir=daemon.state_dir, extra_config=config)
        eventually(lambda: backlog_sent(again), "the old backlog sent", 90.0)
        assert again.terminate() == 0
        records = wait_all_arrived(fleet_db, device, db, 1)
        eventually(lambda: resent(drain(observer, seen), old_boot) >= set(held), "the re-send")
    finally:
        observer.close()
    stored, duplicates = stop_collector(collector)
    assert_clean_log(again)

    late = [m for m in seen[frozen_at:] if m["boot_id"] == old_boot]  # the frozen batch
    assert len(late) <= 1
    assert_rows_kept(held, records, buffer_rows(db))
    got = sorted(ids(records))
    assert got == list(range(1, got[-1] + 1)), "ids missing at the collector"
    assert min(i for i in got if i > top) == top + 1
    found = report(fleet_db, device)
    assert found["unexplained_gaps"] == [] and found["explained_gaps"] == []
    in_flight: set[int] = set()
    if late:
        in_flight = {r["id"] for r in late[0]["records"]}
        assert in_flight <= set(held), "the frozen batch held rows the buffer had deleted"
        assert duplicates >= len(in_flight)
    print(
        f"\npuback: {len(held)} unacknowledged rows at the kill (ids {min(held)}..{top}); "
        f"the frozen batch ({len(in_flight) or 'not'} rows) delivered after SIGCONT: "
        f"{bool(late)}; all {len(held)} sent again by the new run; collector {stored} "
        f"records, {duplicates} duplicates, ids 1..{got[-1]}"
    )


def drain(observer: Observer, into: list[dict]) -> list[dict]:
    """Move what the subscriber received into ``into`` (decoded); ``into``."""
    while not observer.messages.empty():
        into.append(json.loads(observer.messages.get_nowait().payload))
    return into


def resent(seen: list[dict], old_boot: str) -> set[int]:
    """Ids that a run other than ``old_boot`` sent."""
    return {r["id"] for m in seen if m["boot_id"] != old_boot for r in m["records"]}


def on_disk(db: Path) -> int:
    """Bytes of the buffer file and its WAL."""
    wal = Path(f"{db}-wal")
    return db.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def drop_ranges(rows: Iterable[Collected | BufferRow]) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    for row in rows:
        if row.kind == "drop":
            body = json.loads(row.body)
            out.setdefault(body["class"], []).append((body["first_id"], body["last_id"]))
    return out


@pytest.mark.slow
def test_budget_drops_by_class_and_reports_every_drop(
    daemons: DaemonFactory,
    archive: Path,
    broker: Mosquitto,
    collectors: list[CollectorProcess],
    tmp_path: Path,
) -> None:
    """**Budget.** ``telemetry.max_bytes`` 64 KiB (the smallest accepted) and a daemon
    under load that never reaches its broker until about 250 rows were dropped, several
    times what the budget holds (the issue's "long outage": there weeks against 64 MiB,
    here seconds against 64 KiB); then the broker comes up (the collector's session saved
    at it beforehand) and the collector starts. Shown: no event is ever dropped, samples
    go first (the first drop event is of class ``sample``); every row the buffer ever
    showed (read-only snapshots all along) that the collector lacks lies in a drop event's
    range of its own class; the drop events that reach the collector count exactly the
    drops by class that ``status`` reports; the file never grows past the budget (the
    main file) nor past budget + 4 MiB (with its WAL); the report's unexplained gaps = []."""
    max_bytes = 65536
    device, fleet_db = "scn-budget", tmp_path / "fleet.db"
    saved_session(broker, collectors, fleet_db)
    config = telemetry_config(max_bytes=max_bytes) + fleet_config(broker, device)
    daemon = daemons.start(archive, extra_config=config)
    db = daemon.state_dir / "telemetry.db"
    load = Load(daemon).start()
    shown: dict[int, BufferRow] = {}
    largest = [0, 0]  # the main file, the main file with its WAL

    def watch() -> None:
        shown.update(buffer_rows(db))
        largest[:] = max(largest[0], db.stat().st_size), max(largest[1], on_disk(db))

    def dropped_enough() -> bool:
        watch()
        return sum(status(daemon)["telemetry"]["dropped"].values()) >= 250

    started = time.monotonic()
    eventually(dropped_enough, "drops", 120.0)
    outage_s = time.monotonic() - started
    broker.start()
    collector = start_collector(collectors, broker, fleet_db)

    def sent() -> bool:
        watch()
        return backlog_sent(daemon)

    eventually(sent, "the backlog sent", 90.0)
    load.stop()
    assert daemon.terminate() == 0
    watch()
    final = status(daemon, code=3)["telemetry"]["dropped"]
    left = buffer_rows(db)

    def complete() -> list[Collected] | None:
        got = collected(fleet_db, device)
        ranges = [r for spans in drop_ranges([*got, *left.values()]).values() for r in spans]
        have = {r.id for r in got} | set(left)
        missing = set(range(1, buffer_top(db) + 1)) - have
        return got if all(any(a <= i <= b for a, b in ranges) for i in missing) else None

    records = eventually(complete, "every row at the collector, in the buffer or dropped")
    stored, duplicates = stop_collector(collector)
    assert load.failed == [] and load.ok > 0
    assert_clean_log(daemon)

    assert final["event"] == 0 and final["sample"] > 0, final
    drops = [r for r in records if r.kind == "drop"]
    assert json.loads(drops[0].body)["class"] == "sample"
    assert [r for r in left.values() if r.kind == "drop"] == [], "drop events never sent"
    counted = dict.fromkeys(final, 0)
    for row in drops:
        counted[json.loads(row.body)["class"]] += json.loads(row.body)["count"]
    assert counted == final, "a drop is not described by a drop event"
    ranges = drop_ranges(records)
    at_collector = {r.id for r in records}
    for i, row in shown.items():
        if i not in at_collector and i not in left:
            assert row.cls != "event", f"event {i} ({row.kind}) was dropped"
            spans = ranges.get(row.cls, [])
            assert any(a <= i <= b for a, b in spans), f"{row.cls} {i} lost without a drop event"
    assert largest[0] <= max_bytes and largest[1] <= max_bytes + 4 * 1024 * 1024, largest
    found = report(fleet_db, device)
    assert found["unexplained_gaps"] == [] and found["explained_gaps"], found
    assert found["dropped"] == {c: n for c, n in final.items() if n}
    print(
        f"\nbudget: {max_bytes} B, outage {outage_s:.1f} s, {len(shown)} rows seen in the "
        f"buffer; dropped {final} in {len(drops)} drop events; largest file {largest[0]} B, "
        f"with WAL {largest[1]} B; collector {stored} records ({duplicates} duplicates), "
        f"{len(found['explained_gaps'])} explained gaps, 0 unexplained; requests {load.ok} ok"
    )


@pytest.mark.slow
def test_disk_full_fails_soft_and_writes_resume(
    daemons: DaemonFactory, archive: Path, tmp_path: Path
) -> None:
    """**Disk full.** The whole state dir (model store, live set, telemetry buffer and its
    id mark) is a 16 MiB tmpfs; the daemon's config and log live outside it, so a full
    state dir does not take the test's view of the log with it. Another writer (``dd``)
    fills the tmpfs. Shown: requests keep succeeding while it is full, telemetry writes
    fail and are counted (``status``: ``write_failures`` > 0), and once the filler is
    deleted rows are written again and the failures stop growing. Needs root (mount)."""
    state = tmp_path / "state"
    state.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16m,mode=0750", "tmpfs", str(state)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert mounted.returncode == 0, f"this scenario mounts a tmpfs (root): {mounted.stderr}"
    daemon: RunningDaemon | None = None
    try:
        daemon = start_daemon_with_log_elsewhere(
            daemons,
            archive,
            state_dir=state,
            home=tmp_path / "home",
            extra_config=telemetry_config(max_bytes=8 * 1024 * 1024),
        )
        db = state / "telemetry.db"
        load = Load(daemon).start()
        eventually(lambda: buffer_top(db) >= 20, "rows in the buffer")
        assert status(daemon)["telemetry"]["write_failures"] == 0
        filler = state / "filler"
        dd = subprocess.run(
            ["dd", "if=/dev/zero", f"of={filler}", "bs=64k"], capture_output=True, check=False
        )
        assert dd.returncode != 0 and b"No space left on device" in dd.stderr, dd.stderr
        full_at = time.monotonic()
        eventually(lambda: status(daemon)["telemetry"]["write_failures"] > 0, "failed writes")
        full_s = time.monotonic() - full_at
        load.wait_ok(50, "requests served while the disk is full")
        failures = status(daemon)["telemetry"]["write_failures"]
        served_full = load.ok
        filler.unlink()
        top = buffer_top(db)
        eventually(lambda: buffer_top(db) >= top + 30, "rows written again")
        settled = status(daemon)["telemetry"]["write_failures"]
        eventually(lambda: buffer_top(db) >= top + 60, "more rows")
        assert status(daemon)["telemetry"]["write_failures"] == settled, "writes still fail"
        load.stop()
        assert load.failed == [] and load.ok > served_full
        assert daemon.terminate() == 0
        assert_clean_log(daemon)
        assert "telemetry write failed" in daemon.log()
        print(
            f"\ndisk full: first failed write {full_s:.1f} s after the tmpfs filled; "
            f"{failures} failed writes counted while full, {settled} in all; rows written "
            f"again from id {top + 1}; requests {load.ok} ok, 0 failed"
        )
    finally:
        if daemon is not None and daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        subprocess.run(["umount", str(state)], check=True)


def test_a_corrupt_buffer_is_moved_aside_and_the_daemon_serves(
    daemons: DaemonFactory, archive: Path, tmp_path: Path
) -> None:
    """**Corrupt file at start.** A first run leaves a buffer with rows; it is replaced by
    garbage. Shown: the daemon starts and serves, the garbage is kept byte for byte as
    ``telemetry.db.corrupt-<UTC time>``, the fresh file passes ``integrity_check``, a
    ``buffer_reset`` event names the moved file, and the fresh ids start above every id
    the first run issued (no ``(device, id)`` can repeat at a collector)."""
    state = tmp_path / "state"
    config = telemetry_config()
    first = daemons.start(archive, state_dir=state, extra_config=config)
    db = state / "telemetry.db"
    eventually(lambda: buffer_top(db) >= 20, "rows in the buffer")
    assert first.terminate() == 0
    old_top = buffer_top(db)
    garbage = b"this is not an SQLite database\n" * 4096
    for suffix in ("-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    db.write_bytes(garbage)

    daemon = daemons.start(archive, state_dir=state, extra_config=config)
    load = Load(daemon).start()
    load.wait_ok(20, "requests served")
    (moved,) = state.glob("telemetry.db.corrupt-*")
    assert moved.read_bytes() == garbage
    resets = eventually(
        lambda: [r for r in buffer_rows(db).values() if r.kind == "buffer_reset"], "the event"
    )
    body = json.loads(resets[0].body)
    assert body["moved_aside"] == moved.name and body["ids_issued_up_to"] >= old_top, body
    assert min(buffer_rows(db)) > old_top
    assert integrity(db) == "ok"
    # Recovered: the device is healthy, and the reset is an event, not a standing error.
    doc = status(daemon, code=0)
    assert doc["daemon"]["ready"] is True and doc["telemetry"]["backlog_rows"] > 0
    load.stop()
    assert load.failed == []
    assert daemon.terminate() == 0
    assert_clean_log(daemon)
    assert "moved aside to telemetry.db.corrupt-" in daemon.log()
    print(
        f"\ncorrupt: first run issued ids up to {old_top}; moved aside to {moved.name}; "
        f"fresh ids from {min(buffer_rows(db))}; buffer_reset {body}"
    )
