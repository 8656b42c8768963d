"""System sampler: sane figures for this very process, no torch import, GPU only when used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from edgeserve.telemetry.sampler import SystemSampler, sample


def _burn_cpu(seconds: float) -> None:
    """Spin until this process has used ``seconds`` more CPU time (deadline-bounded)."""
    process = psutil.Process()
    start = sum(process.cpu_times()[:2])
    deadline = time.monotonic() + 30
    while sum(process.cpu_times()[:2]) - start < seconds:
        sum(range(20_000))
        assert time.monotonic() < deadline, "could not get CPU time within 30 s"


def test_sample_describes_this_process(tmp_path: Path) -> None:
    sampler = SystemSampler(tmp_path)
    _burn_cpu(0.2)
    data = sampler.sample()
    process = data["process"]
    assert process["pid"] == os.getpid()
    rss = psutil.Process().memory_info().rss
    assert 0.5 * rss < process["rss_bytes"] < 2 * rss
    assert process["threads"] >= 1
    assert 5.0 < process["cpu_percent"] <= 100.0 * psutil.cpu_count()
    system = data["system"]
    assert 0 < system["memory_available_bytes"] <= system["memory_total_bytes"]
    assert 0.0 <= system["cpu_percent"] <= 100.0
    assert system["cpu_count"] == psutil.cpu_count()
    assert len(system["load_average"]) == 3
    disk = data["disk"]
    assert disk["path"] == str(tmp_path)
    assert 0 < disk["free_bytes"] <= disk["total_bytes"]
    assert json.loads(json.dumps(data)) == data


def test_temperatures_are_well_formed_where_present(tmp_path: Path) -> None:
    for reading in SystemSampler(tmp_path).sample()["temperatures"]:
        assert isinstance(reading["sensor"], str) and isinstance(reading["label"], str)
        assert -50.0 < reading["celsius"] < 150.0


def test_one_shot_sample_has_no_cpu_percent(tmp_path: Path) -> None:
    data = sample(tmp_path)
    assert data["process"]["cpu_percent"] is None
    assert data["system"]["cpu_percent"] is None
    assert data["process"]["rss_bytes"] > 0 and data["disk"]["free_bytes"] > 0


def test_missing_state_dir_gives_no_disk_figures(tmp_path: Path) -> None:
    assert sample(tmp_path / "absent")["disk"] is None


def test_sampler_never_imports_torch(tmp_path: Path) -> None:
    code = (
        "import sys; from pathlib import Path\n"
        "from edgeserve.telemetry.sampler import SystemSampler\n"
        f"data = SystemSampler(Path({str(tmp_path)!r})).sample()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert data['gpus'] == []\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr


def test_no_gpu_figures_without_cuda_in_use(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        pytest.skip("CUDA is in use in this process")
    assert SystemSampler(tmp_path).sample()["gpus"] == []


@pytest.mark.gpu
def test_gpu_memory_when_cuda_is_in_use(tmp_path: Path) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    block = torch.empty(64 * 1024 * 1024, dtype=torch.uint8, device="cuda")
    gpus = SystemSampler(tmp_path).sample()["gpus"]
    current = gpus[torch.cuda.current_device()]
    assert current["memory_allocated_bytes"] >= block.numel()
    assert 0 < current["memory_free_bytes"] < current["memory_total_bytes"]
    del block
