"""systemd's notify protocol, with no dependency: datagrams to ``$NOTIFY_SOCKET``.

The daemon (``daemon.py``) sends ``ready()`` once the configured models are warm,
``watchdog()`` from its tick (every ``watchdog_interval() / 2`` seconds), ``reloading()``
when it acts on SIGHUP, and ``stopping()`` when it starts to drain. Without
``$NOTIFY_SOCKET`` (not started by systemd, or ``Type=simple``) every call does nothing, so
callers never test for systemd themselves.

A failed send is logged and reported as ``False``; it never raises: losing a status line
must not take inference down (systemd notices a missing READY or WATCHDOG by itself).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Mapping

log = logging.getLogger("edgeserve.sdnotify")


class Notifier:
    """Sends notify messages to one socket address; ``address=None`` makes it a no-op."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Notifier:
        """Read ``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace) and
        ``$WATCHDOG_USEC``, honouring ``$WATCHDOG_PID`` (the watchdog is ours only if it
        names this process)."""
        address = env.get("NOTIFY_SOCKET") or None
        if address is not None and not address.startswith(("/", "@")):
            log.warning("ignoring NOTIFY_SOCKET %r: not a path or abstract name", address)
            address = None
        usec_text = env.get("WATCHDOG_USEC", "")
        pid_text = env.get("WATCHDOG_PID", "")
        usec = int(usec_text) if usec_text.isdigit() and int(usec_text) > 0 else None
        if pid_text and pid_text != str(os.getpid()):
            usec = None
        return cls(address, usec)

    def watchdog_interval(self) -> float | None:
        """The watchdog timeout in seconds, or None when systemd set none for us."""
        return None if self._watchdog_usec is None else self._watchdog_usec / 1_000_000

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1", status)

    def stopping(self, status: str | None = None) -> bool:
        return self.notify("STOPPING=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with the ``MONOTONIC_USEC`` that ``Type=notify-reload`` requires;
        send ``ready()`` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.notify(None, text)

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for more start/stop time (long warm-ups): ``EXTEND_TIMEOUT_USEC``."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")

    def notify(self, message: str | None, status: str | None = None) -> bool:
        """Send ``message`` plus an optional one-line ``STATUS=``; True when it was sent."""
        if self._address is None:
            return False
        lines = [message] if message else []
        if status is not None:
            lines.append("STATUS=" + " ".join(status.split()))
        target = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:  # a socket per message: a few per minute, and nothing to close or leak
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto("\n".join(lines).encode(), target)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self._address, exc)
            return False
        return True
