"""The client of ``edgeserve.v1.Management``, for the CLI (``cli/``) and tests.

Synchronous (the CLI has no event loop) and light: it imports ``grpc`` and the generated
stubs only, not the servicer, its access checks or ``lifecycle``. Replies become plain
data (``version_dict``) for the table and ``--json`` renderers; a failed call raises
``ClientError`` with the gRPC code, which ``cli/management`` maps to the CLI's exit codes.
"""

from __future__ import annotations

import json
from typing import Any

import grpc

from edgeserve.api.client import ClientError
from edgeserve.proto import management_pb2 as pb
from edgeserve.proto import management_pb2_grpc as pb_grpc

# The fields of ModelSettings, in wire order (instances, ..., device).
_SETTINGS_FIELDS = tuple(f.name for f in pb.ModelSettings.DESCRIPTOR.fields)


class ManagementClient:
    """Synchronous client for the CLI. ``address``: ``unix:///path`` or ``127.0.0.1:PORT``."""

    def __init__(self, address: str, *, token: str | None = None, timeout: float = 120.0):
        self.address = address
        self._channel = grpc.insecure_channel(address)
        self._stub = pb_grpc.ManagementStub(self._channel)
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, name: str, request: Any) -> Any:
        try:
            return getattr(self._stub, name)(
                request, timeout=self._timeout, metadata=self._metadata
            )
        except grpc.RpcError as err:
            raise ClientError(err.code(), err.details() or "") from None

    def list_models(self) -> list[dict[str, Any]]:
        reply = self._call("ListModels", pb.ListModelsRequest())
        return [version_dict(m) for m in reply.models]

    def describe(self, name: str, version: str = "") -> dict[str, Any]:
        reply = self._call("DescribeModel", pb.DescribeModelRequest(name=name, version=version))
        return {
            "name": reply.name,
            "default_version": reply.default_version or None,
            "versions": [version_dict(v) for v in reply.versions],
        }

    def load(
        self,
        *,
        archive: str | None = None,
        stored: tuple[str, str] | None = None,
        make_default: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        request = pb.LoadModelRequest(make_default=make_default)
        if archive is not None:
            request.archive_path = archive
        elif stored is not None:
            request.stored.name, request.stored.version = stored
        request.settings.CopyFrom(_settings_message(settings or {}))
        return version_dict(self._call("LoadModel", request).model)

    def unload(self, name: str, version: str) -> dict[str, Any]:
        reply = self._call("UnloadModel", pb.UnloadModelRequest(name=name, version=version))
        return {"name": name, "unloaded": version, "default_version": reply.default_version or None}

    def set_default(self, name: str, version: str) -> dict[str, Any]:
        request = pb.SetDefaultVersionRequest(name=name, version=version)
        reply = self._call("SetDefaultVersion", request)
        return {"previous_default": reply.previous_default or None, **version_dict(reply.model)}

    def scale(self, name: str, version: str, settings: dict[str, Any]) -> dict[str, Any]:
        request = pb.ScaleModelRequest(
            name=name, version=version, settings=_settings_message(settings)
        )
        return version_dict(self._call("ScaleModel", request).model)

    def status(self) -> dict[str, Any]:
        document: dict[str, Any] = json.loads(
            self._call("GetStatus", pb.GetStatusRequest()).status_json
        )
        return document


def _settings_message(settings: dict[str, Any]) -> pb.ModelSettings:
    return pb.ModelSettings(**{k: v for k, v in settings.items() if v is not None})


def version_dict(message: pb.ModelVersion) -> dict[str, Any]:
    """Plain data of a ModelVersion, for ``--json`` and tests."""
    s = message.settings
    data: dict[str, Any] = {
        "name": message.name,
        "version": message.version,
        "state": message.state,
        "default": message.is_default,
        "instances": message.instances,
        "device": message.device,
        "loaded_at": message.loaded_at,
        "load_seconds": message.load_seconds,
        "in_flight": message.in_flight,
        "quantization": message.quantization or None,
        "settings": {k: getattr(s, k) if s.HasField(k) else None for k in _SETTINGS_FIELDS},
    }
    if message.inputs or message.outputs:
        for key, specs in (("inputs", message.inputs), ("outputs", message.outputs)):
            data[key] = [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs
            ]
    return data
