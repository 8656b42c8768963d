"""What is live: model name -> versions -> ``LiveModel``, and each model's default version.

The registry is the inference core's index. It changes only through ``lifecycle`` (one
caller, on the event loop), and it is read on every request by ``api/inference``.
A request holds the ``LiveModel`` it was admitted on, never a name it looks up again, so
a swap of the default pointer never moves a request already in flight.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from edgeserve.errors import NotFound, NotReady
from edgeserve.telemetry.recorders import ModelRecorder
from edgeserve.types import (
    BUILT_IN_BATCHING,
    BatchingSettings,
    InferRequest,
    InferResult,
    TensorSpec,
    batches_along_dim0,
)

log = logging.getLogger("edgeserve.serving")

PLATFORM = "pytorch_torchscript"


class ModelState(enum.Enum):
    """A version is added READY (loaded, warmed); ``remove`` makes it DRAINING while the
    requests it admitted finish, then it is UNLOADED. FAILED: a persisted version that
    could not be restored (``lifecycle``; it is never in the registry)."""

    READY = "READY"
    DRAINING = "DRAINING"
    UNLOADED = "UNLOADED"
    FAILED = "FAILED"


Submit = Callable[[InferRequest], Awaitable[InferResult]]
ReadinessListener = Callable[[str, str, bool], None]


@dataclass(eq=False)
class LiveModel:
    """One live model version: its signature and the callable that queues a request."""

    name: str
    version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch_size: int
    submit: Submit
    # Per-version metrics, held here so the hot path never looks them up by name.
    recorder: ModelRecorder | None = None
    device: str = "cpu"
    platform: str = PLATFORM
    state: ModelState = ModelState.READY
    # The batching it serves with, every layer resolved (``serving.build``).
    settings: BatchingSettings = BUILT_IN_BATCHING
    # Facts for status and describe.
    loaded_at: float = 0.0
    load_seconds: float = 0.0
    quantization: dict[str, str] | None = None
    # False: the model has no batch dimension (manifest max_batch_size 0): shapes are whole.
    batch_dim: bool = True
    _in_flight: int = 0
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self._idle.set()
        self._input_index = {spec.name: spec for spec in self.inputs}
        self._output_index = {spec.name: spec for spec in self.outputs}
        self.batches = self.batch_dim and (
            self.max_batch_size > 1 or batches_along_dim0(self.inputs)
        )

    def input_spec(self, name: str) -> TensorSpec | None:
        return self._input_index.get(name)

    def output_spec(self, name: str) -> TensorSpec | None:
        return self._output_index.get(name)

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    @property
    def in_flight(self) -> int:
        return self._in_flight

    async def infer(self, request: InferRequest) -> InferResult:
        if self.state is not ModelState.READY:
            raise NotReady.model(self.name, self.version, self.state.value)
        self._in_flight += 1
        self._idle.clear()
        try:
            return await self.submit(request)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no request admitted on this version is still queued or running."""
        await self._idle.wait()


class ModelRegistry:
    """name -> version -> LiveModel, plus the default version of each name."""

    def __init__(self) -> None:
        self._models: dict[str, dict[str, LiveModel]] = {}
        self._defaults: dict[str, str] = {}
        self._listeners: list[ReadinessListener] = []

    # -- reads (hot path) ---------------------------------------------------------------

    def get(self, name: str, version: str | None = None) -> LiveModel:
        """The version asked for, or the default; NotFound / NotReady otherwise."""
        versions = self._models.get(name)
        if not versions:
            raise NotFound.model(name)
        if not version:
            version = self._defaults.get(name)
            if version is None:
                raise NotFound(f"model '{name}' has no default version")
        live = versions.get(version)
        if live is None:
            raise NotFound.model(name, version)
        return live

    def find(self, name: str, version: str | None = None) -> LiveModel | None:
        try:
            return self.get(name, version)
        except NotFound:
            return None

    def default_version(self, name: str) -> str | None:
        return self._defaults.get(name)

    def versions(self, name: str) -> list[str]:
        return sorted(self._models.get(name, {}), key=version_sort_key)

    def names(self) -> list[str]:
        return sorted(self._models)

    def all(self) -> list[LiveModel]:
        return [live for name in self.names() for live in self._sorted_versions(name)]

    def all_ready(self) -> bool:
        return all(live.ready for live in self.all())

    def _sorted_versions(self, name: str) -> list[LiveModel]:
        versions = self._models.get(name, {})
        return [versions[v] for v in sorted(versions, key=version_sort_key)]

    # -- changes (lifecycle only) -------------------------------------------------------

    def add(self, live: LiveModel, *, make_default: bool = False) -> None:
        versions = self._models.setdefault(live.name, {})
        if live.version in versions:
            raise ValueError(f"model '{live.name}' version '{live.version}' is already live")
        versions[live.version] = live
        if make_default or live.name not in self._defaults:
            self._defaults[live.name] = live.version
        self._notify(live)

    def set_default(self, name: str, version: str) -> None:
        live = self.get(name, version)
        if not live.ready:
            raise NotReady.model(name, version, live.state.value)
        self._defaults[name] = version
        self._notify(live)

    def remove(self, name: str, version: str) -> LiveModel:
        """Take a version out of the index, DRAINING; the caller drains and closes it."""
        live = self.get(name, version)
        del self._models[name][version]
        if not self._models[name]:
            del self._models[name]
            self._defaults.pop(name, None)
        elif self._defaults.get(name) == version:
            # The newest remaining version becomes the default.
            self._defaults[name] = self.versions(name)[-1]
        live.state = ModelState.DRAINING
        self._notify(live)
        return live

    def subscribe(self, listener: ReadinessListener) -> None:
        """Call ``listener(name, version, ready)`` on every readiness change."""
        self._listeners.append(listener)

    def _notify(self, live: LiveModel) -> None:
        for listener in self._listeners:
            try:
                listener(live.name, live.version, live.ready)
            except Exception:
                log.exception("readiness listener failed for %s/%s", live.name, live.version)


def version_sort_key(version: str) -> tuple[int, int | str]:
    """Numeric versions sort numerically, others lexically after them."""
    return (0, int(version)) if version.isdigit() else (1, version)
