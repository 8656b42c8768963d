"""The fleet link's plain parts: its error family, its options and its pure helpers.

``fleet/link.py`` (the only module that imports paho) re-exports every name here; modules
that need only these (the fetcher's back-off, a caller's ``except LinkError``, the
daemon's ``Will`` and ``LinkTls``) may import them from here without loading paho.

Errors (kinds from ``edgeserve.errors``)::

    EdgeserveError
    └── LinkError               anything the link refuses or the broker rejects
        ├── LinkRefused         the broker or TLS refused us: credentials, ACL, certificate
        ├── LinkNotConnected    no connection within the wait, or QoS 0 while offline
        ├── LinkClosed          the link is not started or was closed; pending publishes fail
        ├── LinkQueueFull       max_pending messages already await their PUBACK
        ├── PacketTooLarge      over the broker's Maximum-Packet-Size (refused locally)
        └── PublishFailed       paho or the broker (PUBACK reason code) refused a message
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from edgeserve.errors import EdgeserveError, Kind

MAX_BACKOFF_S = 30.0
# Largest MQTT packet: 1 byte header + 4 bytes remaining length + 268,435,455 bytes.
MQTT_MAX_PACKET = 268_435_460
NOT_AUTHORIZED = 0x87  # MQTT v5 reason code
T = TypeVar("T")


class LinkError(EdgeserveError):
    kind = Kind.INTERNAL


class LinkRefused(LinkError):
    kind = Kind.UNAUTHENTICATED

    @classmethod
    def connack(cls, where: str, reason: str) -> LinkRefused:
        return cls(f"fleet link: broker {where} refused the connection: {reason}")

    @classmethod
    def tls(cls, where: str, detail: str) -> LinkRefused:
        return cls(f"fleet link: TLS handshake with {where} failed: {detail}")


class LinkNotConnected(LinkError):
    kind = Kind.NOT_READY


class LinkClosed(LinkError):
    kind = Kind.NOT_READY


class LinkQueueFull(LinkError):
    kind = Kind.OVERLOADED

    def __init__(self, limit: int) -> None:
        super().__init__(f"fleet link: outgoing queue is full ({limit} messages await PUBACK)")


class PacketTooLarge(LinkError):
    kind = Kind.TOO_LARGE

    def __init__(self, topic: str, size: int, limit: int, source: str) -> None:
        super().__init__(
            f"fleet link: message to '{topic}' is {size} bytes on the wire; "
            f"the limit is {limit} bytes ({source})"
        )


class PublishFailed(LinkError):
    @classmethod
    def rc(cls, topic: str, error: str) -> PublishFailed:
        """paho refused the message locally; ``error`` is paho's text for its code."""
        return cls(f"fleet link: publish to '{topic}' failed: {error}")

    @classmethod
    def refused(cls, topic: str, reason: str, code: int) -> PublishFailed:
        """The broker's PUBACK carried the failure ``code`` (named ``reason``)."""
        err = cls(f"fleet link: broker refused the message to '{topic}': {reason}")
        if code == NOT_AUTHORIZED:
            err.kind = Kind.PERMISSION_DENIED
        return err


@dataclass(frozen=True)
class Will:
    """The Last Will the broker publishes if the link dies without a clean ``close()``."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True)
class LinkTls:
    """TLS files; ``ca_file`` None trusts the system CAs. There is no plaintext fallback."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None


def backoff_delay(attempt: int, initial_s: float, cap_s: float, rand: random.Random) -> float:
    """Seconds before reconnect ``attempt`` (0-based): exponential, "equal jitter", capped."""
    ceiling = min(cap_s, initial_s * 2 ** min(attempt, 32))
    return ceiling / 2 + rand.uniform(0, ceiling / 2)


def publish_packet_size(topic: str, payload: bytes, qos: int) -> int:
    """Bytes of an MQTT v5 PUBLISH with no properties, as it goes on the wire."""
    remaining = 2 + len(topic.encode()) + (2 if qos else 0) + 1 + len(payload)
    length_bytes = 1 + (remaining >= 128) + (remaining >= 16_384) + (remaining >= 2_097_152)
    return 1 + length_bytes + remaining


@dataclass
class Held(Generic[T]):
    """One message that matched no subscription, with what the hold's bounds need."""

    item: T
    topic: str
    size: int
    qos: int
    since: float  # time.monotonic() when it was held


class UnmatchedHold(Generic[T]):
    """Messages that matched no subscription yet, oldest first, bounded by count and bytes.

    ``add`` refuses a message once ``max_messages`` or ``max_bytes`` would be passed;
    ``take`` hands back (in arrival order) those a new subscription matches; ``expired``
    those held ``max_age_s`` or longer.
    """

    def __init__(self, max_messages: int, max_bytes: int, max_age_s: float) -> None:
        self.max_messages, self.max_bytes, self.max_age_s = max_messages, max_bytes, max_age_s
        self._held: deque[Held[T]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._held)

    def add(self, held: Held[T]) -> bool:
        if len(self._held) >= self.max_messages or self._bytes + held.size > self.max_bytes:
            return False
        self._held.append(held)
        self._bytes += held.size
        return True

    def take(self, which: Callable[[Held[T]], bool]) -> list[Held[T]]:
        taken = [h for h in self._held if which(h)]
        if taken:
            self._held = deque(h for h in self._held if not which(h))
            self._bytes -= sum(h.size for h in taken)
        return taken

    def expired(self, now: float) -> list[Held[T]]:
        return self.take(lambda h: now - h.since >= self.max_age_s)

    def next_expiry(self) -> float | None:
        """When the oldest message expires (monotonic seconds), or None when empty."""
        return self._held[0].since + self.max_age_s if self._held else None
