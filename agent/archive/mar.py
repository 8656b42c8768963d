"""TorchServe ``.mar`` files: read one under the model archive's zip rules.

A ``.mar`` is a zip written by ``torch-model-archiver``: ``MAR-INF/MANIFEST.json`` names
the serialized model file and the handler; ``index_to_name.json``, when present, holds
the class labels. edgeserve takes only what it can serve:

- the serialized file must be TorchScript (an eager module or a state dict is refused,
  with the way out: script or trace it and package it as ``module.py:factory``);
- the handler must be one of ``TORCHSERVE_HANDLERS`` (``mar_handler``), unless the
  packager is told another one.

Every entry passes the same checks as an edgeserve archive (``safezip``: names, types,
sizes, zip bombs); errors are ``ArchiveError`` naming the ``.mar``.
``packager.build.plan_archive(from_mar=...)`` turns the result into an edgeserve archive.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeserve import jsonsafe
from edgeserve.archive.safezip import (
    DEFAULT_LIMITS,
    ArchiveLimits,
    open_zip,
    read_member,
    scan_members,
)
from edgeserve.errors import ArchiveError

MAR_MANIFEST = "MAR-INF/MANIFEST.json"
MAR_LABELS = "index_to_name.json"
TORCHSERVE_HANDLERS = {"image_classifier": "image_classifier", "base_handler": "tensor"}
"""TorchServe built-in handler -> ours. Others (object_detector, text_classifier,
image_segmenter, custom .py) have no equivalent and are refused."""
_WHAT = "TorchServe archive"


@dataclass(frozen=True)
class MarModel:
    """What a TorchServe ``.mar`` holds that edgeserve uses."""

    name: str
    version: str
    handler: str
    """TorchServe's handler string, as written in MAR-INF/MANIFEST.json."""
    model_file: str
    model_bytes: bytes
    labels: bytes | None
    """``index_to_name.json`` when present."""


def _fail(source: str, problem: str) -> ArchiveError:
    return ArchiveError(f"{_WHAT} '{source}': {problem}")


def read_mar(mar_path: Path, *, limits: ArchiveLimits = DEFAULT_LIMITS) -> MarModel:
    """Read a ``.mar`` under the archive's zip rules; its serialized file must be TorchScript."""
    source = str(mar_path)
    with open_zip(mar_path, _WHAT) as zf:
        infos = scan_members(zf, source, limits, allow_dirs=True, what=_WHAT)
        if MAR_MANIFEST not in infos:
            raise _fail(source, f"has no {MAR_MANIFEST}")
        raw = read_member(zf, infos[MAR_MANIFEST], source, limits.max_manifest_bytes, _WHAT)
        try:
            model = jsonsafe.parse_json(raw, max_bytes=len(raw))["model"]
            serialized = model["serializedFile"]
            handler = model.get("handler") or ""
            name, version = model.get("modelName") or "", model.get("modelVersion") or "1.0"
        except (ValueError, KeyError, TypeError, AttributeError):
            raise _fail(source, f"{MAR_MANIFEST} is not JSON with model.serializedFile") from None
        if not all(isinstance(v, str) for v in (serialized, handler, name, version)):
            raise _fail(source, f"{MAR_MANIFEST}: model fields must be strings")
        if serialized not in infos:
            raise _fail(source, f"serializedFile '{serialized}' is not in the archive")
        data = read_member(zf, infos[serialized], source, limits.max_total_bytes, _WHAT)
        labels = None
        if MAR_LABELS in infos:
            labels = read_member(zf, infos[MAR_LABELS], source, limits.max_manifest_bytes, _WHAT)
    _check_torchscript(data, source, serialized)
    return MarModel(name, version, handler, serialized, data, labels)


def mar_handler(handler: str, source: str) -> str:
    """Our built-in handler for a TorchServe handler string; ArchiveError when none fits."""
    mapped = TORCHSERVE_HANDLERS.get(handler.strip().removeprefix("ts.torch_handler."))
    if mapped is None:
        raise _fail(
            source,
            f"TorchServe handler '{handler}' has no edgeserve equivalent; repackage with --handler",
        )
    return mapped


def _check_torchscript(data: bytes, source: str, member: str) -> None:
    import io

    import torch  # lazy: reading the zip needs no torch, only this check does

    try:
        torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError, ValueError, pickle errors...
        raise _fail(
            source,
            f"serialized file '{member}' is not TorchScript ({type(exc).__name__}); an eager "
            "model or state dict cannot be imported: script or trace it and package it with "
            "`edgeserve package module.py:factory`",
        ) from None
