"""Plain data the core passes around: no protobuf, no torch at import time.

Tensors travel as ``torch.Tensor`` (dim 0 is the batch dimension) or, for the KServe
``BYTES`` datatype, as a ``BytesTensor``: a flat list of ``bytes`` elements plus a
shape whose product is the element count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    import torch

# KServe v2 datatype name -> element size in bytes (BYTES is variable: 0).
DATATYPE_SIZES: dict[str, int] = {
    "BOOL": 1,
    "UINT8": 1,
    "INT8": 1,
    "INT16": 2,
    "INT32": 4,
    "INT64": 8,
    "FP16": 2,
    "BF16": 2,
    "FP32": 4,
    "FP64": 8,
    "BYTES": 0,
}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model signature. ``-1`` in shape means any size."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "datatype": self.datatype, "shape": list(self.shape)}


@dataclass
class BytesTensor:
    """A KServe BYTES tensor: elements in row-major order, ``len(items) == prod(shape)``."""

    items: list[bytes]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if math.prod(self.shape) != len(self.items):
            raise ValueError(
                f"BYTES tensor of shape {list(self.shape)} needs "
                f"{math.prod(self.shape)} elements, got {len(self.items)}"
            )

    @property
    def batch_size(self) -> int:
        return self.shape[0] if self.shape else 1

    def split(self, sizes: list[int]) -> list[BytesTensor]:
        """Split along dim 0 into pieces of the given batch sizes."""
        per_row = math.prod(self.shape[1:]) if len(self.shape) > 1 else 1
        pieces, start = [], 0
        for n in sizes:
            end = start + n * per_row
            pieces.append(BytesTensor(self.items[start:end], (n, *self.shape[1:])))
            start = end
        return pieces

    @staticmethod
    def concat(parts: list[BytesTensor]) -> BytesTensor:
        items: list[bytes] = []
        for p in parts:
            items.extend(p.items)
        rows = sum(p.shape[0] for p in parts)
        return BytesTensor(items, (rows, *parts[0].shape[1:]))


TensorValue = Union["torch.Tensor", BytesTensor]


@dataclass
class InferRequest:
    """One inference request as the core sees it, after the codec has validated it."""

    model: str
    version: str | None
    inputs: dict[str, TensorValue]
    request_id: str = ""
    requested_outputs: tuple[str, ...] | None = None
    # Absolute ``time.monotonic()`` after which the request must not run; None = no deadline.
    deadline: float | None = None
    batch_size: int = 1


@dataclass
class InferResult:
    """Outputs for one request, dim 0 sized like the request's batch."""

    model: str
    version: str
    outputs: dict[str, TensorValue]
    request_id: str = ""
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSettings:
    """How one live version is served. None means: take the archive's default."""

    max_batch_size: int | None = None
    max_queue_delay_ms: float | None = None
    max_queue_size: int = 256
    preferred_batch_sizes: tuple[int, ...] | None = None
    instances: int = 1
    # Intra-op threads per instance; None splits the cores across instances.
    intra_op_threads: int | None = None
    # auto | cpu | cuda | cuda:N; None = the daemon's runtime.device.
    device: str | None = None

    def to_dict(self) -> dict[str, Any]:
        data = {k: getattr(self, k) for k in self.__dataclass_fields__}
        if self.preferred_batch_sizes is not None:
            data["preferred_batch_sizes"] = list(self.preferred_batch_sizes)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSettings:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        if known.get("preferred_batch_sizes") is not None:
            known["preferred_batch_sizes"] = tuple(known["preferred_batch_sizes"])
        return cls(**known)
