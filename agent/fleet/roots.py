"""The device's trust root, and the rotations it follows over MQTT.

Rotations are retained one topic per version, ``P/root/<version>``, and the newest also on
``P/root`` (the controller's ``fleet root rotate --broker`` writes both). One retained
``P/root`` alone would hold only the newest rotation, and a device still on version 1
cannot verify version 3 (it does not know the v2 keys that must sign it); with a topic per
version it finds every step it missed and walks forward one version at a time.

Walking: rotations ahead of the current version are held (at most ``MAX_AHEAD`` versions,
each bounded by the document parser), and while the next version is held it is checked
(``verifier.verify_root_step``: a threshold of the current keys and of the new ones). Of
the roots reached, the newest that has not expired (against the trusted time) is adopted:
an intermediate root may have aged while the device was offline. A step that fails is
dropped and logged; the walk stops there.

The adopted root's envelope is written to ``<state_dir>/fleet/root.json`` atomically and
durably *before* anything uses it. At start the keeper uses the newer of the installed
``fleet.root`` and that file (which only ever holds a root this device verified).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

from edgeserve.errors import DocumentRefused
from edgeserve.fleet.canonical import parse_envelope
from edgeserve.fleet.documents import Root, format_time, parse_root
from edgeserve.fleet.state_files import write_bytes
from edgeserve.fleet.verifier import verify_root_step

log = logging.getLogger("edgeserve.fleet")

MAX_AHEAD = 32
ROOT_FILE = "root.json"


def root_topics(prefix: str) -> list[str]:
    """What the device subscribes to: the newest rotation and one topic per version."""
    return [f"{prefix}/root", f"{prefix}/root/+"]


class RootKeeper:
    """Holds the current root; ``offer`` is the link handler for ``root_topics``."""

    def __init__(
        self,
        installed: Root,
        directory: Path,
        *,
        trusted_time: Callable[[], datetime],
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._root = installed
        self._path = Path(directory) / ROOT_FILE
        self._trusted_time = trusted_time
        self.on_change = on_change
        """Called after a new root was adopted (and persisted)."""
        self._ahead: dict[int, bytes] = {}
        self.last_refusal: str | None = None

    @property
    def current(self) -> Root:
        return self._root

    def load(self) -> None:
        """Take the persisted root when it is newer than the installed one (blocking)."""
        try:
            data = self._path.read_bytes()
        except FileNotFoundError:
            return
        except OSError as exc:
            log.error("fleet: %s unreadable (%s); using the installed root", self._path, exc)
            return
        try:
            stored = parse_root(data)
        except DocumentRefused as exc:
            log.error("fleet: %s: %s; using the installed root", self._path, exc.detail)
            return
        if stored.version > self._root.version:
            self._root = stored
        log.info("fleet: trust root v%d", self._root.version)

    def offer(self, topic: str, payload: bytes, retained: bool) -> None:
        """A rotation document arrived (never raises; the payload is never logged)."""
        try:
            version = Root.from_signed(parse_envelope(payload).signed).version
        except DocumentRefused as exc:
            log.warning("fleet: root document on %s refused: %s", topic, exc.detail)
            return
        named = topic.rsplit("/", 1)[-1]
        if named != "root" and named != str(version):
            log.warning("fleet: root v%d arrived on %s; ignored", version, topic)
            return
        current = self._root.version
        if version <= current or version in self._ahead:
            return
        if version > current + MAX_AHEAD:
            log.warning("fleet: root v%d is too far ahead of v%d; ignored", version, current)
            return
        self._ahead[version] = payload
        self._walk()

    def _walk(self) -> None:
        reached: list[tuple[Root, bytes]] = []
        root = self._root
        while root.version + 1 in self._ahead:
            data = self._ahead.pop(root.version + 1)
            try:
                root = verify_root_step(root, data)
            except DocumentRefused as exc:
                log.warning("fleet: root rotation refused: %s", exc.detail)
                self.last_refusal = exc.reason
                break
            reached.append((root, data))
        if not reached:
            return
        trusted = self._trusted_time()
        fresh = [(r, d) for r, d in reached if r.expires > trusted]
        if not fresh:
            newest = reached[-1][0]
            expired = format_time(newest.expires)
            log.warning("fleet: root v%d expired at %s; staying put", newest.version, expired)
            self.last_refusal = "expired"
            return
        new, data = fresh[-1]
        write_bytes(self._path, data)  # persisted before it is used
        self._root = new
        self.last_refusal = None
        for version in [v for v in self._ahead if v <= new.version]:
            del self._ahead[version]
        log.info("fleet: trust root rotated to v%d", new.version)
        self.on_change()
