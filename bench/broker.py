"""A local Mosquitto for the telemetry upload case, and an observer of what reaches it.

``Broker(folder)`` writes a config (one plain listener on a free loopback port,
persistence on, its own log), ``start()`` runs ``mosquitto -c`` and returns once the port
accepts connections, ``stop()`` sends SIGTERM (the broker saves its persistence file) and
waits; ``start()`` again reuses the port. The bench does not import from ``tests``, so
this is its own small helper (``tests/mqtt_broker.py`` is the tests' fuller one).

``Observer`` is a plain paho client subscribed (QoS 1) to one topic that counts the
messages, payload bytes and records it received; ``totals()`` is read at a window's
edges, so the bench knows what was uploaded during the measured window.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from bench.server import free_port


def find_mosquitto() -> str:
    for candidate in ("/usr/sbin/mosquitto", shutil.which("mosquitto")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    raise SystemExit("bench: the telemetry upload case needs mosquitto (apt-get install mosquitto)")


class Broker:
    """One mosquitto process with its own folder, config and port."""

    def __init__(self, folder: Path) -> None:
        self.binary = find_mosquitto()
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "data").mkdir(exist_ok=True)
        self.host, self.port = "127.0.0.1", free_port()
        self.log_path = folder / "mosquitto.log"
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            "\n".join(
                [
                    f"user {pwd.getpwuid(os.getuid()).pw_name}",
                    "allow_anonymous true",
                    "persistence true",
                    f"persistence_location {folder / 'data'}/",
                    f"log_dest file {self.log_path}",
                    "log_type error",
                    "log_type warning",
                    f"listener {self.port} {self.host}",
                ]
            )
            + "\n"
        )
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def start(self, timeout_s: float = 10.0) -> None:
        if self.running:
            return
        self._process = subprocess.Popen(  # noqa: S603 - the system's mosquitto, our config
            [self.binary, "-c", str(self.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self._process.returncode}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.02)  # between probes of a port that refused
        self.stop()
        raise RuntimeError(f"mosquitto not listening on {self.port} after {timeout_s:.0f} s")

    def stop(self, timeout_s: float = 10.0) -> None:
        process, self._process = self._process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


class Observer:
    """Counts what reaches ``topic`` (QoS 1, a clean session per broker start)."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self._lock = threading.Lock()
        self._messages = self._bytes = self._records = 0
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
        client.on_message = self._on_message
        client.on_subscribe = lambda *_args: subscribed.set()
        client.connect(broker.host, broker.port, keepalive=30)
        client.loop_start()
        client.subscribe(topic, qos=1)
        self._client = client
        if not subscribed.wait(10.0):
            self.close()
            raise RuntimeError(f"observer: no SUBACK for {topic}")

    def _on_message(self, _client: object, _userdata: object, message: mqtt.MQTTMessage) -> None:
        payload = bytes(message.payload)
        try:
            records = len(json.loads(payload)["records"])
        except (ValueError, KeyError, TypeError):
            records = 0
        with self._lock:
            self._messages += 1
            self._bytes += len(payload)
            self._records += records

    def totals(self) -> dict[str, float]:
        """Messages, payload bytes and records received so far, and when (monotonic)."""
        with self._lock:
            return {
                "t": time.monotonic(),
                "messages": self._messages,
                "bytes": self._bytes,
                "records": self._records,
            }

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
