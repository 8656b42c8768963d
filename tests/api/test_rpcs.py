"""Every KServe v2 RPC through stock tritonclient (and our stubs for typed contents)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tritonclient.grpc as triton

from edgeserve.dtypes import NUMPY_DTYPES
from edgeserve.proto import kserve_v2_pb2 as pb
from tests.api.support import NUMERIC, SCRIPTED, Api

RNG = np.random.default_rng(3)


def sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    if datatype == "BOOL":
        return RNG.integers(0, 2, shape).astype(np.bool_)
    dtype = NUMPY_DTYPES[datatype]
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return RNG.integers(max(info.min, -100), min(info.max, 100), shape).astype(dtype)
    return RNG.standard_normal(shape).astype(dtype)


def twice_in_process(x: np.ndarray) -> np.ndarray:
    with torch.inference_mode():
        return SCRIPTED["twice"](torch.from_numpy(x.copy())).numpy()


def test_server_live_ready_and_metadata(api: Api) -> None:
    with api.triton() as client:
        assert client.is_server_live()
        assert client.is_server_ready()
        meta = client.get_server_metadata()
        assert meta.name == "edgeserve"
        assert meta.version == "9.9.9-test"
        assert list(meta.extensions) == ["model_configuration", "statistics"]


def test_server_ready_follows_is_ready(api: Api) -> None:
    api.ready[0] = False
    try:
        with api.triton() as client:
            assert client.is_server_live()
            assert not client.is_server_ready()
    finally:
        api.ready[0] = True


def test_model_ready(api: Api) -> None:
    with api.triton() as client:
        assert client.is_model_ready("twice_fp32")
        assert client.is_model_ready("versioned", "1")
        assert client.is_model_ready("versioned", "2")
        assert not client.is_model_ready("nope")
        assert not client.is_model_ready("versioned", "7")


def test_model_metadata_and_version_selection(api: Api) -> None:
    with api.triton() as client:
        default = client.get_model_metadata("versioned")
        first = client.get_model_metadata("versioned", "1")
        as_json = client.get_model_metadata("pair", as_json=True)
    assert default.name == "versioned"
    assert list(default.versions) == ["1", "2"]
    assert default.platform == "pytorch_torchscript"
    assert [list(t.shape) for t in default.inputs] == [[-1, 5]]
    assert [list(t.shape) for t in first.inputs] == [[-1, -1]]
    assert [(t.name, t.datatype) for t in first.outputs] == [("y", "FP32")]
    assert [(t["name"], t["datatype"], t["shape"]) for t in as_json["inputs"]] == [
        ("a", "FP32", ["-1", "4"]),
        ("b", "INT64", ["-1"]),
    ]


@pytest.mark.parametrize("datatype", NUMERIC)
def test_raw_infer_every_numeric_datatype(api: Api, datatype: str) -> None:
    x = sample(datatype, (3, 5))
    inp = triton.InferInput("x", list(x.shape), datatype)
    inp.set_data_from_numpy(x)
    with api.triton() as client:
        result = client.infer(f"twice_{datatype.lower()}", [inp], request_id="r-1")
    served = result.as_numpy("y")
    assert served.dtype == x.dtype and served.shape == x.shape
    np.testing.assert_array_equal(served, twice_in_process(x))
    response = result.get_response()
    assert response.id == "r-1"
    assert response.model_version == "1"
    assert len(response.raw_output_contents) == 1


def test_raw_infer_bytes(api: Api) -> None:
    words = np.array([b"edge", "sérve".encode(), b"", b"x" * 300], dtype=np.object_)
    inp = triton.InferInput("text", [4], "BYTES")
    inp.set_data_from_numpy(words)
    with api.triton() as client:
        served = client.infer("upper", [inp]).as_numpy("upper")
    expected = SCRIPTED["upper"]([w.decode() for w in words.tolist()])
    assert served.tolist() == [e.encode() for e in expected]
    assert served.tolist()[0] == b"EDGE"


def test_infer_over_the_unix_socket(api: Api) -> None:
    x = sample("FP32", (2, 3))
    inp = triton.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x)
    with api.triton(api.uds) as client:
        served = client.infer("twice_fp32", [inp]).as_numpy("y")
    np.testing.assert_array_equal(served, x * 2)


def test_multiple_inputs_and_requested_outputs(api: Api) -> None:
    a = sample("FP32", (2, 4))
    b = np.array([5, -7], dtype=np.int64)
    inputs = [triton.InferInput("b", [2], "INT64"), triton.InferInput("a", [2, 4], "FP32")]
    inputs[0].set_data_from_numpy(b)
    inputs[1].set_data_from_numpy(a)
    with api.triton() as client:
        both = client.infer("pair", inputs)
        only = client.infer("pair", inputs, outputs=[triton.InferRequestedOutput("double")])
    np.testing.assert_array_equal(both.as_numpy("sum"), a + b[:, None].astype(np.float32))
    np.testing.assert_array_equal(both.as_numpy("double"), b * 2)
    assert [o.name for o in only.get_response().outputs] == ["double"]
    np.testing.assert_array_equal(only.as_numpy("double"), b * 2)


def test_version_selection_in_infer(api: Api) -> None:
    x = np.ones((1, 5), dtype=np.float32)
    inp = triton.InferInput("x", [1, 5], "FP32")
    inp.set_data_from_numpy(x)
    with api.triton() as client:
        default = client.infer("versioned", [inp])
        first = client.infer("versioned", [inp], model_version="1")
    assert default.get_response().model_version == "2"
    np.testing.assert_array_equal(default.as_numpy("y"), x * 3)
    assert first.get_response().model_version == "1"
    np.testing.assert_array_equal(first.as_numpy("y"), x * 2)


def test_unbatched_model_checks_the_first_dim_against_its_spec(api: Api) -> None:
    x = sample("FP32", (2, 3))
    inp = triton.InferInput("x", [2, 3], "FP32")
    inp.set_data_from_numpy(x)
    with api.triton() as client:
        np.testing.assert_array_equal(client.infer("fixed", [inp]).as_numpy("y"), x * 2)


TYPED_CASES = [
    ("BOOL", "bool_contents", [True, False, False, True], [False, True, True, False]),
    ("UINT8", "uint_contents", [0, 1, 100, 127], [0, 2, 200, 254]),
    ("INT8", "int_contents", [-64, -1, 0, 63], [-128, -2, 0, 126]),
    ("INT16", "int_contents", [-300, 2, 0, 300], [-600, 4, 0, 600]),
    ("INT32", "int_contents", [-(2**20), 7, 0, 2**20], [-(2**21), 14, 0, 2**21]),
    ("INT64", "int64_contents", [-(2**40), 7, 0, 2**40], [-(2**41), 14, 0, 2**41]),
    ("FP32", "fp32_contents", [0.5, -1.25, 3.0, 0.0], [1.0, -2.5, 6.0, 0.0]),
    ("FP64", "fp64_contents", [0.1, -1e300, 3.0, 0.0], [0.2, -2e300, 6.0, 0.0]),
]


@pytest.mark.parametrize(("datatype", "field", "values", "expected"), TYPED_CASES)
def test_typed_contents_in_typed_contents_out(api: Api, datatype, field, values, expected):
    request = pb.ModelInferRequest(model_name=f"twice_{datatype.lower()}", id="t")
    tensor = request.inputs.add(name="x", datatype=datatype, shape=[2, 2])
    getattr(tensor.contents, field).extend(values)
    request.parameters["typed_output_contents"].bool_param = True  # replies are raw otherwise
    with api.channel() as channel:
        reply = api.stub(channel).ModelInfer(request, timeout=10)
    assert not reply.raw_output_contents
    (out,) = reply.outputs
    assert (out.name, out.datatype, list(out.shape)) == ("y", datatype, [2, 2])
    assert list(getattr(out.contents, field)) == expected
    assert reply.id == "t"


def test_typed_bytes_contents(api: Api) -> None:
    request = pb.ModelInferRequest(model_name="upper")
    request.inputs.add(name="text", datatype="BYTES", shape=[2]).contents.bytes_contents.extend(
        [b"ab", b"cd"]
    )
    request.parameters["typed_output_contents"].bool_param = True
    with api.channel() as channel:
        reply = api.stub(channel).ModelInfer(request, timeout=10)
    assert list(reply.outputs[0].contents.bytes_contents) == [b"AB", b"CD"]


def test_typed_request_with_an_fp16_output_gets_raw_outputs(api: Api) -> None:
    # FP16 has no typed field: the input must be raw, so build a raw FP16 request by
    # hand and check the reply is raw too; then a typed request to an FP16 model fails.
    x = np.array([[1.5, -2.0]], dtype=np.float16)
    request = pb.ModelInferRequest(model_name="twice_fp16", raw_input_contents=[x.tobytes()])
    request.inputs.add(name="x", datatype="FP16", shape=[1, 2])
    with api.channel() as channel:
        reply = api.stub(channel).ModelInfer(request, timeout=10)
    served = np.frombuffer(reply.raw_output_contents[0], dtype=np.float16).reshape(1, 2)
    np.testing.assert_array_equal(served, x * 2)
