"""The telemetry buffer on real SQLite files: ids, budget and drops, crashes, corruption,
a full disk (a real tmpfs), the read-only stats, and what the uploader gets."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from edgeserve.telemetry.buffer import (
    MIN_MAX_BYTES,
    WAL_LIMIT_BYTES,
    TelemetryBuffer,
    read_stats,
)
from edgeserve.telemetry.rows import BufferStats, Row


class StepClock:
    """Wall time that moves one second per reading, so every row has its own time."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "telemetry.db"


@pytest.fixture
def open_buffer(db_path: Path) -> Iterator[Callable[..., TelemetryBuffer]]:
    opened: list[TelemetryBuffer] = []

    def factory(path: Path = db_path, **kwargs: object) -> TelemetryBuffer:
        kwargs.setdefault("wall_clock", StepClock())
        buffer = TelemetryBuffer(path, **kwargs)  # type: ignore[arg-type]
        opened.append(buffer)
        return buffer

    yield factory
    for buffer in opened:
        buffer.close()


def rows_in(path: Path, where: str = "1") -> list[tuple]:
    with sqlite3.connect(path) as conn:
        return conn.execute(
            f"SELECT id, class, kind, body FROM records WHERE {where} ORDER BY id"  # noqa: S608
        ).fetchall()


def interval(n_rollup: int = 20, n_sample: int = 10, pad: int = 60) -> list[Row]:
    rollups = [
        Row("rollup", "latency", {"model": "m", "i": i, "h": "x" * pad}) for i in range(n_rollup)
    ]
    samples = [Row("sample", "cpu", {"i": i, "v": "y" * pad}) for i in range(n_sample)]
    return rollups + samples


def append_ids(buffer: TelemetryBuffer, rows: list[Row]) -> list[int]:
    """The ids the rows got: one append's rows take consecutive ids after the last one."""
    before = buffer.last_id
    assert buffer.append(rows)
    return list(range(before + 1, before + 1 + len(rows)))


def test_budget_below_64_kib_is_refused(db_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes"):
        TelemetryBuffer(db_path, max_bytes=MIN_MAX_BYTES - 1)
    assert not db_path.exists()


def test_a_bad_row_raises_before_anything_is_written(open_buffer, db_path: Path) -> None:
    buffer = open_buffer()
    with pytest.raises(ValueError, match="class"):
        buffer.append([Row("event", "ok", {}), Row("debug", "x", {})])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="UTC"):
        buffer.append([Row("event", "ok", {}, time="2024-01-01T00:00:00+02:00")])
    assert rows_in(db_path) == []


def test_ids_are_never_reused_after_the_newest_rows_go(open_buffer, db_path: Path) -> None:
    buffer = open_buffer()
    ids = append_ids(buffer, interval(3, 2))
    assert buffer.acknowledge(ids[-2:])
    buffer.close()
    again = open_buffer()
    new = append_ids(again, interval(1, 0))
    assert new[0] > ids[-1]
    assert [r[0] for r in rows_in(db_path)] == ids[:-2] + new


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_a_fresh_file_starts_above_every_id_ever_issued(open_buffer, db_path: Path, damage) -> None:
    buffer = open_buffer()
    old = append_ids(buffer, interval(5, 5))
    buffer.close()
    if damage == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db_path}{suffix}").unlink(missing_ok=True)
    else:
        db_path.write_bytes(os.urandom(8192))
    again = open_buffer()
    new = append_ids(again, interval(1, 0))
    assert new[0] > old[-1]
    (reset,) = rows_in(db_path, "kind = 'buffer_reset'")
    assert reset[0] > old[-1]
    body = json.loads(reset[3])
    assert body["ids_issued_up_to"] >= old[-1]
    assert ("missing" in body["reason"]) == (damage == "deleted")


def _real_db_with_rows(open_buffer, db_path: Path) -> int:
    buffer = open_buffer()
    for _ in range(20):
        buffer.append(interval())
    last = buffer.last_id
    buffer.close()
    return last


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_file_is_moved_aside_and_reported(open_buffer, db_path: Path, damage) -> None:
    if damage == "garbage":
        last = 0
        db_path.write_bytes(os.urandom(64 * 1024))
        Path(f"{db_path}-wal").write_bytes(os.urandom(4096))
    else:
        last = _real_db_with_rows(open_buffer, db_path)
        with open(db_path, "r+b") as handle:
            handle.truncate(db_path.stat().st_size // 2)
    original = db_path.read_bytes()
    buffer = open_buffer()
    (moved,) = [p for p in db_path.parent.iterdir() if re.search(r"\.corrupt-\w+$", p.name)]
    assert re.fullmatch(r"telemetry\.db\.corrupt-\d{8}T\d{6}Z", moved.name)
    assert moved.read_bytes() == original
    if damage == "garbage":
        assert Path(f"{moved}-wal").stat().st_size == 4096
    (reset,) = rows_in(db_path, "kind = 'buffer_reset'")
    body = json.loads(reset[3])
    assert body["moved_aside"] == moved.name and body["reason"]
    assert reset[0] > last
    assert append_ids(buffer, interval(1, 1))[0] > reset[0]
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def _explained(path: Path, written: dict[int, str]) -> None:
    """Every id written is stored or inside a drop event of its class; counts are exact."""
    stored = {r[0] for r in rows_in(path)}
    drops = [json.loads(r[3]) for r in rows_in(path, "kind = 'drop'")]
    missing = {i: c for i, c in written.items() if i not in stored}
    for row_id, cls in missing.items():
        assert any(d["class"] == cls and d["first_id"] <= row_id <= d["last_id"] for d in drops)
    for cls in ("rollup", "sample"):
        counted = sum(d["count"] for d in drops if d["class"] == cls)
        assert counted == sum(1 for c in missing.values() if c == cls)
    assert "event" not in missing.values()
    assert all(d["class"] != "event" for d in drops)


def _disk_size(path: Path) -> int:
    return sum(
        Path(f"{path}{s}").stat().st_size
        for s in ("", "-wal", "-shm")
        if Path(f"{path}{s}").exists()
    )


@pytest.mark.parametrize("budget", [64 * 1024, 128 * 1024, 256 * 1024])
def test_the_budget_drops_by_class_and_reports_every_drop(
    open_buffer, db_path: Path, budget
) -> None:
    buffer = open_buffer(max_bytes=budget)
    written: dict[int, str] = {}
    rollups_dropped = 0
    for n in range(300):
        rows = interval(4, 3) + ([Row("event", "restart", {"n": n})] if n % 5 == 0 else [])
        before = buffer.last_id
        ids = append_ids(buffer, rows)
        written.update({i: r.cls for i, r in zip(ids, rows, strict=True)})
        if n % 20 == 0:
            assert buffer.maintain()
        assert db_path.stat().st_size <= budget
        assert _disk_size(db_path) <= budget + WAL_LIMIT_BYTES
        dropped = buffer.stats().dropped["rollup"]
        if dropped > rollups_dropped:  # rollups go only once no older sample is left
            assert rows_in(db_path, f"class = 'sample' AND id <= {before}") == []
        rollups_dropped = dropped
    stats = buffer.stats()
    assert stats.dropped["sample"] > 0 and stats.dropped["rollup"] > 0
    assert stats.dropped["event"] == 0
    _explained(db_path, written)
    drops = rows_in(db_path, "kind = 'drop'")
    assert len(drops) == 2  # unsent: merged into one event per class
    assert read_stats(db_path) == BufferStats(**{**stats.__dict__, "write_failures": 0})


def test_samples_are_thinned_before_anything_else_goes(open_buffer, db_path: Path) -> None:
    # Samples bigger than a page: each frees its own pages, so thinning alone makes room.
    buffer = open_buffer(max_bytes=256 * 1024)
    samples: list[int] = []
    rollups: list[int] = []
    while buffer.stats().dropped["sample"] == 0:
        rollups += append_ids(buffer, interval(2, 0))
        samples += append_ids(buffer, [Row("sample", "big", {"v": "z" * 1500})])
    survivors = [r[0] for r in rows_in(db_path, "class = 'sample'")]
    assert survivors == samples[0::2]
    assert buffer.stats().dropped["rollup"] == 0
    assert [r[0] for r in rows_in(db_path, "class = 'rollup'")] == rollups


def _fill_until_drop(buffer: TelemetryBuffer) -> None:
    start = buffer.stats().dropped["sample"]
    while buffer.stats().dropped["sample"] == start:
        buffer.append(interval(2, 4))


def test_drop_events_merge_while_unsent_and_never_after_upload(open_buffer, db_path: Path) -> None:
    buffer = open_buffer(max_bytes=128 * 1024)

    def sample_drops() -> list[tuple]:
        return rows_in(db_path, "kind = 'drop' AND body LIKE '%\"sample\"%'")

    def hand_out(event_id: int) -> None:
        assert event_id in [r.id for r in buffer.pending(1 << 20, buffer.last_id)]

    _fill_until_drop(buffer)
    _fill_until_drop(buffer)
    (first,) = sample_drops()  # two drops, one event while it is unsent
    assert json.loads(first[3])["count"] == buffer.stats().dropped["sample"]
    hand_out(first[0])  # handed to the uploader: never merged into, even before PUBACK
    _fill_until_drop(buffer)
    assert sample_drops()[0] == first
    (second,) = sample_drops()[1:]
    assert buffer.acknowledge([first[0]])
    _fill_until_drop(buffer)
    (merged,) = sample_drops()  # the second one was still unsent: merged
    assert merged[0] == second[0] and merged[3] != second[3]
    hand_out(merged[0])
    assert buffer.acknowledge([merged[0]])
    _fill_until_drop(buffer)
    (third,) = sample_drops()
    assert third[0] > merged[0]
    counts = [json.loads(r[3])["count"] for r in (first, merged, third)]
    assert sum(counts) == buffer.stats().dropped["sample"]


def test_pending_sends_live_rows_first_then_the_backlog_by_class(open_buffer) -> None:
    buffer = open_buffer()
    old = append_ids(
        buffer, [Row("sample", "s", {}), Row("rollup", "r", {}), Row("event", "e", {})]
    )
    old += append_ids(
        buffer, [Row("sample", "s", {}), Row("event", "e", {}), Row("rollup", "r", {})]
    )
    live_after = buffer.last_id
    live = append_ids(
        buffer, [Row("sample", "s", {}), Row("rollup", "r", {}), Row("event", "e", {})]
    )
    got = buffer.pending(1 << 20, live_after)
    assert [r.id for r in got] == [
        live[2],
        live[1],
        live[0],
        old[2],
        old[4],
        old[1],
        old[5],
        old[0],
        old[3],
    ]
    assert [r.cls for r in got[3:]] == ["event", "event", "rollup", "rollup", "sample", "sample"]
    # A byte bound: whole rows only, measured as the compact JSON the upload carries.
    sizes = [len(json.dumps(r.record(), separators=(",", ":")).encode()) for r in got]
    assert sizes == [r.wire_size for r in got]
    bounded = buffer.pending(sum(sizes[:4]) + 1, live_after)
    assert [r.id for r in bounded] == [r.id for r in got[:4]]
    assert [r.id for r in buffer.pending(1, live_after)] == [got[0].id]  # never stuck
    assert buffer.stats().last_upload is None
    assert buffer.acknowledge([r.id for r in bounded])
    after = buffer.stats()
    assert after.backlog_rows == 5 and after.last_upload is not None
    assert [r.id for r in buffer.pending(1 << 20, live_after)] == [r.id for r in got[4:]]


def test_stats_count_the_backlog(open_buffer) -> None:
    buffer = open_buffer()
    assert buffer.stats().backlog_rows == 0 and buffer.stats().oldest_unsent_time is None
    ids = append_ids(buffer, [Row("event", "e", {"a": 1}, time="2024-05-01T10:00:00Z")])
    append_ids(buffer, [Row("rollup", "r", {"bb": 22})])
    stats = buffer.stats()
    assert (stats.backlog_rows, stats.backlog_bytes) == (2, len('{"a":1}') + len('{"bb":22}'))
    assert stats.oldest_unsent_time == "2024-05-01T10:00:00.000Z"
    buffer.acknowledge(ids)
    assert buffer.stats().oldest_unsent_time != "2024-05-01T10:00:00.000Z"


def test_read_stats_without_a_daemon(open_buffer, db_path: Path, tmp_path: Path) -> None:
    missing = tmp_path / "none.db"
    assert read_stats(missing) is None and not missing.exists()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(os.urandom(8192))
    assert read_stats(garbage) is None
    buffer = open_buffer()
    append_ids(buffer, interval(2, 2))
    expected = buffer.stats()
    buffer.close()
    assert read_stats(db_path) == expected
    # Another process holding the file exclusively: None, not a hang or an exception.
    holder = sqlite3.connect(db_path, isolation_level=None)
    try:
        holder.execute("PRAGMA locking_mode = EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("DELETE FROM records WHERE id = 1")
        assert read_stats(db_path) is None
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert read_stats(db_path) == expected


CHILD = textwrap.dedent(
    """
    import sys
    from edgeserve.telemetry.buffer import TelemetryBuffer
    from edgeserve.telemetry.rows import Row
    buffer = TelemetryBuffer(sys.argv[1])
    rows = [Row("rollup", "r", {"i": i, "pad": "p" * 200}) for i in range(30)]
    while True:
        if buffer.append(rows):
            print(buffer.last_id, flush=True)
    """
)


def test_kill_9_during_heavy_writes_loses_no_committed_row(open_buffer, db_path: Path) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        reported = [int(child.stdout.readline()) for _ in range(200)]  # type: ignore[union-attr]
    finally:
        child.send_signal(signal.SIGKILL)
        rest, _ = child.communicate()
    reported += [int(line) for line in rest.split()]
    assert child.returncode == -signal.SIGKILL
    committed = max(reported)
    with sqlite3.connect(db_path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        count, top = conn.execute("SELECT COUNT(*), MAX(id) FROM records").fetchone()
        assert conn.execute(
            "SELECT COUNT(*) FROM records WHERE id <= ?", [committed]
        ).fetchone() == (committed,)
    assert top >= committed and count >= committed
    buffer = open_buffer()
    assert append_ids(buffer, interval(1, 0))[0] > top


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs: another writer can fill it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_full_disk_fails_soft_and_recovers(open_buffer, small_disk: Path) -> None:
    path = small_disk / "telemetry.db"
    buffer = open_buffer(path, max_bytes=256 * 1024)
    kept = append_ids(buffer, interval())
    assert buffer.maintain()  # the WAL is empty: the next write needs new space
    filler = small_disk / "other-writer"
    with open(filler, "wb", buffering=0) as handle:
        with pytest.raises(OSError, match="No space"):
            while True:
                handle.write(b"\0" * 4096)
    results = []
    for _ in range(50):
        before = buffer.last_id
        ok = buffer.append(interval())
        results.append(ok)
        if ok:
            kept += list(range(before + 1, buffer.last_id + 1))
        else:
            break
    assert results[-1] is False
    assert buffer.stats().write_failures == 1
    filler.unlink()
    assert buffer.append(interval())
    assert buffer.stats().write_failures == 1
    stored = {r[0] for r in rows_in(path)}
    assert set(kept) <= stored
    buffer.close()
    assert read_stats(path).write_failures == 1  # type: ignore[union-attr]
