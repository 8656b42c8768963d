"""Server reflection, ``grpc.reflection.v1`` and ``v1alpha``, for every hosted service.

grpcio-reflection serves only v1alpha; current grpcurl and Postman ask for v1 first.
The two have the same messages, field for field, under another package (our
``proto/reflection_v1.proto``; a test checks the fields against v1alpha's), so v1 is
answered by the v1alpha servicer itself: each v1 request is read as v1alpha from its
bytes, and each reply turned back the same way. One servicer, one answer for both.

Both answer from a descriptor pool of their own holding the file of every hosted service
and its imports, whatever pool it was registered in (the KServe file lives in
``edgeserve.proto.POOL``; health and v1alpha reflection in protobuf's default pool).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

import grpc
from google.protobuf import descriptor_pool
from google.protobuf.descriptor import FileDescriptor, ServiceDescriptor
from grpc_reflection.v1alpha import reflection as v1alpha
from grpc_reflection.v1alpha import reflection_pb2 as v1alpha_pb
from grpc_reflection.v1alpha import reflection_pb2_grpc as v1alpha_grpc

from edgeserve.proto import reflection_v1_pb2 as v1_pb
from edgeserve.proto import reflection_v1_pb2_grpc as v1_grpc

REFLECTION_SERVICES = (
    v1_pb.DESCRIPTOR.services_by_name["ServerReflection"],
    v1alpha_pb.DESCRIPTOR.services_by_name["ServerReflection"],
)


def enable_reflection(server: grpc.aio.Server, services: Sequence[ServiceDescriptor]) -> None:
    """Add both reflection services to ``server``, answering for ``services`` and themselves."""
    hosted = [*services, *REFLECTION_SERVICES]
    servicer = v1alpha.aio.ReflectionServicer(
        [s.full_name for s in hosted], pool=_reflection_pool(hosted)
    )
    v1alpha_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1_grpc.add_ServerReflectionServicer_to_server(_V1Reflection(servicer), server)


class _V1Reflection(v1_grpc.ServerReflectionServicer):
    """``grpc.reflection.v1`` through the v1alpha servicer (same messages on the wire)."""

    def __init__(self, v1alpha_servicer: v1alpha.aio.ReflectionServicer) -> None:
        self._v1alpha = v1alpha_servicer

    async def ServerReflectionInfo(
        self,
        request_iterator: AsyncIterator[v1_pb.ServerReflectionRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[v1_pb.ServerReflectionResponse]:
        async def as_v1alpha() -> AsyncIterator[v1alpha_pb.ServerReflectionRequest]:
            async for request in request_iterator:
                yield v1alpha_pb.ServerReflectionRequest.FromString(request.SerializeToString())

        async for reply in self._v1alpha.ServerReflectionInfo(as_v1alpha(), context):
            yield v1_pb.ServerReflectionResponse.FromString(reply.SerializeToString())


def _reflection_pool(services: Sequence[ServiceDescriptor]) -> descriptor_pool.DescriptorPool:
    """A pool holding the files of ``services`` and their imports, whatever pool they are in."""
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        pool.AddSerializedFile(file.serialized_pb)
        added.add(file.name)

    for service in services:
        add(service.file)
    return pool
