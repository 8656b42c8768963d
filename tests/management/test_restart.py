"""A restart (clean stop, or kill -9) comes back to the same models, versions, defaults
and settings, as persisted by the lifecycle after each management change."""

from __future__ import annotations

import numpy as np
import pytest

from tests.management.conftest import drop_in

_VOLATILE = ("loaded_at", "load_seconds", "in_flight")


def _stable(models: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k not in _VOLATILE} for m in models]


@pytest.mark.parametrize("stop", ["sigterm", "kill -9"])
def test_restart_restores_models_versions_defaults_and_settings(
    mdaemons, mlp_archive_factory, client_of, stop
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)
    v2 = drop_in(daemon, mlp_archive_factory("2"))
    client.load(
        archive=str(v2),
        make_default=True,
        settings={"max_batch_size": 4, "max_queue_delay_ms": 0.5},
    )
    client.scale("mlp", "1", {"instances": 2, "max_queue_size": 64})
    other = drop_in(daemon, mlp_archive_factory("3", name="other"))
    client.load(archive=str(other), settings={"instances": 2})
    before = _stable(client.list_models())
    assert [(m["name"], m["version"], m["default"]) for m in before] == [
        ("mlp", "1", False),
        ("mlp", "2", True),
        ("other", "3", True),
    ]

    if stop == "sigterm":
        assert daemon.terminate() == 0, daemon.log()
    else:
        daemon.process.kill()
        daemon.process.wait(timeout=30)

    again = mdaemons.start(state_dir=daemon.state_dir)  # no --model: only what was live
    assert _stable(client_of(again).list_models()) == before
    with again.client() as inference:
        served, _ = inference.infer("mlp", {"x": np.ones((1, 16), dtype=np.float32)})
    assert served == "2"
