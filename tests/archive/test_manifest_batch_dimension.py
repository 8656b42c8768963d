"""Whether a manifest's model has a batch dimension, and how that is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeserve.archive.manifest import Manifest
from edgeserve.errors import ArchiveError
from edgeserve.packager.build import plan_archive


def _manifest(shape: list[int], batching: dict | None) -> dict:
    data = {
        "schema": 1,
        "name": "m",
        "version": "1",
        "format": "torchscript",
        "model_file": "model.pt",
        "handler": "tensor",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": shape}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [4]}],
        "files": {"model.pt": "0" * 64},
    }
    if batching is not None:
        data["batching"] = batching
    return data


@pytest.mark.parametrize(
    ("shape", "batching", "batches", "written"),
    [
        ([-1, 4], None, True, 1),
        ([-1, 4], {"max_batch_size": 16}, True, 16),
        ([-1, 4], {"max_batch_size": 0}, False, 0),  # free dims, no batch dimension
        ([3, 4], {"max_batch_size": 0}, False, 0),
        ([3, 4], {"max_batch_size": 1}, False, 0),  # as older packagers wrote it
        ([3, 4], None, False, 0),
    ],
)
def test_the_batch_dimension_is_read_and_written_back(
    shape: list[int], batching: dict | None, batches: bool, written: int
) -> None:
    manifest = Manifest.from_dict(_manifest(shape, batching))
    assert manifest.batches is batches
    # The batcher's settings stay valid: a model without a batch dim runs one at a time.
    assert manifest.batching.max_batch_size == (written or 1)
    again = json.loads(json.dumps(manifest.to_dict()))
    assert again["batching"]["max_batch_size"] == written
    assert Manifest.from_dict(again) == manifest


@pytest.mark.parametrize(
    ("shape", "batching", "problem"),
    [
        (
            [3, 4],
            {"max_batch_size": 4},
            "'batching.max_batch_size': 4 needs dim 0 of every input to be -1",
        ),
        (
            [-1, 4],
            {"max_batch_size": 0, "preferred_batch_sizes": [2]},
            "'batching.preferred_batch_sizes': must be empty when max_batch_size is 0",
        ),
        ([-1, 4], {"max_batch_size": -1}, "'batching.max_batch_size': must be 1..65536"),
    ],
)
def test_contradictions_are_refused_naming_the_field(
    shape: list[int], batching: dict, problem: str
) -> None:
    with pytest.raises(ArchiveError, match=problem.replace("[", r"\[").replace(".", r"\.")):
        Manifest.from_dict(_manifest(shape, batching))


def test_max_batch_size_0_packages_a_batching_model_with_whole_shapes(
    models_py: Path, example_npy: Path
) -> None:
    """``--max-batch-size 0``: no batch dimension, whatever the probe finds."""
    manifest, _ = plan_archive(
        f"{models_py}:build", name="m", version="1", example_inputs=[example_npy], max_batch_size=0
    )
    assert not manifest.batches and manifest.inputs[0].shape == (2, 16)
    assert manifest.to_dict()["batching"]["max_batch_size"] == 0
