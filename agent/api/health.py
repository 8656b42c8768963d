"""``grpc.health.v1`` state, kept in step with the registry's readiness.

Service names:

* ``""`` (the overall service): SERVING while the server says it is ready
  (``is_ready()``, re-read on every readiness change, by ``refresh``, and by every
  Check of ``""``, so a probe never reads a stale answer);
* ``"<model>"``: SERVING when the model's default version is READY;
* ``"<model>/<version>"``: SERVING when that version is READY.

A name that has gone away reports NOT_SERVING (the library servicer cannot forget a
name, and a watcher is better told NOT_SERVING than left hanging). On shutdown every
service turns NOT_SERVING for good (``enter_graceful_shutdown``).

The registry calls its listeners synchronously on the event loop, while the library's
aio servicer is updated with coroutines; changes are therefore collected in a dict and
applied in order by one flush task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio

from edgeserve.serving.registry import ModelRegistry

log = logging.getLogger("edgeserve.api")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
OVERALL = ""


def version_service(name: str, version: str) -> str:
    """The health service name of one model version."""
    return f"{name}/{version}"


class _HealthServicer(health_aio.HealthServicer):
    """The library's aio servicer, with the overall status re-read on every Check."""

    def __init__(self, is_ready: Callable[[], bool]) -> None:
        super().__init__()
        self._is_ready = is_ready

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        if request.service == OVERALL:
            await self.set(OVERALL, SERVING if self._is_ready() else NOT_SERVING)
        return await super().Check(request, context)


class ModelHealth:
    """Owns the aio ``HealthServicer`` and feeds it from registry readiness changes."""

    def __init__(self, registry: ModelRegistry, is_ready: Callable[[], bool]) -> None:
        self._registry = registry
        self._is_ready = is_ready
        self.servicer = _HealthServicer(is_ready)
        self._pending: dict[str, int] = {}
        self._current: dict[str, int] = {}
        self._flush_task: asyncio.Task[None] | None = None
        self._subscribed = False

    async def start(self) -> None:
        """Subscribe to the registry and publish the current state of every model."""
        if not self._subscribed:
            self._registry.subscribe(self._on_change)
            self._subscribed = True
        await self.refresh()

    async def refresh(self) -> None:
        """Recompute every service's status now (e.g. after the server became ready)."""
        self._collect()
        await self._flush()

    async def shutdown(self) -> None:
        """Every service NOT_SERVING, permanently."""
        await self.servicer.enter_graceful_shutdown()

    def _on_change(self, name: str, version: str, ready: bool) -> None:
        self._collect()
        if self._flush_task is None or self._flush_task.done():
            self._flush_task = asyncio.get_running_loop().create_task(self._flush())

    def _collect(self) -> None:
        overall = SERVING if self._is_ready() else NOT_SERVING
        statuses: dict[str, int] = {}
        for name in self._registry.names():
            default = self._registry.find(name)
            statuses[name] = SERVING if default is not None and default.ready else NOT_SERVING
            for version in self._registry.versions(name):
                live = self._registry.find(name, version)
                ready = live is not None and live.ready
                statuses[version_service(name, version)] = SERVING if ready else NOT_SERVING
        for gone in self._current.keys() - statuses.keys():
            statuses[gone] = NOT_SERVING
        for service, status in statuses.items():
            if self._current.get(service) != status:
                self._current[service] = status
                self._pending[service] = status
        # Always pushed: a Check of "" may have changed it since the last change.
        self._pending[OVERALL] = overall

    async def _flush(self) -> None:
        while self._pending:
            service, status = next(iter(self._pending.items()))
            del self._pending[service]
            await self.servicer.set(service, status)
