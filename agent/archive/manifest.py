"""The archive manifest: schema, validation (errors name the field), and JSON form.

``manifest.json`` sits at the root of every archive::

    {
      "schema": 1,
      "name": "mlp", "version": "1", "format": "torchscript",
      "model_file": "model.pt",
      "handler": "tensor",                      # built-in name, or a .py member of the archive
      "handler_config": {},                     # free-form settings for the handler
      "inputs":  [{"name": "x", "datatype": "FP32", "shape": [-1, 16]}],
      "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, 4]}],
      "batching": {"max_batch_size": 32, "max_queue_delay_ms": 2.0, "preferred_batch_sizes": []},
                                                # max_batch_size 0: no batch dimension
      "quantization": {"mode": "dynamic", "engine": "fbgemm", "dtype": "qint8"} | null,
      "samples": [{"inputs": {"x": "samples/0/x.npy"}, "outputs": {"y": "samples/0/y.npy"}}],
      "tolerance": {"rtol": 1e-5, "atol": 1e-6},
      "files": {"model.pt": "<sha256 hex>", ...},   # every member except manifest.json
      "created_by": "edgeserve 0.1.0"
    }

Batching: a model with a batch dimension has ``-1`` as dim 0 of every input and output
and ``max_batch_size`` >= 1 (the most rows per request and per batch). ``max_batch_size``
0 (Triton's convention) says the model has none: its shapes are whole (any ``-1`` is a
free dimension, not a batch) and each request runs alone. A manifest whose inputs do not
all start with ``-1`` has no batch dimension either, whatever its ``max_batch_size``
(older packagers wrote 1 for such models).

Sample members: ``.npy`` for numeric tensors; for BYTES inputs a raw file holding one
element (shape [1]); for BYTES outputs a ``.json`` list of UTF-8 strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from edgeserve.errors import ArchiveError
from edgeserve.types import (
    BUILT_IN_BATCHING,
    DATATYPE_SIZES,
    BatchingSettings,
    TensorSpec,
    batches_along_dim0,
)

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"
FORMATS = ("torchscript",)
QUANTIZATION_MODES = ("dynamic", "static")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
ARCHIVE_BATCHING = BatchingSettings(
    max_batch_size=BUILT_IN_BATCHING.max_batch_size,
    max_queue_delay_ms=BUILT_IN_BATCHING.max_queue_delay_ms,
    preferred_batch_sizes=(),
)
"""What a manifest without ``batching`` (or without one of its fields) says."""


@dataclass(frozen=True)
class Sample:
    inputs: dict[str, str]
    outputs: dict[str, str]


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    model_file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    files: dict[str, str]
    format: str = "torchscript"
    handler: str = "tensor"
    handler_config: dict[str, Any] = field(default_factory=dict)
    # The archive's layer of batching: these three fields, always set (1, 2.0, () when
    # the manifest leaves them out; max_batch_size 1 when the model has no batch dim).
    batching: BatchingSettings = ARCHIVE_BATCHING
    batches: bool = True
    """Whether the model has a batch dimension (dim 0 of every tensor); written as
    ``max_batch_size`` 0 when it has none."""
    quantization: dict[str, str] | None = None
    samples: tuple[Sample, ...] = ()
    rtol: float = 1e-5
    atol: float = 1e-6
    created_by: str = ""
    schema: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.batches and not batches_along_dim0(self.inputs):
            object.__setattr__(self, "batches", False)  # dim 0 fixed: not a batch dim

    @property
    def label(self) -> str:
        """How messages name this model: ``model 'mlp' version '2'``."""
        return f"model '{self.name}' version '{self.version}'"

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "name": self.name,
            "version": self.version,
            "format": self.format,
            "model_file": self.model_file,
            "handler": self.handler,
            "handler_config": self.handler_config,
            "inputs": [s.to_dict() for s in self.inputs],
            "outputs": [s.to_dict() for s in self.outputs],
            "batching": {
                "max_batch_size": self.batching.max_batch_size if self.batches else 0,
                "max_queue_delay_ms": self.batching.max_queue_delay_ms,
                "preferred_batch_sizes": list(self.batching.preferred_batch_sizes or ()),
            },
            "quantization": self.quantization,
            "samples": [{"inputs": s.inputs, "outputs": s.outputs} for s in self.samples],
            "tolerance": {"rtol": self.rtol, "atol": self.atol},
            "files": dict(sorted(self.files.items())),
            "created_by": self.created_by,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Manifest:
        """Validate a parsed manifest; every error names the offending field."""
        if not isinstance(data, dict):
            raise _bad("manifest", "must be a JSON object")
        schema = _get(data, "schema", int)
        if schema != SCHEMA_VERSION:
            raise _bad(
                "schema", f"unsupported schema {schema} (this edgeserve reads {SCHEMA_VERSION})"
            )
        fmt = _get(data, "format", str)
        if fmt not in FORMATS:
            raise _bad("format", f"must be one of {list(FORMATS)}, got '{fmt}'")
        files = _get(data, "files", dict)
        for member, digest in files.items():
            if not isinstance(digest, str) or not _SHA256_RE.match(digest):
                raise _bad(f"files.{member}", "must be a lowercase sha256 hex digest")
        model_file = _get(data, "model_file", str)
        if model_file not in files:
            raise _bad("model_file", f"'{model_file}' is not listed in files")
        inputs = _specs(data, "inputs")
        batching, batches = _batching(data.get("batching", {}), inputs)
        quant = data.get("quantization")
        if quant is not None:
            if not isinstance(quant, dict) or quant.get("mode") not in QUANTIZATION_MODES:
                raise _bad("quantization.mode", f"must be one of {list(QUANTIZATION_MODES)}")
        tol = data.get("tolerance", {})
        if not isinstance(tol, dict):
            raise _bad("tolerance", "must be an object")
        handler_config = data.get("handler_config", {})
        if not isinstance(handler_config, dict):
            raise _bad("handler_config", "must be an object")
        return cls(
            schema=schema,
            name=_name(data, "name"),
            version=_name(data, "version"),
            format=fmt,
            model_file=model_file,
            handler=_get(data, "handler", str),
            handler_config=handler_config,
            inputs=inputs,
            outputs=_specs(data, "outputs"),
            batching=batching,
            batches=batches,
            quantization=quant,
            samples=_samples(data.get("samples", []), files),
            rtol=_number(tol.get("rtol", 1e-5), "tolerance.rtol"),
            atol=_number(tol.get("atol", 1e-6), "tolerance.atol"),
            files=files,
            created_by=str(data.get("created_by", "")),
        )


def _bad(key: str, problem: str) -> ArchiveError:
    return ArchiveError(f"manifest field '{key}': {problem}")


def _get(data: dict[str, Any], key: str, typ: type) -> Any:
    if key not in data:
        raise _bad(key, "is missing")
    value = data[key]
    if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
        raise _bad(key, f"must be {typ.__name__}, got {type(value).__name__}")
    return value


def _name(data: dict[str, Any], key: str) -> str:
    value = _get(data, key, str)
    if not _NAME_RE.match(value):
        raise _bad(key, f"'{value}' must be 1-128 of letters, digits, '_', '.', '-'")
    return value


def _number(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise _bad(key, f"must be a non-negative number, got {value!r}")
    return float(value)


def _specs(data: dict[str, Any], key: str) -> tuple[TensorSpec, ...]:
    raw = _get(data, key, list)
    if not raw:
        raise _bad(key, "must list at least one tensor")
    specs, seen = [], set()
    for i, item in enumerate(raw):
        where = f"{key}[{i}]"
        if not isinstance(item, dict):
            raise _bad(where, "must be an object")
        name = item.get("name")
        if not isinstance(name, str) or not name:
            raise _bad(f"{where}.name", "must be a non-empty string")
        if name in seen:
            raise _bad(f"{where}.name", f"duplicate tensor name '{name}'")
        seen.add(name)
        dt = item.get("datatype")
        if dt not in DATATYPE_SIZES:
            raise _bad(f"{where}.datatype", f"must be one of {sorted(DATATYPE_SIZES)}, got {dt!r}")
        shape = item.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= -1 for d in shape
        ):
            raise _bad(f"{where}.shape", "must be a list of integers >= -1")
        specs.append(TensorSpec(name, dt, tuple(shape)))
    return tuple(specs)


def _batching(raw: Any, inputs: tuple[TensorSpec, ...]) -> tuple[BatchingSettings, bool]:
    """The archive's batching (the three fields a manifest carries; others are ignored)
    and whether the model has a batch dimension. Without one, requests run one at a time:
    the settings say ``max_batch_size`` 1."""
    if not isinstance(raw, dict):
        raise _bad("batching", "must be an object")
    size = raw.get("max_batch_size", ARCHIVE_BATCHING.max_batch_size)
    none = size == 0 and not isinstance(size, bool)
    if none and raw.get("preferred_batch_sizes"):
        raise _bad("batching.preferred_batch_sizes", "must be empty when max_batch_size is 0")
    batches = not none and batches_along_dim0(inputs)
    if not batches and isinstance(size, int) and not isinstance(size, bool):
        if size > 1:
            raise _bad(
                "batching.max_batch_size",
                f"{size} needs dim 0 of every input to be -1 (the batch dimension); "
                "0 says the model has none",
            )
        if size == 0:
            size = 1  # one request at a time (a negative size is refused below)
    pref = raw.get("preferred_batch_sizes", [])
    if not isinstance(pref, list):
        raise _bad("batching.preferred_batch_sizes", f"must be a list, got {pref!r}")
    if all(isinstance(p, int) for p in pref):
        pref = sorted(set(pref))  # written in any order by older packagers
    delay = raw.get("max_queue_delay_ms", ARCHIVE_BATCHING.max_queue_delay_ms)
    if isinstance(delay, int) and not isinstance(delay, bool):
        delay = float(delay)
    settings = BatchingSettings(
        max_batch_size=size,
        max_queue_delay_ms=delay,
        preferred_batch_sizes=tuple(pref),
    )
    return settings.validate("batching", _bad), batches


def _samples(raw: Any, files: dict[str, str]) -> tuple[Sample, ...]:
    if not isinstance(raw, list):
        raise _bad("samples", "must be a list")
    samples = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise _bad(f"samples[{i}]", "must be an object")
        parts = {}
        for side in ("inputs", "outputs"):
            mapping = item.get(side, {})
            if not isinstance(mapping, dict):
                raise _bad(f"samples[{i}].{side}", "must be an object")
            for tensor, member in mapping.items():
                if member not in files:
                    raise _bad(
                        f"samples[{i}].{side}.{tensor}", f"'{member}' is not listed in files"
                    )
            parts[side] = dict(mapping)
        samples.append(Sample(parts["inputs"], parts["outputs"]))
    return tuple(samples)
