"""`edgeserve predict` and `edgeserve demo` as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from tests.e2e.test_serve import _reference


def _edgeserve(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgeserve", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_predict_prints_the_served_outputs_as_json(
    daemons, mlp_archive_factory, mlp_source, tmp_path
):
    daemon = daemons.start(mlp_archive_factory("1"))
    x = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = _edgeserve(
        "predict",
        "mlp",
        "--input",
        f"x={tmp_path / 'x.npy'}",
        "--address",
        daemon.uds_address,
        "--json",
    )
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["model"] == "mlp" and doc["version"] == "1"
    served = np.array(doc["outputs"]["output__0"]["data"], dtype=np.float32)
    with torch.inference_mode():
        expected = _reference(mlp_source)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(served, expected, rtol=1e-5, atol=1e-5)


def test_predict_exit_codes(daemons, mlp_archive_factory, tmp_path):
    daemon = daemons.start(mlp_archive_factory("1"))
    np.save(tmp_path / "bad.npy", np.zeros((1, 15), dtype=np.float32))
    refused = _edgeserve(
        "predict", "mlp", "--input", str(tmp_path / "bad.npy"), "--address", daemon.tcp
    )
    assert refused.returncode == 1 and "INVALID_ARGUMENT" in refused.stderr
    assert "input 'x'" in refused.stderr
    missing = _edgeserve(
        "predict", "mlp", "--input", str(tmp_path / "nope.npy"), "--address", daemon.tcp
    )
    assert missing.returncode == 2 and "nope.npy" in missing.stderr
    assert daemon.terminate() == 0
    down = _edgeserve(
        "predict", "mlp", "--input", str(tmp_path / "bad.npy"), "--address", daemon.tcp, timeout=60
    )
    assert down.returncode == 3, down.stderr


def test_demo_runs_end_to_end_and_stops_cleanly(tmp_path: Path):
    out = _edgeserve("demo", "--state-dir", str(tmp_path / "demo"), "--requests", "20", timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "daemon ready in" in out.stdout
    assert "20 sequential requests over the Unix socket: p50" in out.stdout
    assert "daemon stopped cleanly (exit 0)" in out.stdout
