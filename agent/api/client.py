"""A small synchronous KServe v2 client over our stubs, for the CLI, the demo and bench.

Apps should use any stock KServe v2 client (tritonclient, the KServe SDK); this one
exists so that ``edgeserve predict`` needs nothing beyond edgeserve itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from edgeserve.dtypes import NUMPY_DTYPES, datatype_of_numpy
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc

DEFAULT_ADDRESS = "127.0.0.1:8001"


class ClientError(Exception):
    """A call failed; ``code`` is the gRPC status code."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message


@dataclass
class TensorInfo:
    name: str
    datatype: str
    shape: list[int]


@dataclass
class ModelInfo:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]


class InferenceClient:
    """``address`` is ``unix:///path/inference.sock`` or ``host:port``."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, max_message_bytes: int = 64 << 20):
        options = [
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = pb_grpc.GRPCInferenceServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None) -> Any:
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as err:
            raise ClientError(err.code(), err.details() or "") from None

    def server_ready(self, timeout: float | None = 5.0) -> bool:
        return bool(self._call(self._stub.ServerReady, pb.ServerReadyRequest(), timeout).ready)

    def model_metadata(self, name: str, version: str = "", timeout: float = 10.0) -> ModelInfo:
        reply = self._call(
            self._stub.ModelMetadata, pb.ModelMetadataRequest(name=name, version=version), timeout
        )

        def tensors(items: Any) -> list[TensorInfo]:
            return [TensorInfo(t.name, t.datatype, list(t.shape)) for t in items]

        return ModelInfo(
            reply.name,
            list(reply.versions),
            reply.platform,
            tensors(reply.inputs),
            tensors(reply.outputs),
        )

    def infer(
        self,
        model: str,
        inputs: dict[str, np.ndarray],
        *,
        version: str = "",
        timeout: float | None = 30.0,
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Run one request with raw contents; returns (served version, outputs)."""
        reply = self._call(self._stub.ModelInfer, build_request(model, inputs, version), timeout)
        return reply.model_version, decode_outputs(reply)


def build_request(model: str, inputs: dict[str, np.ndarray], version: str = "") -> Any:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    for name, array in inputs.items():
        datatype = datatype_of_numpy(array.dtype)
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        if datatype == "BYTES":
            request.raw_input_contents.append(encode_bytes_elements(array.ravel().tolist()))
        else:
            request.raw_input_contents.append(np.ascontiguousarray(array).tobytes())
    return request


def decode_outputs(reply: Any) -> dict[str, np.ndarray]:
    outputs = {}
    for i, tensor in enumerate(reply.outputs):
        raw = reply.raw_output_contents[i]
        if tensor.datatype == "BYTES":
            items = decode_bytes_elements(raw)
            outputs[tensor.name] = np.array(items, dtype=object).reshape(list(tensor.shape))
        else:
            dtype = NUMPY_DTYPES[tensor.datatype]
            outputs[tensor.name] = np.frombuffer(raw, dtype=dtype).reshape(list(tensor.shape))
    return outputs


def encode_bytes_elements(items: list[Any]) -> bytes:
    parts = []
    for item in items:
        data = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(data)))
        parts.append(data)
    return b"".join(parts)


def decode_bytes_elements(raw: bytes) -> list[bytes]:
    items, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        offset += 4
        items.append(raw[offset : offset + length])
        offset += length
    return items
