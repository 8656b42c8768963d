"""The CUDA path: loads on the GPU, fp16, placement of quantized models. Skips without one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from edgeserve.errors import ConfigError
from edgeserve.serving.runtime import RuntimeOptions, load_model
from edgeserve.types import BytesTensor

from .conftest import MLP_IN, MLP_OUT, TinyCNN, spec
from .test_image_handler import encode, reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _samples(mlp):
    x = np.random.default_rng(3).standard_normal((4, 16)).astype(np.float32)
    with torch.inference_mode():
        y = mlp(torch.from_numpy(x)).numpy()
    return [({"x": x}, {"y": y})]


def test_fp32_on_cuda_matches_cpu(model_dirs, mlp) -> None:
    made = model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=_samples(mlp))
    model = load_model(*made, RuntimeOptions(device="auto"))
    try:
        assert model.device == torch.device("cuda", 0) and model.compute_dtype is None
        assert next(model.module.parameters()).device.type == "cuda"
        assert model.warm_up().samples == 1
        x = torch.randn(32, 16)
        with torch.inference_mode():
            expected = mlp(x)
        got = model.run({"x": x})["y"]
    finally:
        model.close()
    assert got.device.type == "cpu" and got.dtype == torch.float32 and got.is_contiguous()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_fp16_on_cuda_is_close_to_cpu_fp32(model_dirs, mlp) -> None:
    made = model_dirs.make(mlp, MLP_IN, MLP_OUT, samples=_samples(mlp))
    model = load_model(*made, RuntimeOptions(device="cuda:0", fp16=True))
    try:
        assert model.compute_dtype == torch.float16
        assert next(model.module.parameters()).dtype == torch.float16
        report = model.warm_up()  # fp32 samples pass under the fp16 tolerance floor
        assert 0.0 < report.max_abs_error["y"] < 1e-2
        x = torch.randn(32, 16)
        with torch.inference_mode():
            expected = mlp(x)
        got = model.run({"x": x})["y"]
    finally:
        model.close()
    assert got.device.type == "cpu" and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)


def test_image_classifier_fp16_on_cuda(model_dirs) -> None:
    cnn = TinyCNN(classes=6).eval()
    made = model_dirs.make(
        cnn,
        (spec("input", "FP32", -1, 3, 32, 32),),
        (spec("logits", "FP32", -1, 6),),
        handler="image_classifier",
        handler_config={"topk": 3, "resize": "stretch"},
    )
    images = [encode(40, 30, "PNG", 1), encode(32, 32, "JPEG", 2)]
    model = load_model(*made, RuntimeOptions(device="cuda", fp16=True))
    try:
        out = model.run({"image": BytesTensor(images, (2,))})
    finally:
        model.close()
    scores, _ = reference(cnn, images, 32, 3, crop=False)
    assert out["scores"].dtype == torch.float32
    torch.testing.assert_close(out["scores"], scores, rtol=2e-2, atol=2e-2)


def test_quantized_models_stay_on_cpu(model_dirs, mlp_int8) -> None:
    quant = {"mode": "dynamic", "engine": torch.backends.quantized.engine, "dtype": "qint8"}
    made = model_dirs.make(mlp_int8, MLP_IN, MLP_OUT, quantization=quant)
    model = load_model(*made, RuntimeOptions(device="auto", fp16=True))
    try:
        assert model.device == torch.device("cpu") and model.compute_dtype is None
        assert model.run({"x": torch.randn(2, 16)})["y"].shape == (2, 4)
    finally:
        model.close()
    with pytest.raises(ConfigError, match="is quantized .dynamic. and runs on the CPU only"):
        load_model(*made, RuntimeOptions(device="cuda"))
