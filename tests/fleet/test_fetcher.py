"""The fetcher against a real Mosquitto and a real local HTTP(S) server, on real files.

``ArtifactServer`` serves one file with ``Range`` support from a thread and can be told to
misbehave: drop the connection part-way, stall, send endless or wrong bytes, ignore Range.
It counts the body bytes it sent, so resume claims are checked on the server side.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import threading
import uuid
from collections.abc import Coroutine
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edgeserve.errors import InvalidArgument
from edgeserve.fleet.artifacts import CHUNK_BYTES, chunk_count, chunk_size, chunk_topic
from edgeserve.fleet.fetcher import Artifact, ArtifactRejected, Fetcher, FetchError, FetchFailed
from edgeserve.fleet.link import FleetLink
from edgeserve.types import NetworkCounters
from tests.mqtt_broker import Mosquitto, generate_tls

T = TypeVar("T")
WAIT_S = 10.0
SIZE = 1_300_000


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


class ArtifactServer:
    """A real HTTP server on 127.0.0.1 in a thread, serving ``data`` at /a.esar."""

    def __init__(self, data: bytes, tls: ssl.SSLContext | None = None) -> None:
        self.data = data
        self.mode = "normal"  # drop | stall | endless | ignore_range
        self.cut_at = len(data) // 2  # body bytes before a drop or a stall (first request)
        self.sent = 0
        self.ranges: list[str | None] = []
        self.release = threading.Event()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._server.handle_error = lambda *_: None  # type: ignore[method-assign]
        if tls is not None:
            self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        scheme = "https" if tls else "http"
        self.url = f"{scheme}://127.0.0.1:{self._server.server_address[1]}/a.esar"

    def __enter__(self) -> ArtifactServer:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *_: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
                try:
                    server.serve(self)
                except (BrokenPipeError, ConnectionResetError, ssl.SSLError):
                    self.close_connection = True

        return Handler

    def serve(self, h: BaseHTTPRequestHandler) -> None:
        data, header = self.data, h.headers.get("Range")
        self.ranges.append(header)
        first_request = len(self.ranges) == 1
        start = int(header.removeprefix("bytes=").rstrip("-")) if header else 0
        if self.mode == "ignore_range":
            start, header = 0, None
        if start >= len(data):
            h.send_response(416)
            h.send_header("Content-Range", f"bytes */{len(data)}")
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        body = data[start:]
        h.send_response(206 if header else 200)
        if header:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        if self.mode == "endless":
            h.send_header("Connection", "close")
            h.end_headers()
            self._send(h, body)
            while not self.release.is_set():
                self._send(h, b"\0" * 65536)
            return
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if first_request and self.mode in ("drop", "stall"):
            self._send(h, body[: self.cut_at - start])
            if self.mode == "stall":
                self.release.wait(WAIT_S)
            h.close_connection = True
            return
        self._send(h, body)

    def _send(self, h: BaseHTTPRequestHandler, block: bytes) -> None:
        h.wfile.write(block)
        h.wfile.flush()
        self.sent += len(block)


@pytest.fixture
def data() -> bytes:
    return os.urandom(SIZE)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


def make_fetcher(state: Path, counters: NetworkCounters, **options: Any) -> Fetcher:
    options.setdefault("max_bytes", 64 * 1024 * 1024)
    options.setdefault("http_timeout_s", 2.0)
    options.setdefault("stall_timeout_s", 5.0)
    options.setdefault("backoff_initial_s", 0.02)
    options.setdefault("backoff_max_s", 0.1)
    return Fetcher(state / "staging", state_dir=state, counters=counters, **options)


def artifact_of(data: bytes, url: str | None = None, length: int | None = None) -> Artifact:
    sha = hashlib.sha256(data).hexdigest()
    return Artifact("mlp", "2", sha, len(data) if length is None else length, url)


def staged(state: Path) -> list[str]:
    staging = state / "staging"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


# -- HTTP ----------------------------------------------------------------------------------


def test_http_fetch_verifies_and_counts(data: bytes, state: Path) -> None:
    counters = NetworkCounters()
    with ArtifactServer(data) as server:
        artifact = artifact_of(data, server.url)
        path = run(make_fetcher(state, counters).fetch(artifact, "p"))
        assert path.read_bytes() == data and path.name == f"{artifact.sha256}.esar"
        assert counters.artifacts == SIZE == server.sent
        # Already staged and still verifying: no second download.
        assert run(make_fetcher(state, counters).fetch(artifact, "p")) == path
        assert server.sent == SIZE and len(server.ranges) == 1
    assert staged(state) == [path.name]


def test_http_resumes_after_a_dropped_connection(data: bytes, state: Path) -> None:
    counters = NetworkCounters()
    with ArtifactServer(data) as server:
        server.mode, server.cut_at = "drop", 600_000
        path = run(make_fetcher(state, counters).fetch(artifact_of(data, server.url), "p"))
        assert path.read_bytes() == data
        assert server.ranges == ["bytes=0-", "bytes=600000-"]
        assert server.sent < 1.3 * SIZE
        assert counters.artifacts == server.sent == SIZE


def test_http_stall_times_out_and_resumes(data: bytes, state: Path) -> None:
    counters = NetworkCounters()
    with ArtifactServer(data) as server:
        server.mode = "stall"
        fetcher = make_fetcher(state, counters, http_timeout_s=0.5)
        path = run(fetcher.fetch(artifact_of(data, server.url), "p"))
        assert path.read_bytes() == data and len(server.ranges) == 2
        assert server.sent == SIZE


def test_http_endless_data_is_cut_at_the_declared_length(data: bytes, state: Path) -> None:
    counters = NetworkCounters()
    with ArtifactServer(data) as server:
        server.mode = "endless"
        with pytest.raises(ArtifactRejected, match=f"more than the declared {SIZE} bytes"):
            run(make_fetcher(state, counters).fetch(artifact_of(data, server.url), "p"))
        server.release.set()
        assert counters.artifacts <= SIZE + 65536  # read at most one block past the cap
    assert staged(state) == []


@pytest.mark.parametrize("declared", [SIZE - 1000, SIZE + 1000])
def test_http_wrong_length_is_refused(data: bytes, state: Path, declared: int) -> None:
    with ArtifactServer(data) as server:
        artifact = Artifact("mlp", "2", "0" * 64, declared, server.url)
        counters = NetworkCounters()
        with pytest.raises(ArtifactRejected, match=f"server has {SIZE} bytes.*says {declared}"):
            run(make_fetcher(state, counters).fetch(artifact, "p"))
        assert counters.artifacts == 0  # refused on the headers, before any body byte
    assert staged(state) == []


def test_http_sha256_mismatch_discards(data: bytes, state: Path) -> None:
    wrong = bytes([data[0] ^ 1]) + data[1:]
    with ArtifactServer(wrong) as server:
        artifact = artifact_of(data, server.url)
        actual = hashlib.sha256(wrong).hexdigest()
        with pytest.raises(ArtifactRejected) as caught:
            run(make_fetcher(state, NetworkCounters()).fetch(artifact, "p"))
        message = str(caught.value)
        assert f"expected {artifact.sha256}" in message and f"got {actual}" in message
        assert "discarded" in message
    assert staged(state) == []


def test_http_restart_mid_download_resumes(data: bytes, state: Path) -> None:
    with ArtifactServer(data) as server:
        server.mode, server.cut_at = "stall", 1_100_000
        artifact = artifact_of(data, server.url)

        async def first() -> None:
            reached = asyncio.Event()
            fetch = asyncio.ensure_future(
                make_fetcher(state, NetworkCounters()).fetch(
                    artifact, "p", progress=lambda done, _t: done >= 1 << 20 and reached.set()
                )
            )
            await reached.wait()
            fetch.cancel()  # the daemon stops half-way
            with pytest.raises(asyncio.CancelledError):
                await fetch

        run(first())
        kept = (state / "staging" / f"{artifact.sha256}.part").stat().st_size
        assert 1 << 20 <= kept <= 1_100_000  # what was read before the cancel stopped it
        server.release.set()
        counters = NetworkCounters()
        path = run(make_fetcher(state, counters).fetch(artifact, "p"))
        assert path.read_bytes() == data
        assert server.ranges[-1] == f"bytes={kept}-"
        assert counters.artifacts == SIZE - kept
        assert server.sent < 1.3 * SIZE


def test_http_server_ignoring_range_restarts_from_zero(data: bytes, state: Path) -> None:
    with ArtifactServer(data) as server:
        server.mode = "ignore_range"
        artifact = artifact_of(data, server.url)
        part = state / "staging" / f"{artifact.sha256}.part"
        part.parent.mkdir(parents=True)
        part.write_bytes(b"x" * 1000)  # a prefix the server will not continue
        path = run(make_fetcher(state, NetworkCounters()).fetch(artifact, "p"))
        assert path.read_bytes() == data


def test_http_error_status_retries_then_fails(data: bytes, state: Path) -> None:
    with ArtifactServer(data) as server:
        artifact = artifact_of(data, server.url.replace("/a.esar", "/missing"))
        server.data = b""  # every request is answered 416 with total 0: a wrong length
        with pytest.raises(ArtifactRejected, match="server has 0 bytes"):
            run(make_fetcher(state, NetworkCounters()).fetch(artifact, "p"))
    port_closed = artifact_of(data, "http://127.0.0.1:9/a.esar")
    with pytest.raises(FetchFailed, match="after 2 attempts.*kept") as caught:
        run(make_fetcher(state, NetworkCounters(), max_attempts=2).fetch(port_closed, "p"))
    assert caught.value.__cause__ is None and caught.value.__context__ is None


def test_https_verifies_the_server(data: bytes, state: Path, tmp_path: Path) -> None:
    files = generate_tls(tmp_path / "tls")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.server_cert, files.server_key)
    with ArtifactServer(data, tls=context) as server:
        artifact = artifact_of(data, server.url)
        with pytest.raises(FetchFailed, match="CERTIFICATE_VERIFY_FAILED"):
            run(make_fetcher(state, NetworkCounters(), max_attempts=1).fetch(artifact, "p"))
        trusted = make_fetcher(state, NetworkCounters(), http_ca_file=str(files.ca_file))
        assert run(trusted.fetch(artifact, "p")).read_bytes() == data


# -- MQTT ----------------------------------------------------------------------------------


async def connected(broker: Mosquitto) -> FleetLink:
    link = FleetLink(
        host=broker.host,
        port=broker.port,
        client_id=f"t-{uuid.uuid4().hex[:8]}",
        backoff_initial_s=0.05,
        backoff_max_s=0.5,
    )
    await link.start()
    await link.wait_connected(WAIT_S)
    return link


async def publish_chunks(
    broker: Mosquitto, prefix: str, sha: str, chunks: dict[int, bytes]
) -> None:
    """Publish raw retained chunks, right or wrong, as a controller would."""
    link = await connected(broker)
    try:
        for index, payload in chunks.items():
            await link.publish(chunk_topic(prefix, sha, index), payload, retain=True)
    finally:
        await link.close()


def split(data: bytes) -> dict[int, bytes]:
    return {
        i: data[i * CHUNK_BYTES : i * CHUNK_BYTES + chunk_size(len(data), i)]
        for i in range(chunk_count(len(data)))
    }


async def fetch_over_mqtt(
    broker: Mosquitto, state: Path, artifact: Artifact, prefix: str, counters: NetworkCounters
) -> Path:
    link = await connected(broker)
    try:
        return await make_fetcher(state, counters, link=link).fetch(artifact, prefix)
    finally:
        await link.close()


def test_mqtt_chunk_of_the_wrong_size_is_refused(
    mosquitto: Mosquitto, data: bytes, state: Path
) -> None:
    prefix, artifact = f"test/{uuid.uuid4().hex[:8]}", artifact_of(data)
    chunks = split(data)
    chunks[1] = chunks[1][:-1]
    run(publish_chunks(mosquitto, prefix, artifact.sha256, chunks))
    with pytest.raises(ArtifactRejected, match=f"chunk 1 is {CHUNK_BYTES - 1} bytes"):
        run(fetch_over_mqtt(mosquitto, state, artifact, prefix, NetworkCounters()))
    assert staged(state) == []


def test_mqtt_chunk_beyond_the_last_is_refused(
    mosquitto: Mosquitto, data: bytes, state: Path
) -> None:
    prefix, artifact = f"test/{uuid.uuid4().hex[:8]}", artifact_of(data)
    chunks = split(data) | {5: b"more"}
    run(publish_chunks(mosquitto, prefix, artifact.sha256, chunks))
    with pytest.raises(ArtifactRejected, match="chunk 5, beyond the last of 5"):
        run(fetch_over_mqtt(mosquitto, state, artifact, prefix, NetworkCounters()))
    assert staged(state) == []


def test_mqtt_sha256_mismatch_discards(mosquitto: Mosquitto, data: bytes, state: Path) -> None:
    prefix, artifact = f"test/{uuid.uuid4().hex[:8]}", artifact_of(data)
    other = os.urandom(SIZE)  # right sizes, wrong bytes
    run(publish_chunks(mosquitto, prefix, artifact.sha256, split(other)))
    actual = hashlib.sha256(other).hexdigest()
    with pytest.raises(ArtifactRejected, match=f"expected {artifact.sha256}.*got {actual}"):
        run(fetch_over_mqtt(mosquitto, state, artifact, prefix, NetworkCounters()))
    assert staged(state) == []


def test_mqtt_restart_mid_download_fetches_only_what_is_missing(
    mosquitto: Mosquitto, data: bytes, state: Path
) -> None:
    prefix, artifact = f"test/{uuid.uuid4().hex[:8]}", artifact_of(data)
    chunks = split(data)
    first_half = {i: chunks[i] for i in (0, 1, 3)}  # out of order, with a gap
    have = sum(len(c) for c in first_half.values())

    async def first() -> None:
        await publish_chunks(mosquitto, prefix, artifact.sha256, first_half)
        link = await connected(mosquitto)
        reached = asyncio.Event()
        try:
            fetch = asyncio.ensure_future(
                make_fetcher(state, NetworkCounters(), link=link).fetch(
                    artifact, prefix, progress=lambda done, _t: done >= have and reached.set()
                )
            )
            await reached.wait()
            fetch.cancel()  # the daemon stops half-way
            with pytest.raises(asyncio.CancelledError):
                await fetch
        finally:
            await link.close()

    run(first())
    assert sorted(staged(state)) == [f"{artifact.sha256}.chunks", f"{artifact.sha256}.part"]
    run(publish_chunks(mosquitto, prefix, artifact.sha256, chunks))
    counters = NetworkCounters()
    path = run(fetch_over_mqtt(mosquitto, state, artifact, prefix, counters))
    assert path.read_bytes() == data
    assert counters.artifacts == SIZE - have  # only the missing chunks moved
    assert staged(state) == [path.name]


def test_mqtt_needs_a_link(data: bytes, state: Path) -> None:
    with pytest.raises(FetchError, match="comes over MQTT, but there is no link"):
        run(make_fetcher(state, NetworkCounters()).fetch(artifact_of(data), "p"))


# -- limits and plumbing -------------------------------------------------------------------


def test_staging_outside_the_state_dir_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    for staging in (tmp_path / "elsewhere", state, state / ".." / "x"):
        with pytest.raises(InvalidArgument, match="must lie inside the state dir"):
            Fetcher(staging, state_dir=state, counters=NetworkCounters(), max_bytes=1)
    (state / "escape").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(InvalidArgument, match="must lie inside the state dir"):
        Fetcher(state / "escape", state_dir=state, counters=NetworkCounters(), max_bytes=1)


def test_over_the_device_limit_is_refused_up_front(data: bytes, state: Path) -> None:
    artifact = artifact_of(data, "http://127.0.0.1:9/a.esar")
    with pytest.raises(FetchError, match=f"{SIZE} bytes; this device takes at most 1000"):
        run(make_fetcher(state, NetworkCounters(), max_bytes=1000).fetch(artifact, "p"))


def test_artifact_entries_are_checked() -> None:
    entry = {"name": "m", "version": "1", "sha256": "a" * 64, "length": 5}
    assert Artifact.from_entry(entry | {"source": {"mqtt": True}}).url is None
    url = "https://example.test/a.esar"
    assert Artifact.from_entry(entry | {"source": {"url": url}}).url == url
    for bad in (
        entry | {"source": {}},
        entry | {"source": {"url": "file:///etc/passwd"}},
        entry | {"source": {"mqtt": True}, "sha256": "A" * 64},
        entry | {"source": {"mqtt": True}, "length": 0},
    ):
        with pytest.raises(InvalidArgument):
            Artifact.from_entry(bad)


def test_network_counters_add_up() -> None:
    counters = NetworkCounters()
    counters.add("artifacts", 10)
    counters.add("control", 2)
    counters.add("telemetry", 3)
    counters.add("artifacts", 5)
    assert counters.snapshot() == {"artifacts": 15, "control": 2, "telemetry": 3}
    threads = [
        threading.Thread(target=lambda: [counters.add("telemetry", 1) for _ in range(1000)])
        for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counters.telemetry == 4003
    with pytest.raises(ValueError, match="purpose"):
        counters.add("video", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=">= 0"):
        counters.add("control", -1)
