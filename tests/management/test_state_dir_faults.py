"""A full or read-only state dir: every lifecycle change persists first, then changes
memory (issue 10, findings 4 and 5).

Real daemons on a real tmpfs (root): filled by ``dd``, then remounted read-only. Each
change (default, unload, scale, load) is refused with the precise code, and memory,
``live.json`` and what is served stay as they were; once space is back, the same
changes go through. A daemon started on a read-only state dir serves what is persisted
and configured, DEGRADED, and refuses changes with FAILED_PRECONDITION.
"""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import numpy as np
import pytest

from edgeserve.api.client import ClientError
from edgeserve.api.management_client import ManagementClient
from tests.management.conftest import drop_in, management_address
from tests.management.faults_support import fill, remount, start, tmpfs

X = np.ones((1, 16), dtype=np.float32)


def _served(daemon, version: str = "") -> str:
    with daemon.client() as client:
        return client.infer("mlp", {"x": X}, version=version)[0]


def _live(daemon) -> list[tuple[str, str, bool]]:
    document = json.loads((daemon.state_dir / "live.json").read_text())
    return sorted((m["name"], m["version"], m["default"]) for m in document["models"])


def _models(client: ManagementClient) -> list[tuple[str, str, bool, int]]:
    return sorted(
        (m["name"], m["version"], m["default"], m["settings"]["max_batch_size"])
        for m in client.list_models()
    )


def _refused(code: grpc.StatusCode, text: str, call, *args, **kwargs) -> None:
    with pytest.raises(ClientError) as caught:
        call(*args, **kwargs)
    assert caught.value.code == code, caught.value
    assert text in caught.value.message, caught.value.message


def _every_change_refused(daemon, client: ManagementClient, code, text: str) -> None:
    """Default, unload, scale and load are refused; memory, live.json and serving as before."""
    models, live = _models(client), _live(daemon)
    _refused(code, text, client.set_default, "mlp", "2")
    _refused(code, text, client.unload, "mlp", "1")
    _refused(code, text, client.scale, "mlp", "1", {"max_batch_size": 2})
    _refused(code, text, client.load, stored=("mlp", "3"))
    assert _models(client) == models and _live(daemon) == live
    assert _served(daemon) == "1" and _served(daemon, "2") == "2"


@pytest.mark.slow
def test_a_full_then_read_only_state_dir_changes_nothing(
    daemons, mlp_archive_factory, tmp_path: Path
) -> None:
    with tmpfs(tmp_path / "state") as state:
        # No telemetry buffer: a file open for writing keeps a mount from going read-only.
        sections = {"telemetry": {"enabled": False}}
        home = tmp_path / "home"
        daemon = start(
            daemons, mlp_archive_factory("1"), state_dir=state, home=home, sections=sections
        )
        with ManagementClient(management_address(daemon), timeout=60) as client:
            for version in ("2", "3"):
                client.load(archive=str(drop_in(daemon, mlp_archive_factory(version))))
            client.unload("mlp", "3")  # stays in the store: loadable without writing
            assert _models(client) == [("mlp", "1", True, 8), ("mlp", "2", False, 8)]

            filler = fill(state)
            full = grpc.StatusCode.RESOURCE_EXHAUSTED
            _every_change_refused(daemon, client, full, "state dir full")

            filler.unlink()
            remount(state, "ro")
            read_only = grpc.StatusCode.FAILED_PRECONDITION
            _every_change_refused(daemon, client, read_only, "state dir read-only")

            remount(state, "rw")  # the same changes go through again
            client.set_default("mlp", "2")
            client.unload("mlp", "1")
            client.scale("mlp", "2", {"max_batch_size": 2})
            client.load(stored=("mlp", "3"))
            assert _models(client) == [("mlp", "2", True, 2), ("mlp", "3", False, 8)]
            assert _live(daemon) == [("mlp", "2", True), ("mlp", "3", False)]
            assert _served(daemon) == "2"
        assert daemon.terminate() == 0
        assert "Traceback" not in daemon.log()


@pytest.mark.slow
def test_a_daemon_started_on_a_read_only_state_dir_serves_degraded(
    daemons, mlp_archive_factory, tmp_path: Path
) -> None:
    archive = mlp_archive_factory("1")
    with tmpfs(tmp_path / "state") as state:
        first = start(daemons, archive, state_dir=state, home=tmp_path / "first")
        assert first.terminate() == 0
        remount(state, "ro")
        daemon = start(daemons, archive, state_dir=state, home=tmp_path / "home")
        assert _served(daemon) == "1"
        with ManagementClient(management_address(daemon), timeout=60) as client:
            document = client.status()
            assert document["health"] == "degraded"
            assert any("is read-only" in p for p in document["problems"]), document["problems"]
            _refused(
                grpc.StatusCode.FAILED_PRECONDITION,
                "state dir read-only",
                client.scale,
                "mlp",
                "1",
                {"max_batch_size": 2},
            )
        assert _served(daemon) == "1"
        assert daemon.terminate() == 0
        assert "Traceback" not in daemon.log()
