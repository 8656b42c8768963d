"""Replies in raw form, and Triton's request parameters honoured or refused (issue 11).

Through stock ``tritonclient`` where it can send the parameter, through our stubs where
it cannot (shared memory needs a registered region on the client side).
"""

from __future__ import annotations

import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from edgeserve.proto import kserve_v2_pb2 as pb
from tests.api.support import Api

X = np.array([[1.0, -2.5, 4.0]], dtype=np.float32)


def fp32_input(x: np.ndarray = X) -> triton.InferInput:
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


def typed_request(model: str = "twice_fp32") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id="t")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=list(X.shape))
    tensor.contents.fp32_contents.extend(X.ravel().tolist())
    return request


def infer(api: Api, request: pb.ModelInferRequest) -> pb.ModelInferResponse:
    with api.channel() as channel:
        return api.stub(channel).ModelInfer(request, timeout=10)


def refused(api: Api, request: pb.ModelInferRequest) -> str:
    with api.channel() as channel, pytest.raises(grpc.RpcError) as info:
        api.stub(channel).ModelInfer(request, timeout=10)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return info.value.details() or ""


def test_a_typed_request_gets_a_raw_reply_that_every_reader_handles(api: Api) -> None:
    reply = infer(api, typed_request())
    assert not reply.outputs[0].HasField("contents")
    (out,) = reply.outputs
    assert (out.name, out.datatype, list(out.shape), reply.id) == ("y", "FP32", [1, 3], "t")
    served = np.frombuffer(reply.raw_output_contents[0], np.float32).reshape(1, 3)
    np.testing.assert_array_equal(served, X * 2)
    # The Triton explicit-contents examples read raw_output_contents through as_numpy.
    result = triton.InferResult(reply)
    np.testing.assert_array_equal(result.as_numpy("y"), X * 2)


def test_typed_output_contents_asks_for_a_typed_reply(api: Api) -> None:
    request = typed_request()
    request.parameters["typed_output_contents"].bool_param = True
    reply = infer(api, request)
    assert not reply.raw_output_contents
    assert list(reply.outputs[0].contents.fp32_contents) == (X * 2).ravel().tolist()
    request.parameters["typed_output_contents"].string_param = "yes"
    assert "'typed_output_contents' must be a bool" in refused(api, request)


@pytest.mark.parametrize(
    ("kwargs", "parameter"),
    [
        ({"sequence_id": 7, "sequence_start": True}, "sequence_"),  # either is named
        ({"sequence_id": "conversation-1"}, "sequence_id'"),
    ],
    ids=["int-id", "string-id"],
)
def test_sequence_requests_are_refused_naming_the_parameter(api: Api, kwargs, parameter) -> None:
    with api.triton() as client, pytest.raises(triton.InferenceServerException) as info:
        client.infer("twice_fp32", [fp32_input()], **kwargs)
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert f"parameter '{parameter}" in info.value.message()
    assert "is not supported" in info.value.message()
    assert "sequences" in info.value.message()


@pytest.mark.parametrize("key", ["sequence_start", "sequence_end"])
def test_sequence_flags_alone_are_refused(api: Api, key: str) -> None:
    request = typed_request()
    request.parameters[key].bool_param = True
    assert f"parameter '{key}' is not supported" in refused(api, request)


def test_parameters_at_their_off_value_ask_for_nothing(api: Api) -> None:
    request = typed_request()
    request.parameters["sequence_id"].int64_param = 0
    request.parameters["sequence_start"].bool_param = False
    request.parameters["sequence_end"].bool_param = False
    request.parameters["triton_enable_empty_final_response"].bool_param = False
    assert infer(api, request).outputs[0].name == "y"


def test_reserved_triton_parameters_are_refused(api: Api) -> None:
    request = typed_request()
    request.parameters["triton_new_feature"].bool_param = True
    message = refused(api, request)
    assert "parameter 'triton_new_feature' is not supported" in message


def test_empty_final_response_is_ignored_as_triton_does_for_models_not_decoupled(
    api: Api,
) -> None:
    # perf_analyzer sends it true on every request.
    request = typed_request()
    request.parameters["triton_enable_empty_final_response"].bool_param = True
    assert infer(api, request).outputs[0].name == "y"


def test_classification_is_refused_naming_the_output(api: Api) -> None:
    output = triton.InferRequestedOutput("y", class_count=3)
    with api.triton() as client, pytest.raises(triton.InferenceServerException) as info:
        client.infer("twice_fp32", [fp32_input()], outputs=[output])
    assert info.value.status() == "StatusCode.INVALID_ARGUMENT"
    message = info.value.message()
    assert "output 'y'" in message and "parameter 'classification' is not supported" in message


def test_shared_memory_inputs_and_outputs_are_refused(api: Api) -> None:
    request = pb.ModelInferRequest(model_name="twice_fp32")
    tensor = request.inputs.add(name="x", datatype="FP32", shape=[1, 3])
    tensor.parameters["shared_memory_region"].string_param = "input_data"
    tensor.parameters["shared_memory_byte_size"].int64_param = 12
    message = refused(api, request)
    assert "input 'x': parameter 'shared_memory_" in message and "not supported" in message
    request = typed_request()
    out = request.outputs.add(name="y")
    out.parameters["shared_memory_region"].string_param = "output_data"
    assert "output 'y'" in refused(api, request)


def test_harmless_parameters_are_accepted(api: Api) -> None:
    with api.triton() as client:
        result = client.infer(
            "twice_fp32", [fp32_input()], priority=2, parameters={"my_custom_value": 42}
        )
    np.testing.assert_array_equal(result.as_numpy("y"), X * 2)
    request = typed_request()
    request.parameters["binary_data_output"].bool_param = True
    request.parameters["headers"].string_param = "x"
    assert infer(api, request).outputs[0].name == "y"


def test_the_timeout_parameter_becomes_the_requests_deadline(api: Api) -> None:
    api.recorder.deadlines.clear()
    with api.triton() as client:
        before = time.monotonic()
        client.infer("deadline", [fp32_input()], timeout=2_000_000)  # microseconds
        client.infer("deadline", [fp32_input()], timeout=60_000_000, client_timeout=3.0)
    after = time.monotonic()
    from_timeout, from_call = api.recorder.deadlines
    assert from_timeout is not None and before + 2.0 <= from_timeout <= after + 2.0
    # The earlier of the call's gRPC deadline and the parameter wins.
    assert from_call is not None and from_call <= after + 3.5
    request = typed_request("deadline")
    request.parameters["timeout"].int64_param = -5
    assert "parameter 'timeout' must be a whole number" in refused(api, request)
