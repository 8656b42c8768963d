"""Hostile requests the codec must answer precisely and cheaply (issue 10, items 11-12).

The tests of names, shapes and BYTES charges fail on the codec before issue 10 (names
echoed whole, zero-element shapes with huge dims reaching torch as INTERNAL, BYTES
elements charged only their bytes). The typed-contents peaks pass on it too: protobuf's
upb containers hand numpy their array (``__array__``), so ``np.asarray`` never made an
object per element; they guard that path against a per-element decoder.
"""

from __future__ import annotations

import tracemalloc

import grpc
import numpy as np
import pytest
import torch

from edgeserve.api.codec import decode_infer_request, join_elements
from edgeserve.errors import InvalidArgument, MessageTooLarge
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.serving.registry import LiveModel
from edgeserve.types import InferRequest, InferResult
from tests.api.support import Api, live_model

LONG = "n" * 20_000
ECHOED = 128  # errors.ECHO_LIMIT


async def _never(request: InferRequest) -> InferResult:
    raise AssertionError("the decoding tests never run a model")


def model(name: str, datatype: str, shape: tuple[int, ...]) -> LiveModel:
    return live_model("m", [(name, datatype, shape)], [("y", "FP32", (-1,))], _never)


def status_of(api: Api, call: str, request) -> grpc.RpcError:
    with api.channel() as channel, pytest.raises(grpc.RpcError) as info:
        getattr(api.stub(channel), call)(request, timeout=10)
    return info.value


def clipped(message: str) -> bool:
    return "n" * ECHOED not in message and "n…'" in message


def test_a_20000_character_model_name_is_not_found_with_the_name_clipped(api: Api) -> None:
    err = status_of(api, "ModelInfer", pb.ModelInferRequest(model_name=LONG))
    assert err.code() is grpc.StatusCode.NOT_FOUND, err.details()
    assert clipped(err.details()) and len(err.details()) < 300
    err = status_of(api, "ModelMetadata", pb.ModelMetadataRequest(name=LONG))
    assert err.code() is grpc.StatusCode.NOT_FOUND and clipped(err.details())
    request = pb.ModelInferRequest(model_name="twice_fp32", model_version=LONG)
    err = status_of(api, "ModelInfer", request)
    assert err.code() is grpc.StatusCode.NOT_FOUND and clipped(err.details())


def test_long_input_output_and_parameter_names_are_clipped(api: Api) -> None:
    request = pb.ModelInferRequest(model_name="twice_fp32")
    request.inputs.add(name=LONG, datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(1)
    err = status_of(api, "ModelInfer", request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and clipped(err.details())
    request = pb.ModelInferRequest(model_name="twice_fp32")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 1]).contents.fp32_contents.append(1)
    request.outputs.add(name=LONG)
    err = status_of(api, "ModelInfer", request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and clipped(err.details())
    request.ClearField("outputs")
    request.parameters["triton_" + LONG].bool_param = True
    err = status_of(api, "ModelInfer", request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT and clipped(err.details())


def test_a_shape_with_thousands_of_dims_is_echoed_clipped(api: Api) -> None:
    request = pb.ModelInferRequest(model_name="twice_fp32")
    request.inputs.add(name="x", datatype="FP32", shape=[1] * 5000)
    err = status_of(api, "ModelInfer", request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in (err.details() or "") and len(err.details() or "") < 400


@pytest.mark.parametrize(
    "shape",
    [[1, 0, 2**40, 2**40], [1, 0, 2**63 - 1, 4], [1, 2**62, 0, 2]],
    ids=["2^80", "int64-max", "zero-inside"],
)
def test_zero_element_tensors_with_huge_dims_are_invalid_argument(shape: list[int]) -> None:
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b""])
    request.inputs.add(name="x", datatype="FP32", shape=shape)
    with pytest.raises(InvalidArgument, match=r"'x': shape .* has more than 2147483647 elements"):
        decode_infer_request(request, model("x", "FP32", (-1, -1, -1, -1)))


def test_a_zero_element_tensor_of_sane_dims_still_decodes() -> None:
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[b""])
    request.inputs.add(name="x", datatype="FP32", shape=[1, 0, 1000, 4])
    decoded = decode_infer_request(request, model("x", "FP32", (-1, -1, -1, -1)))
    assert decoded.inputs["x"].shape == (1, 0, 1000, 4)


def _decode_peak(request: pb.ModelInferRequest, spec: LiveModel) -> tuple[torch.Tensor, int]:
    tracemalloc.start()
    try:
        tensor = decode_infer_request(request, spec).inputs["x"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(tensor, torch.Tensor)
    return tensor, peak


@pytest.mark.parametrize(
    ("datatype", "field", "values"),
    [
        ("FP32", "fp32_contents", np.linspace(-1, 1, 200_000, dtype=np.float32)),
        ("FP64", "fp64_contents", np.linspace(-1, 1, 200_000)),
        ("INT64", "int64_contents", np.arange(-100_000, 100_000, dtype=np.int64)),
        ("INT8", "int_contents", (np.arange(200_000) % 200 - 100).astype(np.int8)),
        ("BOOL", "bool_contents", np.arange(200_000) % 3 == 0),
    ],
    ids=["fp32", "fp64", "int64", "int8", "bool"],
)
def test_typed_contents_decode_without_an_object_per_element(datatype, field, values) -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[1, values.size])
    getattr(tensor.contents, field).extend(values.tolist())
    decoded, peak = _decode_peak(request, model("x", datatype, (-1, -1)))
    np.testing.assert_array_equal(decoded.numpy().ravel(), values)
    # The result, plus at most a same-sized copy and a 4-byte int per element for the
    # narrowed types; an object per element would be >= 32 bytes each.
    assert peak <= 2 * decoded.nbytes + 4 * values.size + 64 * 1024, peak


def test_typed_contents_in_two_fields_are_refused() -> None:
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 2])
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    tensor.contents.int_contents.append(3)
    with pytest.raises(InvalidArgument, match="contents.int_contents is set"):
        decode_infer_request(request, model("x", "FP32", (-1, -1)))


def test_bytes_elements_are_charged_what_they_cost_in_memory() -> None:
    # 100,000 two-byte elements: 600 kB on the wire, ~5.8 MB as a list of bytes objects.
    data = join_elements([b"ab"] * 100_000)
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[data])
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 100_000])
    spec = model("x", "BYTES", (-1, -1))
    with pytest.raises(MessageTooLarge, match="exceed 1048576 bytes at input 'x'"):
        decode_infer_request(request, spec, max_bytes=1 << 20)
    assert decode_infer_request(request, spec, max_bytes=8 << 20).inputs["x"].shape == (
        1,
        100_000,
    )
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="BYTES", shape=[1, 100_000])
    typed.inputs[0].contents.bytes_contents.extend([b"ab"] * 100_000)
    with pytest.raises(MessageTooLarge, match="at input 'x'"):
        decode_infer_request(typed, spec, max_bytes=1 << 20)


def test_empty_bytes_elements_cost_a_pointer_each() -> None:
    # Empty elements share one object: 4 bytes on the wire become an 8-byte list slot.
    data = join_elements([b""] * 100_000)
    request = pb.ModelInferRequest(model_name="m", raw_input_contents=[data])
    request.inputs.add(name="x", datatype="BYTES", shape=[1, 100_000])
    spec = model("x", "BYTES", (-1, -1))
    decoded = decode_infer_request(request, spec, max_bytes=1 << 20)
    assert decoded.inputs["x"].shape == (1, 100_000)
    with pytest.raises(MessageTooLarge):
        decode_infer_request(request, spec, max_bytes=700_000)


def test_typed_int64_values_are_charged_at_their_decoded_width() -> None:
    # One-byte varints become 8-byte int64s: the limit applies to the 8 bytes.
    request = pb.ModelInferRequest(model_name="m")
    tensor = request.inputs.add(name="x", datatype="INT64", shape=[1, 1000])
    tensor.contents.int64_contents.extend([1] * 1000)
    with pytest.raises(MessageTooLarge, match="exceed 4000 bytes"):
        decode_infer_request(request, model("x", "INT64", (-1, -1)), max_bytes=4000)
