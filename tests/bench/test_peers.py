"""The parts of ``--peers torchserve`` and of the new per-case figures that run without
TorchServe: the handler TorchServe's worker loads (run here on a real TorchScript model),
the peer cells and their targets, the model's CPU subtracted from the server's, and the
pinning of the scaling curve. The TorchServe run itself is optional (not in CI)."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from bench.cases import all_cases, pinned, select
from bench.catalog import read_counters, reset_counters
from bench.report import peer_table, summarize_repeats
from bench.server import Server
from bench.targets import model_cpu_us, net_cpu_us, torchserve_best


def _context(model_dir: Path) -> SimpleNamespace:
    return SimpleNamespace(
        system_properties={"model_dir": str(model_dir)},
        manifest={"model": {"serializedFile": "model.pt"}},
    )


def test_the_torchserve_handler_answers_each_row_with_its_raw_output(tmp_path: Path) -> None:
    torch.manual_seed(0)
    module = torch.jit.script(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 3)))
    module.save(str(tmp_path / "model.pt"))
    counter = tmp_path / "counter.bin"
    reset_counters(counter)
    peer = {"row_shape": [2, 3], "counter_file": str(counter)}
    (tmp_path / "peer.json").write_text(json.dumps(peer))
    handler = importlib.reload(importlib.import_module("bench.torchserve_handler"))
    assert handler.handle(None, _context(tmp_path)) is None  # TorchServe's initialize call
    rows = np.random.default_rng(1).standard_normal((3, 6)).astype(np.float32)
    replies = handler.handle(
        [
            {"data": bytearray(rows[0].tobytes())},
            {"body": rows[1].tobytes()},
            {"data": rows[2].tobytes()},
        ],
        None,
    )
    with torch.inference_mode():
        expected = module(torch.from_numpy(rows).reshape(3, 2, 3)).numpy()
    got = np.stack([np.frombuffer(r, np.float32) for r in replies])
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    handler.handle([{"data": rows[0].tobytes()}], None)
    assert read_counters(counter) == (2, 4)  # two batches, four rows


def test_peer_cells_are_opt_in_and_interleaved_level_by_level() -> None:
    assert not any(
        c.name.startswith(("ts-", "mlp-peer", "cnn-peer")) for c in select(all_cases(), None)
    )
    names = [c.name for c in select(all_cases(), "peers")]
    assert names[:4] == ["echo-tcp-c1", "echo-tcp-c32", "mlp-peer-tcp-c1", "ts-mlp-b32-tcp-c1"]
    c1 = [n for n in names if n.endswith("-c1") and not n.startswith("echo")]
    assert c1 == [
        "mlp-peer-tcp-c1", "ts-mlp-b32-tcp-c1", "ts-mlp-nb-tcp-c1",
        "cnn-peer-tcp-c1", "ts-cnn-b32-tcp-c1", "ts-cnn-nb-tcp-c1",
    ]  # fmt: skip
    assert names.index("ts-cnn-nb-tcp-c1") < names.index("mlp-peer-tcp-c32")
    cpus = len(os.sched_getaffinity(0))
    wanted = [n for n in (1, 2, 4, 8) if n <= cpus]
    assert [c.cpus for c in select(all_cases(), "scaling")] == wanted


def _raw(cpu_ms: dict[int, float]) -> dict[str, object]:
    sweep = {
        str(b): {"call_ms": ms, "cpu_ms": ms, "samples_per_s": b / ms * 1e3}
        for b, ms in cpu_ms.items()
    }
    return {"sweep": sweep, "best_throughput": 1000.0, "batch1": {"p50_ms": 0.5}}


def test_model_cpu_is_interpolated_on_log2_of_the_batch() -> None:
    raw = _raw({1: 0.1, 2: 0.16, 4: 0.24})  # us per row: 100, 80, 60
    assert model_cpu_us(raw, None) == pytest.approx(100.0)
    assert model_cpu_us(raw, 2.0) == pytest.approx(80.0)
    assert model_cpu_us(raw, 2**1.5) == pytest.approx(70.0)
    assert model_cpu_us(raw, 64.0) == pytest.approx(60.0)  # past the sweep: its end
    assert model_cpu_us({"sweep": {}}, 1.0) is None


def _cell(throughput: float, p50: float, p99: float, srv_us: float, batch: float) -> dict:
    return {
        "throughput": throughput, "p50_ms": p50, "p99_ms": p99, "errors": {},
        "server_us_per_request": srv_us, "mean_batch": batch,
        "cpu": {"client": 0.5, "server": 1.0, "other": 0.0},
    }  # fmt: skip


def test_torchserve_best_per_cell_and_the_peer_targets() -> None:
    repeat = {
        "raw": {"mlp-peer": _raw({1: 0.1, 32: 3.2}), "cnn-peer": _raw({1: 1.0, 32: 32.0})},
        "cases": {
            "echo-tcp-c1": _cell(3000, 0.3, 0.5, 150, 1),
            "mlp-peer-tcp-c1": _cell(800, 1.0, 2.0, 400, 1),
            "ts-mlp-b32-tcp-c1": _cell(500, 2.0, 3.0, 900, 1),
            "ts-mlp-nb-tcp-c1": _cell(600, 1.6, 3.0, 700, 1),
            "mlp-peer-tcp-c32": _cell(5000, 6.0, 9.0, 300, 16),
            "ts-mlp-b32-tcp-c32": _cell(4000, 8.0, 12.0, 500, 32),
            "ts-mlp-nb-tcp-c32": _cell(2000, 16.0, 30.0, 400, 1),
        },
        "peers_idle": {"edgeserve_rss_mb": 300.0, "torchserve_rss_mb": 700.0},
    }
    assert torchserve_best(repeat, "mlp", 1, "p50_ms") == (1.6, "nb")
    assert torchserve_best(repeat, "mlp", 32, "throughput") == (4000, "b32")
    assert net_cpu_us(repeat, "echo-tcp-c1") == 150  # no model to subtract
    assert net_cpu_us(repeat, "mlp-peer-tcp-c1") == pytest.approx(300.0)
    # TorchServe's best net CPU at c=32 is b32's 500 - 100 = 400 (nb's 400 - 100 = 300 is
    # lower, so nb is the best: per cell, whichever configuration does better)
    assert torchserve_best(repeat, "mlp", 32, "net_cpu") == (pytest.approx(300.0), "nb")
    summary = summarize_repeats([repeat], select(all_cases(), "peers"))
    values = {row["key"]: row["value"] for row in summary["targets"]}
    assert values["peer_mlp_c1_p50"] == pytest.approx(1.0 / 1.6)
    assert values["peer_mlp_c32_throughput"] == pytest.approx(1.25)
    assert values["peer_mlp_c32_cpu"] == pytest.approx((300 - 100) / 300)
    assert values["peer_idle_rss"] == pytest.approx(300 / 700)
    assert values["peer_cnn_c32_p99"] is None  # not measured: no verdict
    table = peer_table(summary) or ""
    assert "MLP c=32 req/s" in table and "b32" in table and "PASS" in table


def test_pinned_puts_every_thread_of_the_server_on_its_first_cpus() -> None:
    every = sorted(os.sched_getaffinity(0))
    if len(every) < 2:
        pytest.skip("one CPU: nothing to pin to")  # the CI machine has 2
    code = (
        "import threading, time\n"
        "for _ in range(3): threading.Thread(target=time.sleep, args=(30,)).start()\n"
        "time.sleep(30)"
    )
    child = subprocess.Popen([sys.executable, "-c", code])
    try:
        server = Server("child", child, "", "", Path(os.devnull))
        deadline = time.monotonic() + 30  # the child's interpreter starts (a loaded box: s)
        while len(tasks := list(Path(f"/proc/{child.pid}/task").iterdir())) < 4:
            assert time.monotonic() < deadline, "the child never started its threads"
            time.sleep(0.05)
        with pinned(server, 1):
            assert {frozenset(os.sched_getaffinity(int(t.name))) for t in tasks} == {
                frozenset(every[:1])
            }
        assert {frozenset(os.sched_getaffinity(int(t.name))) for t in tasks} == {frozenset(every)}
    finally:
        child.kill()
        child.wait()
