"""A daemon starts degraded rather than not at all (issue 10, findings 6 and 7).

Real daemons: a garbage ``live.json`` (nested far deeper than any live set) is moved
aside byte for byte, the configured model loads and serves, the daemon is ready and
``edgeserve status`` says DEGRADED with the reason, in the table and in ``--json``; the
temporary files of live-set writes that a kill -9 cut short are removed at start (only
our own pattern).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.management.conftest import management_address, run_cli

X = np.ones((1, 16), dtype=np.float32)
GARBAGE = b"[" * 200_000 + b"\n"  # a RecursionError for an unbounded parser


def _status(daemon, *extra: str):
    return run_cli("status", "--management", management_address(daemon), *extra)


def test_a_corrupt_live_set_is_moved_aside_and_the_configured_model_serves(
    mdaemons, mlp_archive_factory, tmp_path: Path
) -> None:
    archive = mlp_archive_factory("1")
    state = tmp_path / "state"
    first = mdaemons.start(archive, state_dir=state)
    assert first.terminate() == 0
    live = state / "live.json"
    live.write_bytes(GARBAGE)

    daemon = mdaemons.start(archive, state_dir=state)
    with daemon.client() as client:
        assert client.server_ready()
        assert client.infer("mlp", {"x": X})[0] == "1"
    [aside] = state.glob("live.json.corrupt-*")
    assert aside.read_bytes() == GARBAGE, "the corrupt file is kept as it was"
    rewritten = json.loads(live.read_text())
    assert [(m["name"], m["version"]) for m in rewritten["models"]] == [("mlp", "1")]

    table = _status(daemon)
    assert table.returncode == 1, table.stdout + table.stderr
    assert "health: DEGRADED" in table.stdout
    assert f"moved aside to {aside}" in table.stdout and "nested deeper" in table.stdout
    document = json.loads(_status(daemon, "--json").stdout)
    assert document["health"] == "degraded"
    assert any(f"moved aside to {aside}" in p for p in document["problems"])
    assert daemon.terminate() == 0
    assert "Traceback" not in daemon.log()


def test_leftovers_of_interrupted_live_set_writes_are_removed_at_start(
    mdaemons, mlp_archive_factory, tmp_path: Path
) -> None:
    archive = mlp_archive_factory("1")
    state = tmp_path / "state"
    first = mdaemons.start(archive, state_dir=state)
    assert first.terminate() == 0
    ours = [state / f".live.json.{n:012x}.tmp" for n in (0xA1B2C3D4E5F6, 0x0123456789AB)]
    for path in ours:
        path.write_bytes(b'{"schema": 1, "mod')  # a write cut short
    theirs = [state / ".live.json.not-ours.tmp", state / "notes.tmp", state / ".live.json.tmp"]
    for path in theirs:
        path.write_bytes(b"someone else's")

    daemon = mdaemons.start(archive, state_dir=state)
    assert not [p for p in ours if p.exists()]
    assert all(p.read_bytes() == b"someone else's" for p in theirs)
    log = daemon.log()
    assert all(f"removed an interrupted live-set write {p.name}" in log for p in ours)
    with daemon.client() as client:
        assert client.infer("mlp", {"x": X})[0] == "1"
    assert daemon.terminate() == 0
