"""End to end: package -> `edgeserve serve` in a child process -> stock clients -> SIGTERM."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from tests.cli.support import package
from tests.conftest import SLOW_HANDLER_SOURCE


def _reference(mlp_source: Path, quantize: bool = False) -> torch.nn.Module:
    spec = importlib.util.spec_from_file_location("mlp_ref", mlp_source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.build()
    if quantize:
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    return model


def _triton_infer(url: str, model: str, x: np.ndarray, version: str = ""):
    with triton.InferenceServerClient(url=url) as client:
        inp = triton.InferInput("x", list(x.shape), "FP32")
        inp.set_data_from_numpy(x)
        return client.infer(model, [inp], model_version=version)


def test_fp32_outputs_equal_in_process_torch(daemons, mlp_archive_factory, mlp_source):
    daemon = daemons.start(mlp_archive_factory("1"))
    x = np.random.default_rng(7).standard_normal((3, 16)).astype(np.float32)
    result = _triton_infer(daemon.tcp, "mlp", x)
    served = result.as_numpy("output__0")
    with torch.inference_mode():
        expected = _reference(mlp_source)(torch.from_numpy(x)).numpy()
    assert served.shape == (3, 4)
    # Equal up to float32 rounding (the daemon may use other intra-op threads than we do).
    np.testing.assert_allclose(served, expected, rtol=1.3e-6, atol=1e-5)
    assert result.get_response().model_version == "1"


def test_int8_outputs_within_tolerance_of_fp32(daemons, mlp_archive_factory, mlp_source):
    daemon = daemons.start(mlp_archive_factory("1", quantize="dynamic"))
    x = np.random.default_rng(8).standard_normal((4, 16)).astype(np.float32)
    served = _triton_infer(daemon.tcp, "mlp", x).as_numpy("output__0")
    with torch.inference_mode():
        fp32 = _reference(mlp_source)(torch.from_numpy(x)).numpy()
        int8 = _reference(mlp_source, quantize=True)(torch.from_numpy(x)).numpy()
    # Served int8 matches in-process int8 closely, and fp32 within quantization error.
    np.testing.assert_allclose(served, int8, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(served, fp32, rtol=0.1, atol=0.05)
    assert not np.allclose(served, fp32, rtol=0, atol=1e-7), "int8 served exactly fp32?"


def test_unix_socket_serves_the_same_model(daemons, mlp_archive_factory):
    daemon = daemons.start(mlp_archive_factory("1"))
    x = np.ones((1, 16), dtype=np.float32)
    with (
        daemon.client() as tcp_client,
        __import__("edgeserve.api.client", fromlist=["InferenceClient"]).InferenceClient(
            daemon.uds_address
        ) as uds_client,
    ):
        _, over_tcp = tcp_client.infer("mlp", {"x": x})
        _, over_uds = uds_client.infer("mlp", {"x": x})
    np.testing.assert_array_equal(over_tcp["output__0"], over_uds["output__0"])
    assert oct(daemon.uds.stat().st_mode & 0o777) == oct(0o660)


def test_sigterm_drains_requests_in_flight(daemons, mlp_archive_factory, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    handler = tmp_path / "slow_handler.py"
    handler.write_text(SLOW_HANDLER_SOURCE)
    archive = mlp_archive_factory(
        "1",
        handler=str(handler),
        name="slow",
        handler_config={"sleep_s": 1.5, "marker_dir": str(markers)},
    )
    # Three instances of batch 1 (config beats the archive's 8): each request starts on
    # its own instance and drops a marker file when it reaches the model.
    daemon = daemons.start(archive, extra_config="batching:\n  instances: 3\n  max_batch_size: 1\n")
    x = np.ones((1, 16), dtype=np.float32)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(_triton_infer(daemon.tcp, "slow", x).as_numpy("output__0"))
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(3)]
    warmups = len(list(markers.iterdir()))  # warm-up ran the handler too
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(list(markers.iterdir())) < warmups + 3:
        assert time.monotonic() < deadline, f"requests never reached the model:\n{daemon.log()}"
        time.sleep(0.01)
    code = daemon.terminate()
    for t in threads:
        t.join(30)
    assert code == 0, daemon.log()
    assert len(results) == 3
    assert all(isinstance(r, np.ndarray) and r.shape == (1, 4) for r in results), results
    with pytest.raises(triton.InferenceServerException):
        _triton_infer(daemon.tcp, "slow", x)


def test_restart_comes_back_with_the_same_models(daemons, mlp_archive_factory):
    daemon = daemons.start(mlp_archive_factory("1"))
    assert daemon.terminate() == 0
    again = daemons.start(state_dir=daemon.state_dir)
    version, _ = again.client().infer("mlp", {"x": np.ones((1, 16), dtype=np.float32)})
    assert version == "1"


def test_unsigned_archive_is_refused(daemons, mlp_source, mlp_example, tmp_path):
    unsigned = tmp_path / "unsigned.esar"
    package(  # `edgeserve package` without --sign-key
        f"{mlp_source}:build",
        name="mlp",
        version="1",
        output=unsigned,
        example_inputs=[("x", mlp_example)],
    )
    daemon = daemons.start(unsigned, wait=False)
    code = daemon.process.wait(timeout=60)
    assert code != 0
    assert "not signed" in daemon.log()
    assert not (daemon.state_dir / "models" / "mlp").exists()


def test_config_error_names_the_key_and_exits_2(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("server:\n  grace_period_s: -1\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "edgeserve",
            "serve",
            "--config",
            str(config),
            "--state-dir",
            str(tmp_path / "s"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    assert "server.grace_period_s" in proc.stderr


def test_configured_model_without_version_gets_the_newest_stored(daemons, mlp_archive_factory):
    daemon = daemons.start(mlp_archive_factory("1"), mlp_archive_factory("2"))
    assert daemon.terminate() == 0
    (daemon.state_dir / "live.json").unlink()  # forget what was live: only the config counts
    again = daemons.start(
        state_dir=daemon.state_dir, extra_config="models:\n  - name: mlp\n    default: true\n"
    )
    version, _ = again.client().infer("mlp", {"x": np.ones((1, 16), dtype=np.float32)})
    assert version == "2"


def test_a_model_that_fails_to_restore_is_not_forgotten(daemons, mlp_archive_factory):
    import json

    daemon = daemons.start(mlp_archive_factory("1"), mlp_archive_factory("2", name="other"))
    assert daemon.terminate() == 0
    # Damage one stored model: its restore fails verification at the next start.
    stored = daemon.state_dir / "models" / "other" / "2" / "model.pt"
    stored.write_bytes(stored.read_bytes() + b"tampered")
    again = daemons.start(state_dir=daemon.state_dir)
    version, _ = again.client().infer("mlp", {"x": np.ones((1, 16), dtype=np.float32)})
    assert version == "1"
    assert again.terminate() == 0
    live = json.loads((daemon.state_dir / "live.json").read_text())
    assert {(m["name"], m["version"]) for m in live["models"]} == {("mlp", "1"), ("other", "2")}


def test_a_cancelled_unload_still_finishes_and_is_persisted(daemons, mlp_archive_factory, tmp_path):
    import json

    from edgeserve.api.client import ClientError
    from edgeserve.api.management_client import ManagementClient

    markers = tmp_path / "markers"
    markers.mkdir()
    handler = tmp_path / "slow_handler.py"
    handler.write_text(SLOW_HANDLER_SOURCE)
    config = {"sleep_s": 2.0, "marker_dir": str(markers)}
    v1 = mlp_archive_factory("1", handler=str(handler), name="slow", handler_config=config)
    v2 = mlp_archive_factory("2", handler=str(handler), name="slow", handler_config=config)
    daemon = daemons.start(v1, v2)
    before = len(list(markers.iterdir()))
    x = np.ones((1, 16), dtype=np.float32)
    result: list[object] = []
    caller = threading.Thread(
        target=lambda: result.append(_triton_infer(daemon.tcp, "slow", x, "1"))
    )
    caller.start()
    deadline = time.monotonic() + 30
    while len(list(markers.iterdir())) == before:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.01)
    # The unload waits for the request in flight (2 s); its caller gives up after 0.3 s.
    with ManagementClient(f"unix://{daemon.run_dir / 'management.sock'}", timeout=0.3) as m:
        with pytest.raises(ClientError):
            m.unload("slow", "1")
    caller.join(30)
    assert result and not isinstance(result[0], Exception)
    live_path = daemon.state_dir / "live.json"
    deadline = time.monotonic() + 30
    while {m["version"] for m in json.loads(live_path.read_text())["models"]} != {"2"}:
        assert time.monotonic() < deadline, live_path.read_text()
        time.sleep(0.05)
    with ManagementClient(f"unix://{daemon.run_dir / 'management.sock'}") as m:
        assert [(v["name"], v["version"]) for v in m.list_models()] == [("slow", "2")]
    assert daemon.terminate() == 0
    assert "unloaded slow/1" in daemon.log()


def test_sigterm_during_startup_stops_between_model_loads(daemons, mlp_archive_factory, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    handler = tmp_path / "slow_handler.py"
    handler.write_text(SLOW_HANDLER_SOURCE)
    config = {"sleep_s": 3.0, "marker_dir": str(markers)}
    archives = [
        mlp_archive_factory(v, handler=str(handler), name=f"slow{v}", handler_config=config)
        for v in ("1", "2", "3")
    ]
    packaged = len(list(markers.iterdir()))
    daemon = daemons.start(*archives, wait=False)
    deadline = time.monotonic() + 60
    while len(list(markers.iterdir())) == packaged:  # the first warm-up has begun
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.01)
    started = time.monotonic()
    assert daemon.terminate(timeout=30) == 0, daemon.log()
    # Loading all three takes 18 s or more (warm-up and thread probe, 3 s each per model).
    assert time.monotonic() - started < 12, daemon.log()
    assert daemon.log().count('"event":"loaded slow') <= 1
    assert "serving inference" not in daemon.log()


def test_sighup_loads_added_models_and_leaves_unloaded_ones_alone(daemons, mlp_archive_factory):
    import signal

    from edgeserve.api.client import ClientError
    from edgeserve.api.management_client import ManagementClient

    first, added = mlp_archive_factory("1"), mlp_archive_factory("2", name="other")
    entry = "  - archive: {}\n    default: true\n"
    daemon = daemons.start(extra_config="models:\n" + entry.format(first))
    x = {"x": np.ones((1, 16), dtype=np.float32)}
    with ManagementClient(f"unix://{daemon.run_dir / 'management.sock'}") as m:
        m.unload("mlp", "1")
    daemon.config.write_text(daemon.config.read_text() + entry.format(added))
    daemon.process.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    with daemon.client() as client:
        while True:
            try:
                version, _ = client.infer("other", x)
                break
            except ClientError:
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.05)
        assert version == "2"
        with pytest.raises(ClientError, match="NOT_FOUND"):
            client.infer("mlp", x)
    assert daemon.terminate() == 0
