"""The client of ``edgeserve.v1.Management``, for the CLI (``cli/``) and tests.

Synchronous (the CLI has no event loop) and light: it imports ``grpc`` and the generated
stubs only, not the servicer, its access checks or ``lifecycle``. Replies become plain
data (``version_dict``) for the table and ``--json`` renderers; a failed call raises
``ClientError`` with the gRPC code, which ``cli/management`` maps to the CLI's exit codes.

``upload`` streams a local archive (UploadModel) in ``CHUNK_BYTES`` messages; a file the
daemon would refuse for its size (over ``MAX_UPLOAD_BYTES``), or that cannot be read,
is an ``ArchiveError`` before anything is sent.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc

from edgeserve.api.client import ClientError
from edgeserve.api.upload import CHUNK_BYTES, too_large
from edgeserve.errors import ArchiveError
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

    def upload(
        self,
        path: str | Path,
        *,
        make_default: bool = False,
        settings: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Stream the local archive ``path`` to the daemon, which installs and loads it."""
        label = str(path)
        source = _ArchiveSource(label)
        try:
            if refusal := too_large(label, source.size):
                raise ArchiveError(refusal)
            header = pb.UploadHeader(
                filename=label,
                size=source.size,
                make_default=make_default,
                settings=_settings_message(settings or {}),
            )
            return version_dict(self._call("UploadModel", source.messages(header)).model)
        finally:
            source.close()

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


class _ArchiveSource:
    """A local archive, open; ArchiveError says why it cannot be. gRPC reads the messages
    in a thread of its own that may still run when the call has ended, so reading and
    closing take turns under a lock."""

    def __init__(self, label: str) -> None:
        try:  # O_NONBLOCK: a FIFO must not hang the open
            fd = os.open(label, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise ArchiveError(f"archive '{label}' cannot be read: {exc.strerror}") from None
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            os.close(fd)
            raise ArchiveError(f"archive '{label}' is not a regular file")
        self._fd: int | None = fd
        self._lock = threading.Lock()
        self.size = info.st_size

    def messages(self, header: pb.UploadHeader) -> Iterator[pb.UploadModelRequest]:
        """The header, then ``header.size`` bytes in CHUNK_BYTES pieces (fewer if the file
        shrank meanwhile: the daemon then refuses the short upload)."""
        yield pb.UploadModelRequest(header=header)
        offset = 0
        while offset < header.size:
            with self._lock:
                if self._fd is None:
                    return
                chunk = os.pread(self._fd, min(CHUNK_BYTES, header.size - offset), offset)
            if not chunk:
                return
            offset += len(chunk)
            yield pb.UploadModelRequest(chunk=chunk)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


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
        "quantization": json.loads(message.quantization) if message.quantization else None,
        "settings": {k: getattr(s, k) if s.HasField(k) else None for k in _SETTINGS_FIELDS},
    }
    if message.inputs or message.outputs:
        for key, specs in (("inputs", message.inputs), ("outputs", message.outputs)):
            data[key] = [
                {"name": t.name, "datatype": t.datatype, "shape": list(t.shape)} for t in specs
            ]
    return data
