"""Warm-up: samples must give their expected outputs before a model is served."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeserve.errors import ArchiveError, WarmupFailed
from edgeserve.serving.runtime import RuntimeOptions, load_model, served_signature
from edgeserve.serving.warmup import WarmupReport, load_sample

from .conftest import MLP_IN, MLP_OUT, RaiseOnFlag, TupleModel, spec

CPU = RuntimeOptions(device="cpu")


def _mlp_samples(mlp, count: int = 2, batch: int = 3) -> list:
    rng = np.random.default_rng(7)
    samples = []
    for _ in range(count):
        x = rng.standard_normal((batch, 16)).astype(np.float32)
        with torch.inference_mode():
            y = mlp(torch.from_numpy(x)).numpy()
        samples.append(({"x": x}, {"y": y}))
    return samples


def test_samples_pass(model_dirs, mlp) -> None:
    model = load_model(*model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=_mlp_samples(mlp)), CPU)
    try:
        report = model.warm_up()
    finally:
        model.close()
    assert isinstance(report, WarmupReport)
    assert report.samples == 2 and not report.synthetic
    assert len(report.durations_s) == 2 and all(d > 0 for d in report.durations_s)
    assert report.total_s == pytest.approx(sum(report.durations_s))
    assert report.max_abs_error == {"y": 0.0}


def test_int8_samples_pass_within_the_manifest_tolerance(model_dirs, mlp, mlp_int8) -> None:
    quant = {"mode": "dynamic", "engine": torch.backends.quantized.engine, "dtype": "qint8"}
    # Expected outputs from the fp32 model: int8 must be within atol of them, not equal.
    made = model_dirs.make(
        mlp_int8, MLP_IN, MLP_OUT, quantization=quant, samples=_mlp_samples(mlp), atol=0.05
    )
    model = load_model(*made, CPU)
    try:
        report = model.warm_up()
    finally:
        model.close()
    assert 0.0 < report.max_abs_error["y"] <= 0.05


def test_wrong_expected_output_fails_naming_sample_and_output(model_dirs, mlp) -> None:
    samples = _mlp_samples(mlp, count=3)
    samples[1][1]["y"][0, 2] += 0.5
    model = load_model(*model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=samples), CPU)
    try:
        with pytest.raises(WarmupFailed) as info:
            model.warm_up()
    finally:
        model.close()
    message = str(info.value)
    assert message.startswith("model 'm' version '1' failed warm-up: sample 1 output 'y': ")
    assert "max abs error 0.5 exceeds the tolerance (rtol 1e-05, atol 1e-06)" in message


def test_wrong_expected_shape_fails(model_dirs, mlp) -> None:
    samples = _mlp_samples(mlp, count=1)
    samples[0][1]["y"] = samples[0][1]["y"][:, :3].copy()
    model = load_model(*model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=samples), CPU)
    try:
        with pytest.raises(
            WarmupFailed, match=r"sample 0 output 'y': shape \[3, 4\], expected \[3, 3\]"
        ):
            model.warm_up()
    finally:
        model.close()


def test_sample_that_raises_fails_warm_up(model_dirs) -> None:
    io = (spec("x", "FP32", -1, 2),)
    flagged = np.array([[13.0, 0.0]], dtype=np.float32)
    made = model_dirs.make(RaiseOnFlag(), io, io, samples=[({"x": flagged}, {"x": flagged + 1})])
    model = load_model(*made, CPU)
    try:
        with pytest.raises(
            WarmupFailed, match=r"sample 0 raised Error: .*flag value 13 seen"
        ) as info:
            model.warm_up()
    finally:
        model.close()
    assert isinstance(info.value.__cause__, torch.jit.Error)


def test_no_samples_runs_one_synthetic_batch(model_dirs) -> None:
    calls = []

    made = model_dirs.make(
        TupleModel(),
        (spec("x", "FP32", -1, 3),),
        (spec("a", "FP32", -1, 3), spec("b", "FP32", -1, 1)),
    )
    model = load_model(*made, CPU)
    original = model.handler.preprocess

    def spy(inputs):
        calls.append(
            {k: (tuple(v.shape), v.dtype, float(v.abs().sum())) for k, v in inputs.items()}
        )
        return original(inputs)

    model.handler.preprocess = spy  # type: ignore[method-assign]
    try:
        report = model.warm_up()
    finally:
        model.close()
    assert report.synthetic and report.samples == 0 and len(report.durations_s) == 1
    assert calls == [{"x": ((1, 3), torch.float32, 0.0)}]


def test_sample_dtype_must_match_the_signature(model_dirs, mlp) -> None:
    samples = _mlp_samples(mlp, count=1)
    samples[0][0]["x"] = samples[0][0]["x"].astype(np.float64)
    model = load_model(*model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=samples), CPU)
    try:
        with pytest.raises(
            ArchiveError,
            match=r"member 'samples/0/in-x.npy' \(input 'x'\): holds FP64, the signature says FP32",
        ):
            model.warm_up()
    finally:
        model.close()


def test_load_sample_reads_inputs_and_expected(model_dirs, mlp) -> None:
    samples = _mlp_samples(mlp, count=1)
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=samples)
    inputs, expected = load_sample(
        model_dir, manifest, manifest.samples[0], signature=served_signature(model_dir, manifest)
    )
    assert torch.equal(inputs["x"], torch.from_numpy(samples[0][0]["x"]))
    assert torch.equal(expected["y"], torch.from_numpy(samples[0][1]["y"]))


def test_sample_for_an_unknown_tensor_is_an_archive_error(model_dirs, mlp) -> None:
    samples = _mlp_samples(mlp, count=1)
    samples[0][1]["z"] = samples[0][1]["y"]
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=samples)
    with pytest.raises(
        ArchiveError, match=r"output 'z', which is not in the signature \(\['y'\]\)"
    ):
        load_sample(
            model_dir,
            manifest,
            manifest.samples[0],
            signature=served_signature(model_dir, manifest),
        )


def test_pickled_npy_is_refused(model_dirs, mlp) -> None:
    samples = _mlp_samples(mlp, count=1)
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=samples)
    np.save(
        model_dir / manifest.samples[0].inputs["x"],
        np.array([{"a": 1}], dtype=object),
        allow_pickle=True,
    )
    with pytest.raises(ArchiveError, match="sample member 'samples/0/in-x.npy'"):
        load_sample(
            model_dir,
            manifest,
            manifest.samples[0],
            signature=served_signature(model_dir, manifest),
        )
