"""The codec on its own: zero-copy raw inputs, edge cases, encodings, the status table."""

from __future__ import annotations

import ctypes
import gc
import sys
import warnings

import grpc
import numpy as np
import pytest
import torch

from edgeserve.api.codec import (
    decode_infer_request,
    encode_infer_response,
    encode_model_metadata,
    join_elements,
    request_uses_raw,
)
from edgeserve.api.errors import STATUS_OF_KIND, describe_error
from edgeserve.errors import (
    EdgeserveError,
    InvalidArgument,
    Kind,
    MessageTooLarge,
    NotFound,
    PermissionDenied,
    Unauthenticated,
)
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.serving.registry import LiveModel
from edgeserve.types import BytesTensor, InferRequest, InferResult
from tests.api.support import live_model

_BYTES_HEADER = sys.getsizeof(b"") - 1  # offset of a bytes object's data in CPython


async def _never(request: InferRequest) -> InferResult:
    raise AssertionError("the codec tests never run a model")


def model(inputs, outputs=(("y", "FP32", (-1, -1)),), max_batch_size: int = 8) -> LiveModel:
    return live_model("m", list(inputs), list(outputs), _never, max_batch_size=max_batch_size)


def raw_request(*inputs: tuple[str, str, list[int], bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="m", id="i")
    for name, datatype, shape, data in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    return request


def aliases_a_bytes_object(tensor: torch.Tensor) -> bool:
    """True when the tensor's data is the payload of a live CPython bytes object."""
    base = tensor.data_ptr() - _BYTES_HEADER
    ob_type = ctypes.c_void_p.from_address(base + 8).value
    ob_size = ctypes.c_ssize_t.from_address(base + 16).value
    return ob_type == id(bytes) and ob_size == tensor.numel() * tensor.element_size()


def test_raw_numeric_inputs_are_views_over_the_request_bytes() -> None:
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's read-only buffer warning must not surface
        request = decode_infer_request(
            raw_request(("x", "FP32", [3, 4], x.tobytes())), model([("x", "FP32", (-1, 4))])
        )
    tensor = request.inputs["x"]
    assert isinstance(tensor, torch.Tensor)
    assert aliases_a_bytes_object(tensor)
    gc.collect()
    _ = [bytes(64) for _ in range(1000)]  # churn the allocator: the view must stay valid
    np.testing.assert_array_equal(tensor.numpy(), x)
    assert (request.request_id, request.batch_size, request.version) == ("i", 3, "1")


def test_typed_inputs_are_copies_and_the_check_can_tell() -> None:
    request = pb.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(
        [1, 2, 3, 4]
    )
    decoded = decode_infer_request(request, model([("x", "FP32", (-1, 4))]))
    assert not aliases_a_bytes_object(decoded.inputs["x"])
    assert decoded.inputs["x"].tolist() == [[1, 2, 3, 4]]


def test_replies_are_raw_unless_the_request_asks_for_typed_contents() -> None:
    typed = pb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1]).contents.fp32_contents.append(1)
    assert request_uses_raw(typed)  # as Triton answers, whatever form the request used
    typed.parameters["typed_output_contents"].bool_param = True
    assert not request_uses_raw(typed)
    typed.parameters["typed_output_contents"].bool_param = False
    assert request_uses_raw(typed)


def test_one_byte_inputs_never_alias_cpythons_shared_bytes() -> None:
    request = decode_infer_request(
        raw_request(("x", "UINT8", [1, 1], b"\x05")), model([("x", "UINT8", (-1, 1))])
    )
    tensor = request.inputs["x"]
    tensor[0, 0] = 9
    assert b"\x05"[0] == 5 and tensor.item() == 9


def test_empty_inputs_decode_to_empty_tensors() -> None:
    request = decode_infer_request(
        raw_request(("x", "FP32", [1, 0], b"")),
        model([("x", "FP32", (-1, -1))], max_batch_size=1),
    )
    assert request.inputs["x"].shape == (1, 0)


def test_a_batching_model_with_max_batch_size_1_takes_one_row_per_request() -> None:
    batching = model([("x", "FP32", (-1, 3))], max_batch_size=1)
    one = decode_infer_request(raw_request(("x", "FP32", [1, 3], bytes(12))), batching)
    assert one.batch_size == 1
    with pytest.raises(InvalidArgument, match=r"'x': batch size 3 \(dim 0\) is outside 1..1"):
        decode_infer_request(raw_request(("x", "FP32", [3, 3], bytes(36))), batching)
    fixed = model([("x", "FP32", (3, 3))], max_batch_size=1)
    assert decode_infer_request(raw_request(("x", "FP32", [3, 3], bytes(36))), fixed).batch_size


def test_bool_bytes_other_than_0_and_1_are_refused() -> None:
    with pytest.raises(InvalidArgument, match="'x': BOOL elements must be 0 or 1"):
        decode_infer_request(
            raw_request(("x", "BOOL", [1, 2], b"\x01\x02")), model([("x", "BOOL", (-1, 2))])
        )


def test_bytes_round_trip_through_the_wire_format() -> None:
    items = [b"", b"a", "é".encode(), bytes(range(256))]
    request = decode_infer_request(
        raw_request(("t", "BYTES", [2, 2], join_elements(items))),
        model([("t", "BYTES", (-1, 2))]),
    )
    tensor = request.inputs["t"]
    assert isinstance(tensor, BytesTensor)
    assert tensor.items == items and tensor.shape == (2, 2)


def test_duplicate_input_and_max_bytes() -> None:
    spec = model([("x", "FP32", (-1, -1))])
    data = bytes(16)
    with pytest.raises(InvalidArgument, match="'x': appears more than once"):
        decode_infer_request(
            raw_request(("x", "FP32", [1, 4], data), ("x", "FP32", [1, 4], data)), spec
        )
    with pytest.raises(MessageTooLarge, match="exceed 8 bytes at input 'x'"):
        decode_infer_request(raw_request(("x", "FP32", [1, 4], data)), spec, max_bytes=8)
    assert decode_infer_request(raw_request(("x", "FP32", [1, 4], data)), spec, max_bytes=16)


def test_negative_dims_and_batch_zero_are_refused() -> None:
    spec = model([("x", "FP32", (-1, -1))])
    with pytest.raises(InvalidArgument, match=r"shape \[1, -2\]"):
        decode_infer_request(raw_request(("x", "FP32", [1, -2], b"")), spec)
    with pytest.raises(InvalidArgument, match="batch size 0"):
        decode_infer_request(raw_request(("x", "FP32", [0, 4], b"")), spec)


def test_deadline_and_requested_outputs_are_carried() -> None:
    request = raw_request(("x", "FP32", [1, 1], bytes(4)))
    request.outputs.add(name="y")
    decoded = decode_infer_request(request, model([("x", "FP32", (-1, 1))]), deadline=12.5)
    assert decoded.deadline == 12.5
    assert decoded.requested_outputs == ("y",)


def result(**outputs) -> InferResult:
    return InferResult("m", "1", outputs, request_id="r")


def test_raw_encoding_of_every_kind_of_output() -> None:
    spec = model([("x", "FP32", (-1, -1))])
    strided = torch.arange(12, dtype=torch.int32).reshape(3, 4).t()  # not contiguous
    bf16 = torch.tensor([[1.5, -2.0]], dtype=torch.bfloat16)
    words = BytesTensor([b"ab", b""], (2,))
    reply = encode_infer_response(result(s=strided, b=bf16, w=words), spec)
    assert [(o.name, o.datatype, list(o.shape)) for o in reply.outputs] == [
        ("s", "INT32", [4, 3]),
        ("b", "BF16", [1, 2]),
        ("w", "BYTES", [2]),
    ]
    raw = reply.raw_output_contents
    np.testing.assert_array_equal(np.frombuffer(raw[0], np.int32).reshape(4, 3), strided.numpy())
    assert torch.frombuffer(bytearray(raw[1]), dtype=torch.bfloat16).tolist() == [1.5, -2.0]
    assert raw[2] == b"\x02\x00\x00\x00ab\x00\x00\x00\x00"
    assert (reply.model_name, reply.model_version, reply.id) == ("m", "1", "r")


def test_requested_outputs_pick_and_order() -> None:
    spec = model([("x", "FP32", (-1, -1))])
    outputs = {"a": torch.zeros(1), "b": torch.ones(1)}
    reply = encode_infer_response(result(**outputs), spec, requested=("b",), request_id="x")
    assert [o.name for o in reply.outputs] == ["b"] and reply.id == "x"


def test_typed_encoding_falls_back_to_raw_when_an_output_has_no_field() -> None:
    spec = model([("x", "FP32", (-1, -1))])
    typed = encode_infer_response(result(a=torch.tensor([1, 2], dtype=torch.int8)), spec, raw=False)
    assert list(typed.outputs[0].contents.int_contents) == [1, 2]
    assert not typed.raw_output_contents
    mixed = encode_infer_response(
        result(a=torch.tensor([1], dtype=torch.int8), h=torch.tensor([1.0], dtype=torch.float16)),
        spec,
        raw=False,
    )
    assert len(mixed.raw_output_contents) == 2
    assert not mixed.outputs[0].contents.int_contents


def test_model_faults_in_outputs_are_internal_errors_without_data() -> None:
    spec = model([("x", "FP32", (-1, -1))])
    with pytest.raises(EdgeserveError, match="produced no output 'zz'") as info:
        encode_infer_response(result(y=torch.zeros(1)), spec, requested=("zz",))
    assert info.value.kind is Kind.INTERNAL
    with pytest.raises(EdgeserveError, match="complex64"):
        encode_infer_response(result(y=torch.zeros(1, dtype=torch.complex64)), spec)


def test_model_metadata_encoding() -> None:
    spec = model([("x", "FP32", (-1, 4))], outputs=[("y", "INT64", (-1,))])
    reply = encode_model_metadata(spec, ["1", "3"])
    assert (reply.name, list(reply.versions), reply.platform) == (
        "m",
        ["1", "3"],
        "pytorch_torchscript",
    )
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in reply.outputs] == [("y", "INT64", [-1])]


def test_status_table_covers_every_kind() -> None:
    assert set(STATUS_OF_KIND) == set(Kind)
    assert STATUS_OF_KIND[Kind.OVERLOADED] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert STATUS_OF_KIND[Kind.TOO_LARGE] is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert STATUS_OF_KIND[Kind.EXPIRED] is grpc.StatusCode.DEADLINE_EXCEEDED
    assert STATUS_OF_KIND[Kind.NOT_READY] is grpc.StatusCode.UNAVAILABLE
    assert describe_error(NotFound.model("m"), "X") == (
        grpc.StatusCode.NOT_FOUND,
        "model 'm' is not loaded",
    )
    code, message = describe_error(ValueError("secret 42"), "X")
    assert code is grpc.StatusCode.INTERNAL and "secret" not in message


def test_refused_callers_map_to_unauthenticated_or_permission_denied() -> None:
    # Unauthenticated (no or wrong token) and PermissionDenied (known but not allowed) are
    # distinct kinds, and the message goes out unchanged.
    assert Unauthenticated("wrong management token").kind is Kind.UNAUTHENTICATED
    assert isinstance(Unauthenticated("x"), EdgeserveError)
    assert describe_error(Unauthenticated("wrong management token"), "ListModels") == (
        grpc.StatusCode.UNAUTHENTICATED,
        "wrong management token",
    )
    assert describe_error(PermissionDenied("uid 1000 is not allowed"), "ListModels") == (
        grpc.StatusCode.PERMISSION_DENIED,
        "uid 1000 is not allowed",
    )
