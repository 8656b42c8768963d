"""The device's reported state: retained JSON on ``P/devices/<id>/reported``.

Republished on every change the deployer signals and after every reconnect. Changes are
coalesced: while one publish awaits its PUBACK, newer changes only mark the state dirty,
and the next publish carries the newest state. A publish that fails (broker away) waits
for the next change or reconnect; it never blocks anyone and never raises.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from edgeserve.errors import EdgeserveError
from edgeserve.types import NetworkCounters

log = logging.getLogger("edgeserve.fleet")


class Publisher(Protocol):
    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False
    ) -> None: ...


class Reporter:
    """Publishes ``state()`` (plus device, agent_version, time, network_bytes) retained."""

    def __init__(
        self,
        *,
        link: Publisher,
        topic: str,
        device_id: str,
        agent_version: str,
        state: Callable[[], dict[str, Any]],
        counters: NetworkCounters,
    ) -> None:
        self._link = link
        self._topic = topic
        self._device_id = device_id
        self._agent_version = agent_version
        self._state = state
        self._counters = counters
        self._dirty = asyncio.Event()

    def changed(self) -> None:
        """Something reported changed (or the link reconnected): publish again soon."""
        self._dirty.set()

    def document(self) -> dict[str, Any]:
        return {
            "device": self._device_id,
            "agent_version": self._agent_version,
            "time": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            **self._state(),
            "network_bytes": self._counters.snapshot(),
        }

    async def run(self) -> None:
        while True:
            await self._dirty.wait()
            self._dirty.clear()
            payload = json.dumps(self.document(), sort_keys=True).encode()
            try:
                await self._link.publish(self._topic, payload, qos=1, retain=True)
            except EdgeserveError as exc:
                log.info("fleet: reported state not published: %s", exc)
                continue
            self._counters.add("control", len(payload))
