"""Inline execution on the event loop is decided on the input's upper bound, not a sample.

A model whose per-request cost is unbounded (a variable non-batch dim) must run on its
own worker thread, however cheap its warm-up sample: one large request must not stall
the other clients of the daemon.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from pathlib import Path

import numpy as np

from edgeserve.archive.format import write_archive
from edgeserve.packager.build import plan_archive
from edgeserve.types import TensorSpec

# One loop iteration per column: ~3 us each in TorchScript, so a one-column sample is
# far under the inline threshold while a million columns take seconds.
LOOP_SOURCE = """\
import torch
from torch import nn


class ColumnLoop(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        acc = torch.zeros(x.shape[0])
        for i in range(x.shape[1]):
            acc = acc + x[:, i]
        return acc


def build() -> nn.Module:
    return ColumnLoop()
"""
BIG_COLUMNS = 1_000_000


def _variable_width_archive(tmp_path: Path, sign_key: Path) -> Path:
    """The loop model with input ``[-1, -1]``: any width is a valid request."""
    source = tmp_path / "loop.py"
    source.write_text(LOOP_SOURCE)
    example = tmp_path / "x.npy"
    np.save(example, np.ones((1, 1), dtype=np.float32))
    manifest, members = plan_archive(
        f"{source}:build",
        name="loop",
        version="1",
        example_inputs=[("x", example)],
        max_batch_size=1,
    )
    assert manifest.inputs[0].shape == (-1, 1)  # the packager fixes the example's width
    wide = dataclasses.replace(manifest, inputs=(TensorSpec("x", "FP32", (-1, -1)),))
    out = tmp_path / "loop-1.esar"
    write_archive(out, wide, members, sign_key=sign_key)
    return out


def test_a_large_request_to_a_variable_dim_model_does_not_stall_other_clients(
    tmp_path, daemons, signing_key, mlp_archive_factory
):
    loop_archive = _variable_width_archive(tmp_path, signing_key[0])
    daemon = daemons.start(loop_archive, mlp_archive_factory("1"))

    big = {"x": np.ones((1, BIG_COLUMNS), dtype=np.float32)}
    small = {"x": np.zeros((1, 16), dtype=np.float32)}
    big_took: list[float] = []
    sums: list[list[float]] = []

    def send_big() -> None:
        with daemon.client() as client:
            started = time.monotonic()
            _, outputs = client.infer("loop", big, timeout=120)
            big_took.append(time.monotonic() - started)
            sums.append(outputs["output__0"].tolist())

    with daemon.client() as other:
        other.infer("mlp", small)  # connected and warm before the big request starts
        sender = threading.Thread(target=send_big)
        sender.start()
        latencies = []
        while sender.is_alive():
            started = time.monotonic()
            other.infer("mlp", small, timeout=60)
            latencies.append(time.monotonic() - started)
        sender.join()

    # The big request really was long, and the other client kept being answered while
    # it ran (generous margins: the point is milliseconds against seconds).
    assert sums == [[float(BIG_COLUMNS)]] and big_took[0] > 1.0, big_took
    assert max(latencies) < big_took[0] / 4, (max(latencies), big_took[0])
    assert len(latencies) >= 10
    chosen = [line for line in daemon.log().splitlines() if "loop: " in line and "intra-op" in line]
    assert chosen and "inline" not in chosen[0], chosen  # on its worker thread
