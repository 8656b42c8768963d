"""Drift sketches: figures against numpy, merging, BYTES, no raw values, and the serving
hook (a real TorchScript model served through the real batcher and instance thread)."""

from __future__ import annotations

import asyncio
import json
import time
from bisect import bisect_left
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from edgeserve.serving.build import build
from edgeserve.serving.runtime import LoadedModel, RuntimeOptions, load_model
from edgeserve.telemetry.drift import ARGMAX_CLASSES, BUCKETS, EDGES, DriftSketch, merge
from edgeserve.telemetry.recorders import Recorders
from edgeserve.types import BatchingSettings, BytesTensor, InferRequest
from tests.serving.runtime.conftest import MLP, MLP_IN, MLP_OUT, ModelDirFactory

SUMMARY_KEYS = {
    "count",
    "elements",
    "sum",
    "sum_sq",
    "nonfinite",
    "mean",
    "variance",
    "per_request",
}


def _bucket(value: float) -> str:
    """The bucket of ``value``, computed apart from the module: edges[i-1] < v <= edges[i]."""
    return str(bisect_left(EDGES, value))


def _histogram(values: np.ndarray) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values.tolist():
        key = _bucket(value)
        counts[key] = counts.get(key, 0) + 1
    return counts


def _batches(rng: np.random.Generator, sizes: list[int]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for n in sizes:
        scale = rng.choice([1e-3, 1.0, 50.0])
        x = (rng.standard_normal((n, 64)) * scale + rng.uniform(-3, 3)).astype(np.float32)
        y = rng.standard_normal((n, 10)).astype(np.float32)
        yield x, y


def _check_against_numpy(summary: dict[str, Any], rows: np.ndarray) -> None:
    values = rows.astype(np.float64)
    assert summary["count"] == rows.shape[0]
    assert summary["elements"] == rows.size
    assert summary["mean"] == pytest.approx(values.mean(), rel=1e-5, abs=1e-6)
    assert summary["variance"] == pytest.approx(values.var(), rel=1e-4, abs=1e-6)
    per = summary["per_request"]
    for name in ("mean", "min", "max"):
        assert sum(per[name].values()) == rows.shape[0], name
    assert per["min"] == _histogram(rows.min(axis=1))
    assert per["max"] == _histogram(rows.max(axis=1))
    means = rows.astype(np.float64).mean(axis=1)
    got = per["mean"]
    # A row mean within float32 rounding of an edge may fall either side: compare loosely
    # there, exactly elsewhere.
    near_edge = [m for m in means if min(abs(m - e) for e in EDGES) <= 1e-6 * max(abs(m), 1)]
    assert not near_edge or sum(got.values()) == len(means)
    if not near_edge:
        assert got == _histogram(means)


def test_figures_match_numpy_on_random_batches() -> None:
    rng = np.random.default_rng(7)
    sketch = DriftSketch(budget=1.0)
    xs, ys = [], []
    for x, y in _batches(rng, [1, 32, 5, 17, 32]):
        sketch.observe_batch({"x": torch.from_numpy(x)}, {"y": torch.from_numpy(y)})
        xs.append(x)
        ys.append(y)
    taken = sketch.take()
    assert taken["buckets"] == BUCKETS and taken["failures"] == 0
    x_all, y_all = np.concatenate(xs), np.concatenate(ys)
    _check_against_numpy(taken["inputs"]["x"], x_all)
    _check_against_numpy(taken["outputs"]["y"], y_all)
    assert "argmax" not in taken["inputs"]["x"]
    expected = np.bincount(y_all.argmax(axis=1))
    assert taken["outputs"]["y"]["argmax"] == {str(c): int(n) for c, n in enumerate(expected) if n}
    # take() resets: the next interval starts empty.
    assert sketch.take() == {
        "buckets": BUCKETS,
        "inputs": {},
        "outputs": {},
        "failures": 0,
        "batches": {"sketched": 0, "skipped": 0},
    }


def test_per_request_figures_with_sizes() -> None:
    sketch = DriftSketch(budget=1.0)
    x = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # requests of 1, 3 and 2 rows
    sketch.observe_batch({"x": x}, {}, sizes=[1, 3, 2])
    summary = sketch.take()["inputs"]["x"]
    assert summary["count"] == 3 and summary["elements"] == 12
    assert summary["per_request"]["mean"] == _histogram(np.array([0.5, 4.5, 9.5]))
    assert summary["per_request"]["min"] == _histogram(np.array([0.0, 2.0, 8.0]))
    assert summary["per_request"]["max"] == _histogram(np.array([1.0, 7.0, 11.0]))
    assert summary["mean"] == pytest.approx(5.5)
    assert summary["variance"] == pytest.approx(np.arange(12).var())


def test_two_halves_merged_equal_the_whole() -> None:
    rng = np.random.default_rng(11)
    batches = list(_batches(rng, [3, 32, 8, 1, 20, 32]))
    whole, first, second = DriftSketch(budget=1.0), DriftSketch(budget=1.0), DriftSketch(budget=1.0)
    for index, (x, y) in enumerate(batches):
        inputs, outputs = {"x": torch.from_numpy(x)}, {"y": torch.from_numpy(y)}
        whole.observe_batch(inputs, outputs)
        (first if index < 3 else second).observe_batch(inputs, outputs)
    merged, expected = merge(first.take(), second.take()), whole.take()
    for side, name in (("inputs", "x"), ("outputs", "y")):
        got, want = merged[side][name], expected[side][name]
        for key in ("count", "elements", "nonfinite", "per_request"):
            assert got[key] == want[key], key
        for key in ("sum", "sum_sq", "mean", "variance"):
            assert got[key] == pytest.approx(want[key], rel=1e-9), key
    assert merged["outputs"]["y"]["argmax"] == expected["outputs"]["y"]["argmax"]
    # Mergeable with a sketch that saw nothing, and only with the same buckets.
    assert merge(expected, DriftSketch(budget=1.0).take()) == expected
    with pytest.raises(ValueError, match="different buckets"):
        merge(expected, {**expected, "buckets": "linear"})


def test_the_json_holds_only_aggregates() -> None:
    rng = np.random.default_rng(3)
    x = rng.uniform(-5, 5, (40, 64)).astype(np.float32)
    y = rng.standard_normal((40, 3)).astype(np.float32)
    sketch = DriftSketch(budget=1.0)
    sketch.observe_batch({"x": torch.from_numpy(x)}, {"y": torch.from_numpy(y)})
    taken = json.loads(json.dumps(sketch.take()))
    raw = set(x.astype(np.float64).ravel().tolist()) | set(y.astype(np.float64).ravel().tolist())

    def leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
        if isinstance(node, dict):
            for key, value in node.items():
                yield from leaves(value, f"{path}/{key}")
        else:
            yield path, node

    assert set(taken) == {"buckets", "inputs", "outputs", "failures", "batches"}
    for summary in [*taken["inputs"].values(), *taken["outputs"].values()]:
        assert set(summary) <= SUMMARY_KEYS | {"argmax"}
        for stat in summary["per_request"].values():
            assert all(key.isdigit() and int(key) <= len(EDGES) for key in stat)
            assert all(isinstance(n, int) for n in stat.values())
    for path, value in leaves(taken):
        assert not isinstance(value, list), path  # nothing sized like the data
        if isinstance(value, float):
            assert value not in raw, f"{path} holds a raw value"


def test_bytes_tensors_give_only_their_lengths() -> None:
    items = [b"a", b"bbb", b"cc", b"", b"dddd", b"eeeeee"]
    sketch = DriftSketch(budget=1.0)
    sketch.observe_batch({"text": BytesTensor(items, (3, 2))}, {"score": torch.ones(3, 1)})
    taken = sketch.take()
    text = taken["inputs"]["text"]
    lengths = np.array([len(i) for i in items], dtype=np.float64).reshape(3, 2)
    _check_against_numpy(text, lengths)
    assert "argmax" not in taken["outputs"]["score"]  # one column: not a classifier
    assert taken["outputs"]["score"]["count"] == 3


def test_nonfinite_rows_are_counted_apart() -> None:
    x = torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [float("inf"), 1.0], [3.0, 5.0]])
    sketch = DriftSketch(budget=1.0)
    sketch.observe_batch({"x": x}, {})
    summary = sketch.take()["inputs"]["x"]
    assert (summary["count"], summary["nonfinite"], summary["elements"]) == (2, 2, 4)
    assert summary["mean"] == pytest.approx(11.0 / 4)


def test_integer_inputs_and_many_classes() -> None:
    tokens = torch.tensor([[1, 5, 9], [2, 2, 2]], dtype=torch.int64)
    logits = torch.zeros(4, 2000)
    for row, cls in enumerate([3, 1500, 1023, 1024]):
        logits[row, cls] = 1.0
    sketch = DriftSketch(budget=1.0)
    sketch.observe_batch({"tokens": tokens}, {"logits": logits})
    taken = sketch.take()
    _check_against_numpy(taken["inputs"]["tokens"], tokens.numpy())
    assert taken["outputs"]["logits"]["argmax"] == {"3": 1, "1023": 1, "other": 2}
    assert ARGMAX_CLASSES == 1024


def test_a_tensor_it_cannot_read_is_a_failure_not_an_exception() -> None:
    sketch = DriftSketch(budget=1.0)
    sketch.observe_batch({"x": "not a tensor"}, {})  # type: ignore[dict-item]
    sketch.observe_batch({"x": torch.ones(2, 2)}, {})
    taken = sketch.take()
    assert taken["failures"] == 1 and taken["inputs"]["x"]["count"] == 2


@pytest.fixture
def served_mlp(tmp_path: Path) -> Iterator[tuple[LoadedModel, Recorders, BatchingSettings]]:
    """A real TorchScript MLP, loaded and served by ``serving.build`` on one instance thread."""
    model_dir, manifest = ModelDirFactory(tmp_path).make(
        torch.jit.script(MLP().eval()), MLP_IN, MLP_OUT, name="mlp"
    )
    loaded = load_model(model_dir, manifest, RuntimeOptions(device="cpu"))
    recorders = Recorders()
    settings = BatchingSettings(max_batch_size=8, max_queue_delay_ms=5.0, intra_op_threads=1)
    yield loaded, recorders, settings
    loaded.close()


def test_served_batches_reach_the_sketch_of_their_version(
    served_mlp: tuple[LoadedModel, Recorders, BatchingSettings],
) -> None:
    loaded, recorders, settings = served_mlp
    recorder = recorders.for_model("mlp", "1")
    recorder.drift = DriftSketch(budget=1.0)  # every batch, however the requests batch up
    rng = np.random.default_rng(5)
    requests = [rng.standard_normal((rows, 16)).astype(np.float32) for rows in (1, 1, 3, 1, 2)]

    async def serve() -> list[np.ndarray]:
        stack = await build(loaded, settings, recorder, started=time.monotonic())
        try:
            results = await asyncio.gather(
                *(
                    stack.batcher.submit(
                        InferRequest("mlp", "1", {"x": torch.from_numpy(x)}, batch_size=len(x))
                    )
                    for x in requests
                )
            )
        finally:
            await stack.batcher.close()
        outputs = [r.outputs["y"] for r in results]
        assert all(isinstance(y, torch.Tensor) for y in outputs)
        return [y.numpy() for y in outputs if isinstance(y, torch.Tensor)]

    outputs = asyncio.run(asyncio.wait_for(serve(), 60))
    taken = recorder.drift.take()
    x_all, y_all = np.concatenate(requests), np.concatenate(outputs)
    # Sketched per row: the hook sees the batch tensors, one row per sample, and only
    # what was served (not warm-up, not the thread probe).
    _check_against_numpy(taken["inputs"]["x"], x_all)
    _check_against_numpy(taken["outputs"]["y"], y_all)
    expected = np.bincount(y_all.argmax(axis=1))
    assert taken["outputs"]["y"]["argmax"] == {str(c): int(n) for c, n in enumerate(expected) if n}


class _StepClock:
    """A clock that moves only when told: measuring costs exactly ``cost`` seconds."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_cpu_budget_bounds_the_cost_and_counts_what_it_skipped() -> None:
    clock = _StepClock()
    sketch = DriftSketch(budget=0.01, clock=clock)
    x = torch.randn(4, 8)
    sketched_before = 0
    for _ in range(1000):  # one batch every 1 ms of wall time
        clock.now += 0.001
        sketch.observe_batch({"x": x}, {"y": x})
    taken = sketch.take()
    batches = taken["batches"]
    assert batches["sketched"] + batches["skipped"] == 1000
    # With a frozen clock each measurement costs 0 s: the budget is never spent.
    assert batches["skipped"] == sketched_before
    assert taken["inputs"]["x"]["count"] == 4 * batches["sketched"]


def test_an_expensive_sketch_is_sampled_to_its_budget() -> None:
    now = [0.0]

    def clock() -> float:  # every call to the clock advances it by 0.5 ms
        now[0] += 0.0005
        return now[0]

    sketch = DriftSketch(budget=0.01, clock=clock)
    x = torch.randn(2, 8)
    for _ in range(2000):
        sketch.observe_batch({"x": x}, {"y": x})
    batches = sketch.take()["batches"]
    assert batches["sketched"] + batches["skipped"] == 2000
    # Each sketched batch costs ~0.5 ms against ~1 ms of wall time per batch: a 1 % budget
    # allows roughly one batch in fifty.
    assert 0 < batches["sketched"] < 2000 * 0.05, batches
    assert batches["skipped"] > 0
