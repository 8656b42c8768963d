"""Plain data the core passes around: no protobuf, no torch at import time.

Tensors travel as ``torch.Tensor`` (dim 0 is the batch dimension) or, for the KServe
``BYTES`` datatype, as a ``BytesTensor``: a flat list of ``bytes`` elements plus a
shape whose product is the element count.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any, Literal, Protocol, Union

from edgeserve.errors import ConfigError

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


def batches_along_dim0(inputs: Sequence[TensorSpec]) -> bool:
    """Whether a signature batches along dim 0: dim 0 of every input is -1.

    The packager writes -1 exactly when dim 0 is the batch (it probes the model with
    stacked examples). A manifest also says so itself (``Manifest.batches``: its
    ``max_batch_size`` 0 means no batch dimension, whatever the dims say).
    """
    return all(spec.shape[:1] == (-1,) for spec in inputs)


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


class EventSink(Protocol):
    """Where the core tells the fleet what happened: ``telemetry.events.EventLog.record``.

    ``daemon.py`` passes it to the api servicer and to lifecycle, which never import
    telemetry for it. A call never blocks on I/O and never raises; ``body`` is a JSON
    object of facts (names, versions, codes, ids), never tensor data or a model's text.
    """

    def __call__(self, kind: str, **body: Any) -> None: ...


DeploymentSource = Literal["config", "management", "restore", "fleet"]
"""Who asked for a change of what is live (the ``source`` of a ``deployment`` event)."""


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


# The one table of batching limits: config, manifests, management and the live set.
BATCHING_LIMITS: dict[str, tuple[int, int]] = {
    "max_batch_size": (1, 65536),
    "max_queue_delay_ms": (0, 60000),
    "max_queue_size": (1, 1_000_000),
    "instances": (1, 64),
    "intra_op_threads": (1, 1024),
}

# Makes an error that names ``key`` (``ConfigError`` by default; an archive or an RPC
# passes its own kind).
ErrorFactory = Callable[[str, str], Exception]


@dataclass(frozen=True)
class BatchingSettings:
    """How one model version batches; a field left null comes from the layer below.

    Layers, highest first (each applied with ``over``): per-model config, the global
    config fields that are set, the archive's manifest, then ``BUILT_IN_BATCHING``.
    ``validate(prefix)`` checks the set fields against ``BATCHING_LIMITS`` once for all.
    """

    max_batch_size: int | None = None
    """Largest batch in rows (dim 0 summed over requests); null: the archive's, else 1."""
    max_queue_delay_ms: float | None = None
    """Upper bound on the wait added for a batch to fill; 0 never waits; null: archive's, 2.0."""
    max_queue_size: int | None = None
    """Requests queued per model version before RESOURCE_EXHAUSTED; null: 256."""
    preferred_batch_sizes: tuple[int, ...] | None = None
    """Batch sizes worth waiting for (ascending, each <= max_batch_size); null: archive's."""
    instances: int | None = None
    """Execution threads per model version; null: 1."""
    intra_op_threads: int | None = None
    """Torch intra-op threads per instance; null splits the allowed CPUs across instances."""

    def validate(self, prefix: str = "", error: ErrorFactory | None = None) -> BatchingSettings:
        """Return self if every set field is in range; else raise ``error(key, problem)``
        (a ``ConfigError`` unless given) for the first one, ``key`` under ``prefix``."""

        def bad(key: str, problem: str) -> Exception:
            where = f"{prefix}.{key}" if prefix else key
            return (error or ConfigError)(where, problem)

        for key, (low, high) in BATCHING_LIMITS.items():
            value = getattr(self, key)
            if value is None:
                continue
            number = (int, float) if key == "max_queue_delay_ms" else (int,)
            if isinstance(value, bool) or not isinstance(value, number):
                raise bad(key, f"must be a number, got {value!r}")
            if not low <= value <= high:  # also refuses NaN
                raise bad(key, f"must be {low}..{high}, got {value!r}")
        sizes = self.preferred_batch_sizes
        if sizes is not None:
            ints = all(isinstance(x, int) and not isinstance(x, bool) for x in sizes)
            if not ints or not all(x >= 1 for x in sizes) or list(sizes) != sorted(set(sizes)):
                raise bad(
                    "preferred_batch_sizes",
                    f"must be ascending distinct sizes >= 1, got {list(sizes)!r}",
                )
            if sizes and self.max_batch_size is not None and sizes[-1] > self.max_batch_size:
                raise bad(
                    "preferred_batch_sizes",
                    f"{sizes[-1]} is larger than max_batch_size {self.max_batch_size}",
                )
        return self

    def over(self, defaults: BatchingSettings) -> BatchingSettings:
        """These settings layered over ``defaults``: the fields set here win."""
        return replace(defaults, **{k: v for k, v in self._set_fields()})

    def to_dict(self) -> dict[str, Any]:
        """The set fields, JSON-able (the live set and status documents)."""
        return {k: list(v) if k == "preferred_batch_sizes" else v for k, v in self._set_fields()}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchingSettings:
        """Read ``to_dict``'s form; unknown keys and nulls are skipped (unchecked: call
        ``validate``)."""
        known = {k: v for k, v in data.items() if k in _BATCHING_FIELDS and v is not None}
        if isinstance(known.get("preferred_batch_sizes"), list):
            known["preferred_batch_sizes"] = tuple(known["preferred_batch_sizes"])
        return cls(**known)

    def _set_fields(self) -> list[tuple[str, Any]]:
        return [(k, v) for k in _BATCHING_FIELDS if (v := getattr(self, k)) is not None]


_BATCHING_FIELDS = tuple(f.name for f in fields(BatchingSettings))

BUILT_IN_BATCHING = BatchingSettings(
    max_batch_size=1,
    max_queue_delay_ms=2.0,
    max_queue_size=256,
    preferred_batch_sizes=(),
    instances=1,
)
"""The bottom layer; ``intra_op_threads`` stays null (the CPUs are split at load)."""


NetworkPurpose = Literal["artifacts", "control", "telemetry"]
NETWORK_PURPOSES: tuple[NetworkPurpose, ...] = ("artifacts", "control", "telemetry")


@dataclass
class NetworkCounters:
    """Bytes moved over the fleet network, per purpose, since the daemon started.

    ``artifacts``: artifact payload bytes received (MQTT chunk payloads, duplicates included,
    and HTTP body bytes); ``control``: signed documents and reported state; ``telemetry``:
    uploaded batches. Headers and MQTT framing are not counted. Here (not in ``fleet/``) so
    that fleet and telemetry both fill one object the daemon hands them; ``add`` may be
    called from any thread. The reported state and ``status`` read ``snapshot()``.
    """

    artifacts: int = 0
    control: int = 0
    telemetry: int = 0
    _lock: threading.Lock = field(
        default_factory=threading.Lock, init=False, repr=False, compare=False
    )

    def add(self, purpose: NetworkPurpose, n: int) -> None:
        if purpose not in NETWORK_PURPOSES:
            raise ValueError(f"network purpose must be one of {NETWORK_PURPOSES}, got {purpose!r}")
        if n < 0:
            raise ValueError(f"network byte count must be >= 0, got {n}")
        with self._lock:
            setattr(self, purpose, getattr(self, purpose) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {p: getattr(self, p) for p in NETWORK_PURPOSES}
