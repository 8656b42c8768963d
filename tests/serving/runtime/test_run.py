"""Loading and running models on the CPU: numerics, output mapping, contracts, errors."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from edgeserve.errors import ArchiveError, EdgeserveError, InvalidArgument, NotReady
from edgeserve.handlers import TensorHandler, get_handler_class
from edgeserve.handlers.base import HandlerContext
from edgeserve.serving.runtime import LOADERS, LoadedModel, RuntimeOptions, load_model
from edgeserve.types import BytesTensor

from .conftest import MLP_IN, MLP_OUT, DictModel, RaiseOnFlag, TupleModel, TwoInputs, spec

CPU = RuntimeOptions(device="cpu")


@pytest.fixture
def load(request):
    """load(model_dir, manifest, options=CPU) -> LoadedModel, closed at teardown."""
    loaded: list[LoadedModel] = []

    def _load(model_dir, manifest, options=CPU):
        model = load_model(model_dir, manifest, options)
        loaded.append(model)
        return model

    yield _load
    for model in loaded:
        model.close()


def test_fp32_outputs_equal_in_process_torch(model_dirs, mlp, load) -> None:
    model = load(*model_dirs.make(mlp, MLP_IN, MLP_OUT))
    assert model.device == torch.device("cpu")
    assert (model.inputs, model.outputs) == (MLP_IN, MLP_OUT)
    assert isinstance(model.handler, TensorHandler)
    for batch in (1, 5, 32):
        x = torch.randn(batch, 16)
        with torch.inference_mode():
            expected = mlp(x)
        out = model.run({"x": x})
        assert set(out) == {"y"}
        assert out["y"].shape == (batch, 4) and out["y"].dtype == torch.float32
        assert torch.equal(out["y"], expected)


def test_int8_within_tolerance_of_fp32(model_dirs, mlp, mlp_int8, load) -> None:
    quant = {"mode": "dynamic", "engine": torch.backends.quantized.engine, "dtype": "qint8"}
    model = load(*model_dirs.make(mlp_int8, MLP_IN, MLP_OUT, quantization=quant))
    x = torch.randn(64, 16)
    with torch.inference_mode():
        reference = mlp(x)
    got = model.run({"x": x})["y"]
    assert not torch.equal(got, reference), "int8 should differ from fp32 a little"
    torch.testing.assert_close(got, reference, rtol=0.05, atol=0.05)


def test_unsupported_quantized_engine_falls_back(model_dirs, mlp_int8, load, caplog) -> None:
    quant = {"mode": "dynamic", "engine": "no-such-engine", "dtype": "qint8"}
    caplog.set_level(logging.WARNING, logger="edgeserve.serving")
    model = load(*model_dirs.make(mlp_int8, MLP_IN, MLP_OUT, quantization=quant))
    assert "'no-such-engine' is not supported here" in caplog.text
    assert torch.backends.quantized.engine in torch.backends.quantized.supported_engines
    assert model.run({"x": torch.randn(2, 16)})["y"].shape == (2, 4)


def test_tuple_outputs_map_by_position(model_dirs, load) -> None:
    outputs = (spec("doubled", "FP32", -1, 3), spec("total", "FP32", -1, 1))
    model = load(*model_dirs.make(TupleModel(), (spec("x", "FP32", -1, 3),), outputs))
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    out = model.run({"x": x})
    assert torch.equal(out["doubled"], x * 2) and torch.equal(out["total"], x.sum(1, keepdim=True))


def test_dict_outputs_map_by_key(model_dirs, load) -> None:
    outputs = (spec("doubled", "FP32", -1, 3), spec("total", "FP32", -1, 1))
    model = load(*model_dirs.make(DictModel(), (spec("x", "FP32", -1, 3),), outputs))
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    out = model.run({"x": x})
    assert list(out) == ["doubled", "total"]
    assert torch.equal(out["doubled"], x * 2) and torch.equal(out["total"], x.sum(1, keepdim=True))


def test_output_count_mismatch_is_clear(model_dirs, load) -> None:
    model = load(
        *model_dirs.make(TupleModel(), (spec("x", "FP32", -1, 3),), (spec("y", "FP32", -1, 3),))
    )
    with pytest.raises(ValueError, match=r"returned 2 output\(s\) but the manifest declares 1"):
        model.run({"x": torch.ones(1, 3)})


def test_dict_missing_key_is_clear(model_dirs, load) -> None:
    outputs = (spec("doubled", "FP32", -1, 3), spec("mean", "FP32", -1, 1))
    model = load(*model_dirs.make(DictModel(), (spec("x", "FP32", -1, 3),), outputs))
    with pytest.raises(ValueError, match=r"without the declared output\(s\) \['mean'\]"):
        model.run({"x": torch.ones(1, 3)})


def test_inputs_go_in_manifest_order(model_dirs, load) -> None:
    inputs = (spec("a", "FP32", -1, 2), spec("b", "FP32", -1, 2))
    model = load(*model_dirs.make(TwoInputs(), inputs, (spec("y", "FP32", -1, 2),)))
    a, b = torch.ones(1, 2), torch.full((1, 2), 3.0)
    # The mapping's order does not matter, the manifest's does.
    assert model.run({"b": b, "a": a})["y"].tolist() == [[13.0, 13.0]]


def test_cpu_path_makes_no_copies(model_dirs, load) -> None:
    model_dir, manifest = model_dirs.make(
        TwoInputs(),
        (spec("a", "FP32", -1, 2), spec("b", "FP32", -1, 2)),
        (spec("y", "FP32", -1, 2),),
    )
    model = load(model_dir, manifest)
    a, b = torch.ones(4, 2), torch.zeros(4, 2)
    args = model.handler.preprocess({"a": a, "b": b})
    assert args[0] is a and args[1] is b
    # run() hands CPU-contiguous outputs through as they are.
    produced = torch.arange(8, dtype=torch.float32).view(4, 2)
    model.handler.postprocess = lambda data: {"y": produced}  # type: ignore[method-assign]
    assert model.run({"a": a, "b": b})["y"] is produced


def test_non_contiguous_outputs_become_contiguous(model_dirs, load) -> None:
    model = load(
        *model_dirs.make(
            TupleModel(),
            (spec("x", "FP32", -1, 3),),
            (spec("d", "FP32", -1, 3), spec("t", "FP32", -1, 1)),
        )
    )
    strided = torch.arange(12, dtype=torch.float32).view(3, 4).t()[:, :3]
    model.handler.postprocess = lambda data: {"d": strided, "t": torch.ones(4, 1)}  # type: ignore[method-assign]
    out = model.run({"x": torch.ones(4, 3)})
    assert out["d"].is_contiguous() and torch.equal(out["d"], strided)


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ({}, "output 'y' (FP32) is nothing"),
        ({"y": torch.ones(3, 4)}, "output 'y' has 3 rows for a batch of 2"),
        (
            {"y": torch.ones(2, 4, dtype=torch.float64)},
            "output 'y' is torch.float64, the signature says FP32",
        ),
        ({"y": BytesTensor([b"a", b"b"], (2,))}, "output 'y' (FP32) is BytesTensor"),
    ],
)
def test_output_contract_is_checked(model_dirs, mlp, load, outputs, message) -> None:
    model = load(*model_dirs.make(mlp, MLP_IN, MLP_OUT))
    model.handler.postprocess = lambda data: outputs  # type: ignore[method-assign]
    with pytest.raises(EdgeserveError) as info:
        model.run({"x": torch.ones(2, 16)})
    assert str(info.value) == f"model 'm' version '1': handler broke the output contract: {message}"


def test_handler_errors_propagate_unchanged(model_dirs, load) -> None:
    io = (spec("x", "FP32", -1, 2),)
    model = load(*model_dirs.make(RaiseOnFlag(), io, io))
    assert model.run({"x": torch.zeros(2, 2)})["x"].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    flagged = torch.tensor([[0.0, 13.0]])
    with pytest.raises(torch.jit.Error) as info:
        model.run({"x": flagged})
    with pytest.raises(torch.jit.Error) as direct:
        model.module(flagged)
    assert str(info.value) == str(direct.value) and "flag value 13 seen" in str(info.value)
    # The model stays usable after a failed batch.
    assert model.run({"x": torch.zeros(1, 2)})["x"].tolist() == [[1.0, 1.0]]


def test_missing_input_is_an_invalid_argument(model_dirs, mlp, load) -> None:
    model = load(*model_dirs.make(mlp, MLP_IN, MLP_OUT))
    with pytest.raises(InvalidArgument, match="model 'm' input 'x': is missing"):
        model.run({"z": torch.ones(1, 16)})


def test_bytes_inputs_are_refused_by_the_tensor_handler(model_dirs, load) -> None:
    made = model_dirs.make(TupleModel(), (spec("text", "BYTES", -1),), (spec("y", "FP32", -1, 1),))
    with pytest.raises(
        ArchiveError, match="handler 'tensor' failed to initialize: .*input 'text' is BYTES"
    ):
        load(*made)


def test_unknown_handler_lists_the_builtins(model_dirs, mlp, load) -> None:
    made = model_dirs.make(mlp, MLP_IN, MLP_OUT, handler="object_detector")
    with pytest.raises(ArchiveError) as info:
        load(*made)
    assert str(info.value) == (
        "model 'm' version '1': unknown handler 'object_detector' "
        "(built-in handlers: image_classifier, tensor)"
    )
    with pytest.raises(LookupError):
        get_handler_class("object_detector")


def test_corrupt_model_file(model_dirs, mlp, load) -> None:
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT)
    (model_dir / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(ArchiveError, match="'model.pt' is not a loadable TorchScript file"):
        load(model_dir, manifest)


def test_one_loader_per_format(model_dirs, mlp, load, monkeypatch) -> None:
    assert set(LOADERS) == {"torchscript"}
    seen = []

    def fake_format(model_dir, manifest, device):
        seen.append(device)
        return torch.jit.script(TupleModel())

    monkeypatch.setitem(LOADERS, "pt2", fake_format)
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT)
    from dataclasses import replace

    with pytest.raises(ArchiveError, match="format 'onnx' has no loader .known: pt2, torchscript."):
        load(model_dir, replace(manifest, format="onnx"))
    loaded = load(
        model_dir,
        replace(
            manifest, format="pt2", outputs=(spec("d", "FP32", -1, 16), spec("t", "FP32", -1, 1))
        ),
    )
    assert seen == [torch.device("cpu")]
    assert torch.equal(loaded.run({"x": torch.ones(1, 16)})["d"], torch.full((1, 16), 2.0))


def test_close_releases_and_is_idempotent(model_dirs, mlp) -> None:
    model = load_model(*model_dirs.make(mlp, MLP_IN, MLP_OUT), CPU)
    model.close()
    model.close()
    with pytest.raises(NotReady, match="state: closed"):
        model.run({"x": torch.ones(1, 16)})


def test_handler_sees_the_model_context(model_dirs, mlp, load) -> None:
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT, handler_config={"k": 1})
    model = load(model_dir, manifest)
    context = model.handler.context
    assert isinstance(context, HandlerContext)
    assert context.model is model.module and context.model_dir == model_dir
    assert context.config == {"k": 1} and context.inputs == MLP_IN and context.compute_dtype is None
    assert "edgeserve.serving.runtime" in sys.modules


def test_half_compute_casts_inputs_and_outputs(model_dirs, mlp) -> None:
    """The fp16 path of a GPU, exercised on the CPU (torch has half kernels there too)."""
    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT)
    cpu = torch.device("cpu")
    module = torch.jit.load(str(model_dir / "model.pt")).eval().half()
    handler = TensorHandler()
    handler.initialize(
        HandlerContext(module, cpu, MLP_IN, MLP_OUT, model_dir, compute_dtype=torch.float16)
    )
    x = torch.randn(8, 16)
    assert handler.preprocess({"x": x})[0].dtype == torch.float16
    model = LoadedModel(
        manifest, model_dir, cpu, module, handler, (MLP_IN, MLP_OUT), compute_dtype=torch.float16
    )
    with torch.inference_mode():
        expected = mlp(x)
    got = model.run({"x": x})["y"]
    assert got.dtype == torch.float32 and not torch.equal(got, expected)
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-2)
    model.close()


def test_members_outside_the_manifest_or_directory_are_refused(model_dirs, mlp) -> None:
    from dataclasses import replace

    from edgeserve.archive.format import member_path

    model_dir, manifest = model_dirs.make(mlp, MLP_IN, MLP_OUT)
    assert member_path(model_dir, manifest, "model.pt") == (model_dir / "model.pt").resolve()
    with pytest.raises(ArchiveError, match="'notes.txt' is not a member of the archive"):
        member_path(model_dir, manifest, "notes.txt")
    escaping = replace(manifest, files={**manifest.files, "../model.pt": "0" * 64})
    with pytest.raises(ArchiveError, match="'../model.pt' is not a member"):
        member_path(model_dir, escaping, "../model.pt")


def test_instances_may_run_one_model_concurrently(model_dirs, mlp, load) -> None:
    from concurrent.futures import ThreadPoolExecutor

    model = load(*model_dirs.make(mlp, MLP_IN, MLP_OUT))
    batches = [torch.randn(n % 7 + 1, 16) for n in range(40)]
    with torch.inference_mode():
        expected = [mlp(x) for x in batches]
    # The OpenMP thread count is per thread: give the pool the main thread's, as the worker
    # does for its instance threads, or gemm splits its sums differently (~1e-7 apart).
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(4, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        results = list(pool.map(lambda x: model.run({"x": x})["y"], batches))
    assert all(torch.equal(got, want) for got, want in zip(results, expected, strict=True))
