"""The front end's bounds on a real grpc.aio server over real sockets: malformed protobuf
messages, the in-flight byte budget, concurrent calls, and per-stream pending bytes."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2

from edgeserve.api.server import ServerBounds
from edgeserve.config import load_config
from edgeserve.errors import ConfigError
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.serving.registry import ModelRegistry
from edgeserve.types import InferRequest, InferResult
from tests.api.support import (
    WAIT_S,
    Api,
    LoopThread,
    live_model,
    scripted_submit,
    start_api,
    wait_for,
)
from tests.waiting import eventually

INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
METADATA = "/inference.GRPCInferenceService/ModelMetadata"
HEALTH = "/grpc.health.v1.Health/Check"
CORRUPT = b"\x0a\xff\xff\xff\xff\x0f"  # field 1, length far past the end


def _raw_request(model: str, x: np.ndarray, request_id: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
    request.raw_input_contents.append(x.tobytes())
    return request


class _Gate:
    """A model that holds every request until ``open`` (counting those it holds)."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.entered = 0
        self._event: asyncio.Event | None = None
        self._twice = scripted_submit("twice", ["x"], ["y"])

    async def submit(self, request: InferRequest) -> InferResult:
        if self._event is None:
            self._event = asyncio.Event()
        self.entered += 1
        await self._event.wait()
        return await self._twice(request)

    def open(self) -> None:
        def release() -> None:
            if self._event is None:
                self._event = asyncio.Event()
            self._event.set()

        self.loop.call(release)


@pytest.fixture
def bounded(loop_thread: LoopThread, short_dir: Path) -> Iterator[Any]:
    """bounded(**server kwargs) -> (Api, gate): a fresh server with a ``gate`` model
    (holds requests) and ``twice_fp32`` (answers at once); stopped at teardown."""
    started: list[Any] = []

    def make(**kwargs: Any) -> tuple[Api, _Gate]:
        registry = ModelRegistry()
        gate = _Gate(loop_thread)
        registry.add(
            live_model("gate", [("x", "FP32", (-1, -1))], [("y", "FP32", (-1, -1))], gate.submit)
        )
        registry.add(
            live_model(
                "twice_fp32",
                [("x", "FP32", (-1, -1))],
                [("y", "FP32", (-1, -1))],
                scripted_submit("twice", ["x"], ["y"]),
            )
        )
        ready = [True]
        folder = short_dir / str(len(started))
        server, socket_path, tcp = start_api(loop_thread, registry, folder, ready, **kwargs)
        started.append((server, gate))
        return Api(loop_thread, registry, server, socket_path, tcp, None, ready), gate  # type: ignore[arg-type]

    yield make
    for server, gate in started:
        gate.open()
        loop_thread.run(server.stop(0.5))


# -- malformed messages ---------------------------------------------------------------------


@pytest.mark.parametrize("method", [INFER, METADATA, HEALTH])
def test_a_malformed_message_is_invalid_argument(api: Api, method: str) -> None:
    with api.channel() as channel:
        call = channel.unary_unary(method)  # bytes in, bytes out: no serializer
        with pytest.raises(grpc.RpcError) as caught:
            call(CORRUPT, timeout=WAIT_S)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid protobuf message" in caught.value.details()


def test_valid_bytes_still_reach_the_servicer(api: Api) -> None:
    with api.channel(api.uds) as channel:
        answer = channel.unary_unary(HEALTH)(
            health_pb2.HealthCheckRequest().SerializeToString(), timeout=WAIT_S
        )
    assert health_pb2.HealthCheckResponse.FromString(answer).status == (
        health_pb2.HealthCheckResponse.SERVING
    )


def test_a_malformed_message_on_a_stream_is_answered_and_the_stream_goes_on(api: Api) -> None:
    good = _raw_request("twice_fp32", np.ones((1, 3), np.float32), "after").SerializeToString()
    with api.channel() as channel:
        call = channel.stream_stream(STREAM)
        answers = [
            pb.ModelStreamInferResponse.FromString(raw)
            for raw in call(iter([CORRUPT, good]), timeout=WAIT_S)
        ]
    errors = [a.error_message for a in answers if a.error_message]
    assert errors == ["malformed request: not a valid protobuf message"]
    assert [a.infer_response.id for a in answers if not a.error_message] == ["after"]


# -- in-flight bytes and calls --------------------------------------------------------------


def test_requests_over_the_inflight_budget_are_refused_at_once(bounded) -> None:
    api, gate = bounded(max_message_bytes=1 << 20, bounds=ServerBounds(inflight_bytes_factor=2))
    big = np.ones((1, 100_000), np.float32)  # 400 kB on the wire, charged 1.6 MB of 2 MiB
    with api.channel() as channel:
        stub = api.stub(channel)
        held = stub.ModelInfer.future(_raw_request("gate", big), timeout=30)
        wait_for(lambda: gate.entered == 1, "the first request to be held")
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as caught:
            stub.ModelInfer(_raw_request("twice_fp32", big), timeout=WAIT_S)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "server.inflight_bytes_factor" in caught.value.details()
        assert time.monotonic() - started < 2.0
        # A small request fits beside it and is served.
        small = stub.ModelInfer(_raw_request("twice_fp32", np.ones((1, 4), np.float32)))
        assert np.frombuffer(small.raw_output_contents[0], np.float32).tolist() == [2.0] * 4
        gate.open()
        assert held.result().model_name == "gate"
    wait_for(lambda: api.server.inflight.held_bytes == 0, "the budget to be given back")


def test_calls_past_max_concurrent_rpcs_are_refused(bounded) -> None:
    api, gate = bounded(bounds=ServerBounds(max_concurrent_rpcs=2))
    x = np.ones((1, 4), np.float32)
    with api.channel() as channel:
        stub = api.stub(channel)
        held = [stub.ModelInfer.future(_raw_request("gate", x), timeout=30) for _ in range(2)]
        wait_for(lambda: gate.entered == 2, "two calls to be held")
        # Another connection: on this one, HTTP/2 makes a third call wait for a stream.
        with api.channel(api.uds) as other, pytest.raises(grpc.RpcError) as caught:
            api.stub(other).ModelInfer(_raw_request("twice_fp32", x), timeout=WAIT_S)
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        gate.open()
        assert [f.result().model_name for f in held] == ["gate", "gate"]
        assert stub.ModelInfer(_raw_request("twice_fp32", x)).model_name == "twice_fp32"


def test_a_stream_that_is_never_read_stops_reading_at_its_byte_bound(bounded) -> None:
    limit = 1 << 20
    api, _ = bounded(max_message_bytes=4 << 20, bounds=ServerBounds(stream_max_pending_bytes=limit))
    served: list[int] = []
    twice = scripted_submit("twice", ["x"], ["y"])

    async def counting(request: InferRequest) -> InferResult:
        served.append(1)
        return await twice(request)

    spec = [("x", "FP32", (-1, -1))]
    api.loop.call(
        api.registry.add, live_model("counting", spec, [("y", "FP32", (-1, -1))], counting)
    )
    row = np.ones((1, 65_536), np.float32)  # 256 kB each way
    message = _raw_request("counting", row).SerializeToString()
    with api.channel() as channel:
        answers = channel.stream_stream(STREAM)(iter([message] * 200), timeout=60)  # never read
        try:
            time.sleep(2.0)  # the server reads, runs and answers what its bound lets in
            # Unread responses: the bound's worth in the server, and what HTTP/2 windows and
            # the kernel's socket buffers hold (a few MB on loopback); not the 200 sent.
            assert 2 <= len(served) <= limit // row.nbytes + 30, len(served)
            answers.cancel()
        finally:
            answers.cancel()


# -- connections ----------------------------------------------------------------------------


def test_connections_past_the_cap_do_not_lock_out_the_unix_socket(bounded) -> None:
    api, _ = bounded(bounds=ServerBounds(max_connections=8))
    host, port = api.tcp.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port))) for _ in range(30)]
    try:
        eventually(
            lambda: sum(_closed_by_peer(s) for s in idle) >= 30 - 8,
            "the connections past the cap to be closed",
            WAIT_S,
        )
        x = np.ones((1, 4), np.float32)
        with api.channel(api.uds) as channel:
            answer = api.stub(channel).ModelInfer(_raw_request("twice_fp32", x), timeout=WAIT_S)
        assert answer.model_name == "twice_fp32"
        closed = sum(_closed_by_peer(s) for s in idle)
        assert closed >= 30 - 8, f"only {closed} of 30 connections past the cap were closed"
    finally:
        for s in idle:
            s.close()


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(65536) == b""
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True


# -- configuration --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("server.max_connections", 0),
        ("server.connection_idle_s", 0),
        ("server.connection_max_age_s", 0.5),
        ("server.max_concurrent_rpcs", 0),
        ("server.inflight_bytes_factor", 0.5),
        ("server.stream_max_pending_bytes", 10),
        ("management.max_connections", 0),
        ("management.idle_timeout_s", 0),
    ],
)
def test_each_bound_is_checked_and_named(tmp_path: Path, key: str, value: float) -> None:
    section, name = key.split(".")
    path = tmp_path / "config.yaml"
    path.write_text(f"{section}:\n  {name}: {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path, env={}, overrides={"run_dir": "/run/es-test"})
    assert str(caught.value).startswith(f"{key}: must be"), caught.value


# -- HTTP/2: connection age and ping enforcement, seen as the frames the server sends -------

_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
_GOAWAY, _PING = 0x7, 0x6
_ENHANCE_YOUR_CALM = 0xB


def _frames_until_goaway(sock: socket.socket, within_s: float, ping_every_s: float = 0) -> int:
    """Read frames (sending an 8-byte PING every ``ping_every_s``) until a GOAWAY; its
    error code, or -1 when none came within ``within_s``."""
    buffer = b""
    deadline = time.monotonic() + within_s
    next_ping = time.monotonic()
    sock.settimeout(0.05)
    while time.monotonic() < deadline:
        if ping_every_s and time.monotonic() >= next_ping:
            sock.sendall(b"\x00\x00\x08" + bytes([_PING, 0]) + b"\x00" * 4 + b"12345678")
            next_ping += ping_every_s
        try:
            data = sock.recv(65536)
        except TimeoutError:
            continue
        if not data:
            return -1
        buffer += data
        while len(buffer) >= 9:
            length = int.from_bytes(buffer[:3], "big")
            if len(buffer) < 9 + length:
                break
            kind, payload = buffer[3], buffer[9 : 9 + length]
            buffer = buffer[9 + length :]
            if kind == _GOAWAY:
                return int.from_bytes(payload[4:8], "big")
    return -1


def test_connections_end_at_their_maximum_age(bounded) -> None:
    aged, _ = bounded(bounds=ServerBounds(connection_idle_s=600, connection_max_age_s=1))
    host, port = aged.tcp.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(_PREFACE)
        assert _frames_until_goaway(sock, within_s=5) == 0  # NO_ERROR: a graceful GOAWAY
    ageless, _ = bounded(bounds=ServerBounds(connection_idle_s=600))
    host, port = ageless.tcp.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(_PREFACE)
        assert _frames_until_goaway(sock, within_s=3) == -1


def test_a_client_that_pings_too_often_is_sent_away(api: Api) -> None:
    host, port = api.tcp.rsplit(":", 1)
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(_PREFACE)
        assert _frames_until_goaway(sock, within_s=10, ping_every_s=0.05) == _ENHANCE_YOUR_CALM
