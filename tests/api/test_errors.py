"""Every status code of DESIGN.md §3, as a stock client sees it."""

from __future__ import annotations

import logging
import re
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.serving.registry import ModelState
from tests.api.support import MAX_MESSAGE_BYTES, Api


def fp32_input(name: str, x: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput(name, list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def triton_error(api: Api, model: str, inputs, **kwargs) -> triton.InferenceServerException:
    with api.triton() as client, pytest.raises(triton.InferenceServerException) as info:
        client.infer(model, inputs, **kwargs)
    return info.value


def stub_error(api: Api, request: pb.ModelInferRequest) -> grpc.RpcError:
    with api.channel() as channel, pytest.raises(grpc.RpcError) as info:
        api.stub(channel).ModelInfer(request, timeout=10)
    return info.value


def raw_request(model: str, *inputs: tuple[str, str, list[int], bytes]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for name, datatype, shape, data in inputs:
        request.inputs.add(name=name, datatype=datatype, shape=shape)
        request.raw_input_contents.append(data)
    return request


X = np.ones((1, 3), dtype=np.float32)


def test_unknown_model_and_version_are_not_found(api: Api) -> None:
    err = triton_error(api, "nope", [fp32_input("x", X)])
    assert err.status() == "StatusCode.NOT_FOUND"
    assert "'nope'" in err.message()
    err = triton_error(api, "twice_fp32", [fp32_input("x", X)], model_version="42")
    assert err.status() == "StatusCode.NOT_FOUND"
    assert "'42'" in err.message()
    with api.triton() as client, pytest.raises(triton.InferenceServerException) as info:
        client.get_model_metadata("nope")
    assert info.value.status() == "StatusCode.NOT_FOUND"


@pytest.mark.parametrize(
    ("inputs", "needles"),
    [
        ([("x", np.ones((1, 3), dtype=np.int32), "INT32")], ["'x'", "FP32", "INT32"]),
        ([("x", np.ones((3,), dtype=np.float32), "FP32")], ["'x'", "[3]", "[-1, -1]"]),
        ([("z", X, "FP32")], ["'z'", "not an input"]),
        ([("x", np.ones((9, 3), dtype=np.float32), "FP32")], ["'x'", "batch size 9", "1..8"]),
    ],
    ids=["wrong-dtype", "wrong-rank", "unknown-input", "batch-too-large"],
)
def test_bad_inputs_are_invalid_argument_naming_the_input(api: Api, inputs, needles) -> None:
    infer_inputs = []
    for name, array, datatype in inputs:
        inp = triton.InferInput(name, list(array.shape), datatype)
        inp.set_data_from_numpy(array)
        infer_inputs.append(inp)
    err = triton_error(api, "twice_fp32", infer_inputs)
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    for needle in needles:
        assert needle in err.message()


def test_missing_input_and_mismatched_batch(api: Api) -> None:
    err = triton_error(api, "pair", [fp32_input("a", np.ones((2, 4), dtype=np.float32))])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'b'" in err.message() and "missing" in err.message()
    b = triton.InferInput("b", [3], "INT64")
    b.set_data_from_numpy(np.ones(3, dtype=np.int64))
    err = triton_error(api, "pair", [fp32_input("a", np.ones((2, 4), dtype=np.float32)), b])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'b'" in err.message() and "batch size 3" in err.message()


def test_fixed_dims_are_checked(api: Api) -> None:
    err = triton_error(api, "pair", [fp32_input("a", np.ones((2, 5), dtype=np.float32))])
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'a'" in err.message() and "[2, 5]" in err.message()
    err = triton_error(api, "fixed", [fp32_input("x", np.ones((3, 3), dtype=np.float32))])
    assert "'x'" in err.message() and "[2, 3]" in err.message()


def test_unknown_requested_output(api: Api) -> None:
    err = triton_error(
        api, "twice_fp32", [fp32_input("x", X)], outputs=[triton.InferRequestedOutput("zz")]
    )
    assert err.status() == "StatusCode.INVALID_ARGUMENT"
    assert "'zz'" in err.message()


def test_raw_byte_size_mismatch_names_the_input(api: Api) -> None:
    err = stub_error(api, raw_request("twice_fp32", ("x", "FP32", [1, 3], b"\x00" * 10)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in err.details() and "10 bytes" in err.details() and "12" in err.details()


def test_raw_count_mismatch(api: Api) -> None:
    request = raw_request("twice_fp32", ("x", "FP32", [1, 3], bytes(12)))
    request.raw_input_contents.append(bytes(12))
    err = stub_error(api, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "raw_input_contents has 2 entries for 1 inputs" in err.details()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        (b"\x02\x00\x00\x00ab\x05\x00", "truncated"),
        (b"\x02\x00\x00\x00ab\x09\x00\x00\x00abc", "declares 9 bytes but only 3 remain"),
        (b"\x02\x00\x00\x00ab", "holds 1 elements, expected 2"),
        (b"\x01\x00\x00\x00a" * 3, "more than the 2 elements"),
    ],
    ids=["truncated-prefix", "overrun", "too-few", "too-many"],
)
def test_malformed_raw_bytes(api: Api, data: bytes, needle: str) -> None:
    err = stub_error(api, raw_request("upper", ("text", "BYTES", [2], data)))
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'text'" in err.details() and needle in err.details()


def test_typed_contents_errors(api: Api) -> None:
    request = pb.ModelInferRequest(model_name="twice_fp16")
    request.inputs.add(name="x", datatype="FP16", shape=[1, 1])
    err = stub_error(api, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "FP16 has no typed contents" in err.details()

    request = pb.ModelInferRequest(model_name="twice_int8")
    request.inputs.add(name="x", datatype="INT8", shape=[1, 2]).contents.int_contents.extend(
        [1, 300]
    )
    err = stub_error(api, request)
    assert "'x'" in err.details() and "INT8 range" in err.details()

    request = pb.ModelInferRequest(model_name="twice_fp32")
    request.inputs.add(name="x", datatype="FP32", shape=[1, 3]).contents.fp32_contents.extend(
        [1.0, 2.0]
    )
    err = stub_error(api, request)
    assert "holds 2 elements, expected 3" in err.details()


def test_mixing_raw_and_typed_is_invalid(api: Api) -> None:
    request = raw_request("pair", ("a", "FP32", [1, 4], bytes(16)), ("b", "INT64", [1], bytes(8)))
    request.inputs[1].contents.int64_contents.append(3)
    err = stub_error(api, request)
    assert err.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "'b'" in err.details() and "one or the other" in err.details()


def test_model_not_ready_is_unavailable(api: Api) -> None:
    api.set_state("flaky", "1", ModelState.DRAINING)
    try:
        err = triton_error(api, "flaky", [fp32_input("x", X)])
        assert err.status() == "StatusCode.UNAVAILABLE"
        assert "'flaky'" in err.message() and "DRAINING" in err.message()
        with api.triton() as client:
            assert not client.is_model_ready("flaky")
    finally:
        api.set_state("flaky", "1", ModelState.READY)


def test_message_over_the_limit_is_resource_exhausted(api: Api) -> None:
    big = np.zeros((1, MAX_MESSAGE_BYTES // 4 + 16), dtype=np.float32)
    err = triton_error(api, "twice_fp32", [fp32_input("x", big)])
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"
    small = np.zeros((1, MAX_MESSAGE_BYTES // 4 - 1024), dtype=np.float32)
    with api.triton() as client:
        assert client.infer("twice_fp32", [fp32_input("x", small)]).as_numpy("y").shape == (
            1,
            small.shape[1],
        )


def test_overloaded_is_resource_exhausted(api: Api) -> None:
    err = triton_error(api, "overloaded", [fp32_input("x", X)])
    assert err.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert "queue is full" in err.message()


def test_expired_is_deadline_exceeded(api: Api) -> None:
    err = triton_error(api, "expired", [fp32_input("x", X)])
    assert err.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert "deadline passed while queued" in err.message()


def test_deadline_reaches_the_model_as_absolute_monotonic_time(api: Api) -> None:
    api.recorder.deadlines.clear()
    with api.triton() as client:
        client.infer("deadline", [fp32_input("x", X)], client_timeout=5.0)
        client.infer("deadline", [fp32_input("x", X)])
    after = time.monotonic()
    with_deadline, without = api.recorder.deadlines
    # gRPC sends the timeout as a duration, so the server's deadline is measured from
    # when the call arrived: allow a little slack on the upper side.
    assert with_deadline is not None and after + 3.0 < with_deadline <= after + 5.5
    assert without is None


def test_internal_error_hides_input_data_and_carries_a_correlation_id(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    secret = np.array([[123.456, 789.25, 31337.5]], dtype=np.float32)
    with caplog.at_level(logging.ERROR, logger="edgeserve.api"):
        err = triton_error(api, "leaky", [fp32_input("x", secret)])
    assert err.status() == "StatusCode.INTERNAL"
    message = err.message()
    for value in ("123.45", "789.25", "31337"):
        assert value not in message
    match = re.search(r"correlation id ([0-9a-f]{12})", message)
    assert match, message
    logged = [r for r in caplog.records if match.group(1) in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
