"""Device resolution and placement rules (CPU machine; the GPU path is in test_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from edgeserve.errors import ConfigError
from edgeserve.serving.runtime import RuntimeOptions, load_model, resolve_device

from .conftest import MLP_IN, MLP_OUT

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


def test_auto_and_cpu() -> None:
    expected = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert str(resolve_device("auto")) == expected
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")


@NO_GPU
@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_a_gpu_names_the_device(spec: str) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_device(spec)
    assert info.value.key == "runtime.device"
    assert f"'{spec}'" in str(info.value) and "no CUDA GPU" in str(info.value)


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps", "", "cuda:-1"])
def test_unknown_device_spec(spec: str) -> None:
    with pytest.raises(ConfigError, match="must be auto, cpu, cuda or cuda:N") as info:
        resolve_device(spec)
    assert f"'{spec}'" in str(info.value)


def test_key_is_configurable() -> None:
    with pytest.raises(ConfigError) as info:
        resolve_device("tpu", key="models.mlp.device")
    assert str(info.value).startswith("models.mlp.device: ")


@pytest.mark.skipif(torch.cuda.device_count() > 7, reason="needs fewer than 8 GPUs")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.gpu
def test_cuda_index_out_of_range() -> None:
    with pytest.raises(ConfigError, match="only .* GPU"):
        resolve_device("cuda:7")


@NO_GPU
def test_load_on_cuda_without_gpu_is_refused(model_dirs, mlp) -> None:
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT)
    with pytest.raises(ConfigError, match="cuda:1"):
        load_model(model_dir, manifest, RuntimeOptions(device="cuda:1"))


def test_fp16_is_ignored_on_cpu(model_dirs, mlp, caplog) -> None:
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT)
    caplog.set_level("INFO", logger="edgeserve.serving")
    loaded = load_model(model_dir, manifest, RuntimeOptions(device="cpu", fp16=True))
    try:
        assert loaded.device == torch.device("cpu")
        assert loaded.compute_dtype is None
        x = torch.randn(3, 16)
        assert loaded.run({"x": x})["y"].dtype == torch.float32
        assert "fp16 applies to float models on CUDA only" in caplog.text
    finally:
        loaded.close()
