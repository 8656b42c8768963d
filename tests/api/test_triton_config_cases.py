"""ModelConfig and ModelStatistics cases the packaged models do not cover, on the api fixture
(a real server over live models): BYTES tensors, a fixed signature, several versions of
one name, a model served without recorders, and a GPU instance group."""

from __future__ import annotations

import tritonclient.grpc.model_config_pb2 as mc

from edgeserve.api.triton_extensions import model_config
from tests.api.support import Api, live_model, scripted_submit


def _tensors(tensors) -> list[tuple[str, str, list[int]]]:
    return [(t.name, mc.DataType.Name(t.data_type), list(t.dims)) for t in tensors]


def test_bytes_is_type_string_and_dims_drop_the_batch_dimension(api: Api) -> None:
    with api.triton() as client:
        config = client.get_model_config("upper").config
        pair = client.get_model_config("pair").config
    assert config.max_batch_size == 8
    assert _tensors(config.input) == [("text", "TYPE_STRING", [])]
    assert _tensors(pair.input) == [("a", "TYPE_FP32", [4]), ("b", "TYPE_INT64", [])]
    assert _tensors(pair.output) == [("sum", "TYPE_FP32", [4]), ("double", "TYPE_INT64", [])]


def test_a_fixed_signature_has_no_batch_dimension(api: Api) -> None:
    with api.triton() as client:
        config = client.get_model_config("fixed").config
    assert config.max_batch_size == 0
    assert _tensors(config.input) == [("x", "TYPE_FP32", [2, 3])]
    assert not config.HasField("dynamic_batching")


def test_versions_follow_model_metadata(api: Api) -> None:
    with api.triton() as client:
        default = client.get_model_config("versioned").config
        first = client.get_model_config("versioned", "1").config
    assert _tensors(default.input) == [("x", "TYPE_FP32", [5])]
    assert _tensors(first.input) == [("x", "TYPE_FP32", [-1])]


def test_statistics_without_recorders_are_zero_and_name_each_version(api: Api) -> None:
    with api.triton() as client:
        stats = client.get_inference_statistics("versioned").model_stats
    assert [(s.name, s.version) for s in stats] == [("versioned", "1"), ("versioned", "2")]
    for entry in stats:
        assert entry.inference_count == 0 and entry.execution_count == 0
        assert entry.inference_stats.success.count == 0
        assert list(entry.batch_stats) == []


def test_a_gpu_version_is_a_gpu_instance_group() -> None:
    # No GPU here: a live model that says it runs on cuda:1 (plain data; nothing runs).
    submit = scripted_submit("twice", ["x"], ["y"])
    live = live_model("g", [("x", "FP32", (-1, 3))], [("y", "FP32", (-1, 3))], submit)
    live.device = "cuda:1"
    (group,) = model_config(live).config.instance_group
    assert group.kind == group.KIND_GPU and list(group.gpus) == [1] and group.count == 1
