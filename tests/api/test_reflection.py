"""Server reflection v1 beside v1alpha, through a raw client of each version.

The raw client speaks the reflection protocol by hand on the method path of the version
under test, encoding with grpcio-reflection's v1alpha messages: v1 has the same messages
on the wire (``test_our_v1_messages_match_v1alpha`` holds our v1 proto to that), so the
client does not depend on the server's own v1 stubs.
"""

from __future__ import annotations

import grpc
import pytest
from google.protobuf import descriptor_pb2
from google.protobuf.descriptor import Descriptor
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha

from edgeserve.proto import reflection_v1_pb2 as v1
from tests.api.support import Api

VERSIONS = ("grpc.reflection.v1", "grpc.reflection.v1alpha")
HOSTED = {
    "inference.GRPCInferenceService",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
}


def _ask(
    channel: grpc.Channel, version: str, *requests: v1alpha.ServerReflectionRequest
) -> list[v1alpha.ServerReflectionResponse]:
    call = channel.stream_stream(
        f"/{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=v1alpha.ServerReflectionRequest.SerializeToString,
        response_deserializer=v1alpha.ServerReflectionResponse.FromString,
    )
    return list(call(iter(requests), timeout=10))


def _files(
    response: v1alpha.ServerReflectionResponse,
) -> dict[str, descriptor_pb2.FileDescriptorProto]:
    assert response.WhichOneof("message_response") == "file_descriptor_response", response
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in response.file_descriptor_response.file_descriptor_proto
    ]
    return {f.name: f for f in files}


@pytest.mark.parametrize("version", VERSIONS)
def test_each_version_lists_every_hosted_service(api: Api, version: str) -> None:
    with api.channel(api.uds) as channel:
        (reply,) = _ask(channel, version, v1alpha.ServerReflectionRequest(list_services=""))
    names = {s.name for s in reply.list_services_response.service}
    assert names == HOSTED


@pytest.mark.parametrize("version", VERSIONS)
def test_each_version_describes_the_kserve_service_with_its_extensions(
    api: Api, version: str
) -> None:
    with api.channel() as channel:
        (reply,) = _ask(
            channel,
            version,
            v1alpha.ServerReflectionRequest(file_containing_symbol="inference.ModelConfig"),
        )
    (kserve,) = [f for f in _files(reply).values() if f.package == "inference"]
    (service,) = kserve.service
    assert service.name == "GRPCInferenceService"
    assert {"ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics"} <= {
        m.name for m in service.method
    }
    messages = {m.name: m for m in kserve.message_type}
    statistics = {f.name: f.number for f in messages["ModelStatistics"].field}
    assert statistics["inference_count"] == 4 and statistics["batch_stats"] == 7


def test_v1_describes_itself_and_answers_several_requests_on_one_stream(api: Api) -> None:
    with api.channel() as channel:
        replies = _ask(
            channel,
            "grpc.reflection.v1",
            v1alpha.ServerReflectionRequest(
                file_containing_symbol="grpc.reflection.v1.ServerReflection"
            ),
            v1alpha.ServerReflectionRequest(file_containing_symbol="grpc.health.v1.Health"),
            v1alpha.ServerReflectionRequest(file_containing_symbol="no.such.Symbol"),
        )
    assert len(replies) == 3
    (reflection,) = _files(replies[0]).values()
    assert reflection.package == "grpc.reflection.v1"
    assert [s.name for s in reflection.service] == ["ServerReflection"]
    assert any(f.package == "grpc.health.v1" for f in _files(replies[1]).values())
    # The original request comes back, as the protocol says.
    assert replies[2].original_request.file_containing_symbol == "no.such.Symbol"
    assert replies[2].error_response.error_code == grpc.StatusCode.NOT_FOUND.value[0]


def _fields(message: Descriptor) -> list[tuple]:
    return [
        (
            f.name,
            f.number,
            f.type,
            f.is_repeated,
            f.containing_oneof.name if f.containing_oneof else None,
            f.message_type.name if f.message_type else None,
        )
        for f in message.fields
    ]


@pytest.mark.parametrize("name", sorted(v1alpha.DESCRIPTOR.message_types_by_name))
def test_our_v1_messages_match_v1alpha(name: str) -> None:
    ours = v1.DESCRIPTOR.message_types_by_name[name]
    assert _fields(ours) == _fields(v1alpha.DESCRIPTOR.message_types_by_name[name])


def test_our_v1_has_no_message_v1alpha_lacks() -> None:
    assert set(v1.DESCRIPTOR.message_types_by_name) == set(v1alpha.DESCRIPTOR.message_types_by_name)
