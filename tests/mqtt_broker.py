"""A real Mosquitto broker for tests: generated config, free loopback port, probed, torn down.

``Mosquitto`` writes a config into its own directory (a plain listener on 127.0.0.1,
persistence on, and optionally a password file, an ACL file and a TLS listener with a CA,
server and client certificates generated here with ``cryptography``), starts the real
binary, and returns once a real MQTT client has received a CONNACK from it. ``stop()``
(SIGTERM: the broker saves its persistence file), ``kill()`` (SIGKILL: it saves nothing)
and ``start()`` again on the same ports serve the outage tests; ``close()`` always kills
and reaps the process.

A missing ``mosquitto`` binary is an error, never a skip (STYLE habit 13): install it with
``apt-get install mosquitto`` (``.ci/run`` does).

Other test packages import it as ``from tests.mqtt_broker import Mosquitto``.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import ipaddress
import os
import pwd
import queue
import shutil
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import paho.mqtt.client as mqtt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

DEFAULT_BINARY = "/usr/sbin/mosquitto"
START_TIMEOUT_S = 10.0


class MosquittoMissing(RuntimeError):
    """The broker binary is not installed: an error in every environment, never a skip."""


def find_mosquitto() -> str:
    if os.access(DEFAULT_BINARY, os.X_OK):
        return DEFAULT_BINARY
    found = shutil.which("mosquitto")
    if found:
        return found
    where = "in CI (EDGESERVE_CI=1)" if os.environ.get("EDGESERVE_CI") else "locally"
    raise MosquittoMissing(
        f"mosquitto not found at {DEFAULT_BINARY} or on PATH ({where}); the fleet and "
        "telemetry tests need a real broker: run `apt-get install mosquitto`"
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass(frozen=True)
class TlsFiles:
    """PEM files the helper generates: the broker's CA and certificates, and a stranger CA."""

    ca_file: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    wrong_ca_file: Path


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[str, ec.EllipticCurvePrivateKey] | None,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    issuer_name, issuer_key = issuer if issuer else (subject, key)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    else:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    if server:
        san = [x509.IPAddress(ipaddress.IPv4Address("127.0.0.1")), x509.DNSName("localhost")]
        builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def generate_tls(directory: Path, client_cn: str = "device-1") -> TlsFiles:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, a stranger CA."""
    directory.mkdir(parents=True, exist_ok=True)

    def write(name: str, data: bytes) -> Path:
        path = directory / name
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate("edgeserve test CA", ca_key, None, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server_cert = _certificate("127.0.0.1", server_key, ("edgeserve test CA", ca_key), server=True)
    client_key = ec.generate_private_key(ec.SECP256R1())
    client_cert = _certificate(client_cn, client_key, ("edgeserve test CA", ca_key))
    wrong_key = ec.generate_private_key(ec.SECP256R1())
    wrong_ca = _certificate("some other CA", wrong_key, None, ca=True)
    return TlsFiles(
        ca_file=write("ca.crt", ca_cert.public_bytes(pem)),
        server_cert=write("server.crt", server_cert.public_bytes(pem)),
        server_key=write("server.key", _key_pem(server_key)),
        client_cert=write("client.crt", client_cert.public_bytes(pem)),
        client_key=write("client.key", _key_pem(client_key)),
        wrong_ca_file=write("wrong-ca.crt", wrong_ca.public_bytes(pem)),
    )


def password_line(user: str, password: str) -> str:
    """One ``mosquitto_passwd`` line in its ``$7$`` format (PBKDF2-SHA512, 101 rounds)."""
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, 101)
    return f"{user}:$7$101${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


class Mosquitto:
    """One broker process with its own directory, config and ports.

    ``users`` (name → password) writes a password file; ``acl`` is the text of an ACL file
    (``user NAME`` / ``topic readwrite FILTER`` lines); ``tls=True`` adds a TLS listener
    (``tls_port``) that requires a client certificate signed by ``tls_files.ca_file``;
    ``max_packet_size`` sets the broker's limit, which it announces in CONNACK;
    ``autosave_interval`` (seconds) makes it save its persistence file that often, so
    retained messages older than that survive ``kill()``.
    """

    def __init__(
        self,
        directory: Path,
        *,
        allow_anonymous: bool = True,
        users: dict[str, str] | None = None,
        acl: str | None = None,
        tls: bool = False,
        max_packet_size: int | None = None,
        autosave_interval: int | None = None,
    ) -> None:
        self.binary = find_mosquitto()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.host = "127.0.0.1"
        self.port = free_port()
        self.users = dict(users or {})
        self.tls_files = generate_tls(directory / "tls") if tls else None
        self.tls_port = free_port() if tls else None
        self.config_file = directory / "mosquitto.conf"
        self.log_file = directory / "mosquitto.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._write_config(allow_anonymous, acl, max_packet_size, autosave_interval)

    def _write_config(
        self,
        allow_anonymous: bool,
        acl: str | None,
        max_packet_size: int | None,
        autosave_interval: int | None,
    ) -> None:
        persistence = self.directory / "data"
        persistence.mkdir(exist_ok=True)
        lines = [
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            "per_listener_settings false",
            f"allow_anonymous {'true' if allow_anonymous else 'false'}",
            "persistence true",
            f"persistence_location {persistence}/",
            "log_dest stdout",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "connection_messages true",
        ]
        if max_packet_size is not None:
            lines.append(f"max_packet_size {max_packet_size}")
        if autosave_interval is not None:  # retained messages survive a SIGKILL after this
            lines.append(f"autosave_interval {autosave_interval}")
        if self.users:
            passwords = self.directory / "passwords"
            passwords.write_text("".join(password_line(u, p) + "\n" for u, p in self.users.items()))
            passwords.chmod(0o600)
            lines.append(f"password_file {passwords}")
        if acl is not None:
            acl_file = self.directory / "acl"
            acl_file.write_text(acl)
            acl_file.chmod(0o600)
            lines.append(f"acl_file {acl_file}")
        lines.append(f"listener {self.port} {self.host}")
        if self.tls_files is not None:
            lines += [
                f"listener {self.tls_port} {self.host}",
                f"cafile {self.tls_files.ca_file}",
                f"certfile {self.tls_files.server_cert}",
                f"keyfile {self.tls_files.server_key}",
                "require_certificate true",
            ]
        self.config_file.write_text("\n".join(lines) + "\n")

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Start the broker (again, on the same ports) and wait until a client gets a CONNACK."""
        if self.running:
            raise RuntimeError("mosquitto is already running")
        with self.log_file.open("ab") as log:
            self._proc = subprocess.Popen(
                [self.binary, "-c", str(self.config_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.kill()
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with {self._proc.returncode} at start:\n{self.log_tail()}"
                )
            if probe(self.host, self.port, min(1.0, max(0.05, deadline - time.monotonic()))):
                return
            time.sleep(0.02)  # between probes of a port that refused; not a wait for readiness
        raise RuntimeError(
            f"mosquitto on {self.host}:{self.port} gave no CONNACK within {timeout_s} s:\n"
            f"{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM: the broker disconnects everyone and writes its persistence file."""
        self._signal(signal.SIGTERM, timeout_s)

    def kill(self) -> None:
        """SIGKILL: no goodbye, no persistence written since the last save."""
        self._signal(signal.SIGKILL, 10.0)

    def _signal(self, sig: signal.Signals, timeout_s: float) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def pause(self) -> None:
        """SIGSTOP: connections stay open, and nothing is answered until ``resume()``."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after ``pause()``."""
        if self._proc is not None:
            self._proc.send_signal(signal.SIGCONT)

    def close(self) -> None:
        self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_file.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def client(self, client_id: str = "", **connect: str) -> mqtt.Client:
        """A connected plain paho client for the test's side of a conversation.

        The caller runs it with ``loop_start()`` / ``loop_stop()``; ``username`` and
        ``password`` may be passed.
        """
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=MQTTProtocolVersion.MQTTv5
        )
        if "username" in connect:
            c.username_pw_set(connect["username"], connect.get("password"))
        c.connect(self.host, self.port, keepalive=30)
        return c


def probe(host: str, port: int, timeout_s: float) -> bool:
    """True when a real MQTT v5 client gets a CONNACK (any reason code) from host:port."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=MQTTProtocolVersion.MQTTv5)
    got: list[bool] = []
    c.on_connect = lambda *_args: got.append(True)
    c.on_connect_fail = lambda *_args: None
    try:
        c.connect(host, port, keepalive=5)
    except OSError:
        return False
    try:
        deadline = time.monotonic() + timeout_s
        while not got and time.monotonic() < deadline:
            if c.loop(timeout=0.05) != mqtt.MQTT_ERR_SUCCESS and not got:
                return False
        return bool(got)
    finally:
        c.disconnect()
        c.loop(timeout=0.01)
        del c


@dataclass(frozen=True)
class Received:
    topic: str
    payload: bytes
    retain: bool


class Observer:
    """A plain paho client (not the code under test) that records what reaches a filter."""

    def __init__(self, broker: Mosquitto, topic_filter: str, **auth: str) -> None:
        self.messages: queue.Queue[Received] = queue.Queue()
        subscribed = threading.Event()
        self._client = broker.client(**auth)
        self._client.on_message = lambda _c, _u, m: self.messages.put(
            Received(m.topic, bytes(m.payload), bool(m.retain))
        )
        self._client.on_subscribe = lambda *_args: subscribed.set()
        self._client.loop_start()
        self._client.subscribe(topic_filter, qos=1)
        if not subscribed.wait(5.0):
            self.close()
            raise RuntimeError(f"observer: no SUBACK for {topic_filter}")

    def get(self, timeout_s: float = 5.0) -> Received:
        try:
            return self.messages.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"observer: nothing arrived within {timeout_s} s") from None

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        """QoS 1, returns once the broker acknowledged it."""
        info = self._client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(5.0)
        if not info.is_published():
            raise AssertionError(f"observer: no PUBACK for {topic} within 5 s")

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
