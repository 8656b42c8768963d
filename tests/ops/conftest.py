"""Fixtures for operations tests: a real notify socket, a clean root logger, repo paths."""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgeserve.logs import EventHandler

ROOT = Path(__file__).resolve().parents[2]


class NotifySocket:
    """A bound AF_UNIX datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str, bind_to: str) -> None:
        self.address = address  # what goes in $NOTIFY_SOCKET
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(bind_to)

    def receive(self, timeout: float = 5.0) -> str:
        """The next datagram, waiting at most ``timeout`` seconds."""
        self.sock.settimeout(timeout)
        return self.sock.recv(4096).decode()

    def pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096, socket.MSG_PEEK)
        except BlockingIOError:
            return False
        return True


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    folder = tempfile.mkdtemp(prefix="sd-")  # short: sun_path is 108 bytes
    path = f"{folder}/notify"
    sock = NotifySocket(path, path)
    try:
        yield sock
    finally:
        sock.sock.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def abstract_notify_socket() -> Iterator[NotifySocket]:
    name = f"edgeserve-test-{uuid.uuid4().hex}"
    sock = NotifySocket(f"@{name}", f"\0{name}")
    try:
        yield sock
    finally:
        sock.sock.close()


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, put back as it was (handlers, levels) after the test."""
    root, ours = logging.getLogger(), logging.getLogger("edgeserve")
    level, our_level, handlers = root.level, ours.level, list(root.handlers)
    try:
        yield root
    finally:
        ours.setLevel(our_level)
        for handler in [h for h in root.handlers if isinstance(h, EventHandler)]:
            root.removeHandler(handler)
        for handler in handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(level)


@pytest.fixture
def repo_root() -> Path:
    return ROOT
