"""Models without a batch dimension, from ``edgeserve package`` to clients.

``forward(x): return x.sum(0)`` with an example of shape (3, 4) does not batch along dim
0: it is packaged with ``max_batch_size`` 0 (Triton's convention), served with its shapes
whole, one request per run, and answered to tritonclient and ``edgeserve predict`` alike.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import zipfile
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from edgeserve.archive.format import write_archive
from edgeserve.packager.build import plan_archive
from edgeserve.types import TensorSpec
from tests.cli.support import edgeserve_ok, package

SUM_SOURCE = """\
import torch
from torch import nn


class SumRows(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.sum(0)


def build() -> nn.Module:
    return SumRows()
"""


@pytest.fixture
def sum_model(tmp_path: Path) -> tuple[Path, Path]:
    """(module.py, an example of shape (3, 4))."""
    source = tmp_path / "sum_rows.py"
    source.write_text(SUM_SOURCE)
    example = tmp_path / "x.npy"
    np.save(example, np.arange(12, dtype=np.float32).reshape(3, 4))
    return source, example


def _manifest_json(archive: Path) -> dict:
    with zipfile.ZipFile(archive) as zf:
        return json.loads(zf.read("manifest.json"))


def _infer(client: triton.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    given = triton.InferInput("x", list(x.shape), "FP32")
    given.set_data_from_numpy(x)
    return client.infer(model, [given]).as_numpy("output__0")


def test_a_model_without_batch_dimension_is_packaged_served_and_answered(
    tmp_path, daemons, signing_key, sum_model
):
    source, example = sum_model
    archive = package(
        f"{source}:build",
        name="sumrows",
        version="1",
        output=tmp_path / "sumrows-1.esar",
        example_inputs=[("x", example)],
        sign_key=signing_key[0],
    )
    written = _manifest_json(archive)
    assert written["batching"]["max_batch_size"] == 0
    assert written["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [3, 4]}]
    assert written["outputs"] == [{"name": "output__0", "datatype": "FP32", "shape": [4]}]

    # The daemon warms it up with its sample (this failed: "4 rows for a batch of 3").
    daemon = daemons.start(archive)
    client = triton.InferenceServerClient(daemon.tcp)
    metadata = client.get_model_metadata("sumrows")
    assert [list(t.shape) for t in metadata.inputs] == [[3, 4]]
    assert [list(t.shape) for t in metadata.outputs] == [[4]]

    # Concurrent requests are never combined: each gets the sum of its own rows.
    answers: dict[int, np.ndarray] = {}

    def ask(k: int) -> None:
        with triton.InferenceServerClient(daemon.tcp) as own:
            answers[k] = _infer(own, "sumrows", np.full((3, 4), k, dtype=np.float32))

    askers = [threading.Thread(target=ask, args=(k,)) for k in range(8)]
    for asker in askers:
        asker.start()
    for asker in askers:
        asker.join()
    assert {k: v.tolist() for k, v in answers.items()} == {k: [3.0 * k] * 4 for k in range(8)}

    # The declared shape is the shape: another row count is refused, naming the input.
    with pytest.raises(InferenceServerException, match=r"'x'.*shape \[1, 4\] does not match"):
        _infer(client, "sumrows", np.zeros((1, 4), dtype=np.float32))

    # Triton's statistics count each request as one inference of batch size 1.
    stats = client.get_inference_statistics("sumrows", as_json=True)["model_stats"][0]
    assert int(stats["inference_count"]) == 8
    assert [
        (int(b["batch_size"]), int(b["compute_infer"]["count"])) for b in stats["batch_stats"]
    ] == [(1, 8)]
    client.close()

    printed = json.loads(
        edgeserve_ok(
            "predict", "sumrows", "--input", f"x={example}", "--address", daemon.tcp, "--json"
        )
    )
    assert printed["outputs"]["output__0"] == {"shape": [4], "data": [12.0, 15.0, 18.0, 21.0]}


def test_a_model_without_batch_dimension_may_have_free_dims(
    tmp_path, daemons, signing_key, sum_model
):
    """``max_batch_size`` 0 with ``-1`` in dim 0: any row count, each request run whole."""
    source, example = sum_model
    manifest, members = plan_archive(
        f"{source}:build", name="sumany", version="1", example_inputs=[("x", example)]
    )
    free = dataclasses.replace(manifest, inputs=(TensorSpec("x", "FP32", (-1, 4)),), batches=False)
    archive = tmp_path / "sumany-1.esar"
    write_archive(archive, free, members, sign_key=signing_key[0])
    assert _manifest_json(archive)["batching"]["max_batch_size"] == 0

    daemon = daemons.start(archive)
    with triton.InferenceServerClient(daemon.tcp) as client:
        assert [list(t.shape) for t in client.get_model_metadata("sumany").inputs] == [[-1, 4]]
        for rows in (1, 5, 40):
            x = np.ones((rows, 4), dtype=np.float32)
            assert _infer(client, "sumany", x).tolist() == [float(rows)] * 4
