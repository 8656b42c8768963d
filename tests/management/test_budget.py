"""A load that would exceed runtime.memory_budget_mb is refused up front; nothing changes."""

from __future__ import annotations

import grpc
import pytest

from edgeserve.api.client import ClientError
from tests.management.conftest import drop_in, management_address, run_cli


def test_memory_budget_refuses_a_load_and_leaves_the_registry(
    mdaemons, mlp_archive_factory, client_of
):
    daemon = mdaemons.start(runtime={"memory_budget_mb": 1})  # far below the daemon's RSS
    client = client_of(daemon)
    archive = drop_in(daemon, mlp_archive_factory("1"))
    assert client.list_models() == []

    with pytest.raises(ClientError) as caught:
        client.load(archive=str(archive), make_default=True)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "budget" in caught.value.message and "runtime.memory_budget_mb" in caught.value.message
    assert "'mlp' version '1'" in caught.value.message
    assert client.list_models() == []

    refused = run_cli("models", "load", str(archive), "--management", management_address(daemon))
    assert refused.returncode == 1 and "runtime.memory_budget_mb" in refused.stderr
    assert client.list_models() == []
    assert client.status()["models"] == []
