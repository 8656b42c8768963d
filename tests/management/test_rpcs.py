"""Every management RPC against a real daemon: through the stub, then through the CLI."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edgeserve.api.client import ClientError
from tests.management.conftest import drop_in, management_address, run_cli

X = np.ones((1, 16), dtype=np.float32)


def _served_version(daemon, version: str = "") -> str:
    with daemon.client() as client:
        served, outputs = client.infer("mlp", {"x": X}, version=version)
    assert outputs["output__0"].shape == (1, 4)
    return served


def test_every_rpc_through_the_stub(mdaemons, mlp_archive_factory, client_of):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)

    [v1] = client.list_models()
    assert (v1["name"], v1["version"], v1["state"], v1["default"]) == ("mlp", "1", "READY", True)
    assert v1["settings"]["max_batch_size"] == 8 and v1["device"] == "cpu"

    described = client.describe("mlp")
    assert described["default_version"] == "1"
    [only] = described["versions"]
    assert only["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}]
    assert only["outputs"][0]["name"] == "output__0"

    archive = drop_in(daemon, mlp_archive_factory("2"))
    loaded = client.load(archive=str(archive), settings={"max_batch_size": 4})
    assert (loaded["version"], loaded["default"], loaded["state"]) == ("2", False, "READY")
    assert loaded["settings"]["max_batch_size"] == 4
    assert _served_version(daemon) == "1" and _served_version(daemon, "2") == "2"

    flipped = client.set_default("mlp", "2")
    assert flipped["previous_default"] == "1" and flipped["default"]
    assert _served_version(daemon) == "2"

    scaled = client.scale("mlp", "2", {"instances": 2, "max_queue_delay_ms": 0.5})
    assert scaled["instances"] == 2 and scaled["settings"]["max_queue_delay_ms"] == 0.5
    assert scaled["settings"]["max_batch_size"] == 4, "scale keeps the other settings"
    assert _served_version(daemon) == "2"

    assert client.unload("mlp", "1")["default_version"] == "2"
    assert [m["version"] for m in client.list_models()] == ["2"]
    with pytest.raises(Exception, match="NOT_FOUND"):
        _served_version(daemon, "1")

    again = client.load(stored=("mlp", "1"))  # already in the store: no archive needed
    assert (again["version"], again["default"]) == ("1", False)
    assert client.describe("mlp", "1")["versions"][0]["version"] == "1"

    status = client.status()
    assert status["health"] == "healthy", status["problems"]
    assert status["daemon"]["up"] and status["daemon"]["ready"]
    assert [(m["version"], m["default"]) for m in status["models"]] == [("1", False), ("2", True)]
    assert status["system"]["process"]["rss_bytes"] > 0


REFUSED = [
    (lambda c: c.describe("nope"), "NOT_FOUND", "'nope'"),
    (lambda c: c.unload("mlp", "9"), "NOT_FOUND", "'9'"),
    (lambda c: c.set_default("mlp", "9"), "NOT_FOUND", "'9'"),
    (lambda c: c.load(stored=("mlp", "9")), "NOT_FOUND", "'9'"),
    (lambda c: c.load(stored=("mlp", "1")), "FAILED_PRECONDITION", "already live"),
    (lambda c: c.scale("mlp", "1", {"instances": 0}), "INVALID_ARGUMENT", "instances"),
    (lambda c: c.scale("mlp", "1", {"device": "tpu"}), "INVALID_ARGUMENT", "settings.device"),
    (lambda c: c.scale("mlp", "1", {}), "INVALID_ARGUMENT", "no setting"),
    (lambda c: c.load(archive="missing.esar"), "NOT_FOUND", "missing.esar"),
]


def test_refused_calls_name_the_fault_and_change_nothing(mdaemons, mlp_archive_factory, client_of):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    client = client_of(daemon)
    before = client.list_models()
    for i, (call, code, words) in enumerate(REFUSED):
        with pytest.raises(ClientError) as caught:
            call(client)
        assert caught.value.code == getattr(grpc.StatusCode, code), (i, caught.value)
        assert words in caught.value.message, (i, caught.value)
        assert client.list_models() == before, i
    assert _served_version(daemon) == "1"


def _cli_json(*args: str, env=None) -> Any:
    done = run_cli(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_command_through_the_cli(mdaemons, mlp_archive_factory):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    at = ("--management", management_address(daemon))

    [v1] = _cli_json("models", "list", *at)
    assert (v1["version"], v1["default"]) == ("1", True)
    table = run_cli("models", "list", *at)
    assert table.returncode == 0 and "mlp" in table.stdout and "READY" in table.stdout

    described = _cli_json("models", "describe", "mlp", "1", *at)
    assert described["versions"][0]["inputs"][0]["shape"] == [-1, 16]

    assert described["versions"][0]["quantization"] is None  # fp32
    archive = drop_in(daemon, mlp_archive_factory("2", quantize="dynamic"))
    # A bare name is looked up in the daemon's archive_dir.
    loaded = _cli_json("models", "load", archive.name, "--default", "--max-batch-size", "4", *at)
    assert (loaded["version"], loaded["default"]) == ("2", True)
    assert _served_version(daemon) == "2"
    # The archive's quantization is a JSON object, not a Python repr.
    assert (
        loaded["quantization"]["mode"] == "dynamic" and loaded["quantization"]["dtype"] == "qint8"
    )

    back = _cli_json("models", "default", "mlp", "1", *at)
    assert back["previous_default"] == "2" and back["version"] == "1"
    scaled = _cli_json("models", "scale", "mlp", "--instances", "2", "--max-queue-delay", "1", *at)
    assert (scaled["version"], scaled["instances"]) == ("1", 2), "no VERSION: the default one"
    assert scaled["settings"]["max_queue_delay_ms"] == 1.0

    human = run_cli("models", "unload", "mlp", "2", *at)
    assert human.returncode == 0 and "unloaded mlp version 2" in human.stdout

    status = run_cli("status", *at)
    assert status.returncode == 0, status.stdout + status.stderr
    assert "daemon up" in status.stdout and "mlp" in status.stdout


def test_cli_finds_the_daemon_through_env_and_config(mdaemons, mlp_archive_factory):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    env = dict(os.environ, EDGESERVE_MANAGEMENT=management_address(daemon))
    assert [m["version"] for m in _cli_json("models", "list", env=env)] == ["1"]
    env = {k: v for k, v in os.environ.items() if k != "EDGESERVE_MANAGEMENT"}
    listed = _cli_json("models", "list", "--config", str(daemon.config), env=env)
    assert [m["version"] for m in listed] == ["1"]


def test_cli_exit_codes_for_refusals(mdaemons, mlp_archive_factory, tmp_path):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    at = ("--management", management_address(daemon))
    missing = run_cli("models", "unload", "mlp", "7", *at)
    assert missing.returncode == 1 and "'7'" in missing.stderr
    bad = run_cli("models", "scale", "mlp", "1", "--instances", "0", *at)
    assert bad.returncode == 2 and "settings.instances" in bad.stderr
    usage = run_cli("models", "scale", "mlp", *at)
    assert usage.returncode == 2 and "--instances" in usage.stderr
    gone = run_cli("models", "list", "--management", f"unix://{tmp_path}/none.sock")
    assert gone.returncode == 3 and "not reachable" in gone.stderr


def test_serve_management_flag_sets_the_socket(mdaemons, mlp_archive_factory):
    folder = Path(tempfile.mkdtemp(prefix="esm-"))  # short: sun_path is 108 bytes
    try:
        sock = folder / "m.sock"
        daemon = mdaemons.start(mlp_archive_factory("1"), args=("--management", f"unix://{sock}"))
        assert not (daemon.run_dir / "management.sock").exists()
        assert oct(sock.stat().st_mode & 0o777) == oct(0o660)
        listed = _cli_json("models", "list", "--management", f"unix://{sock}")
        assert [m["version"] for m in listed] == ["1"]
        assert daemon.terminate() == 0
        assert not sock.exists(), "the socket is removed on a clean stop"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


CORRUPT = b"\x0a\xff\xff\xff\xff\x0f"  # a length-delimited field that runs past the end


@pytest.mark.parametrize("method", ["LoadModel", "UploadModel"])
def test_a_malformed_message_is_invalid_argument_and_changes_nothing(
    mdaemons, mlp_archive_factory, client_of, method
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    path = f"/edgeserve.v1.Management/{method}"
    with grpc.insecure_channel(management_address(daemon)) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            if method == "UploadModel":
                channel.stream_unary(path)(iter([CORRUPT]), timeout=30)
            else:
                channel.unary_unary(path)(CORRUPT, timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "not a valid protobuf message" in caught.value.details()
    assert [m["version"] for m in client_of(daemon).list_models()] == ["1"]
    assert _served_version(daemon) == "1"
