"""The server around the servicer: listeners, health, reflection, limits, graceful stop."""

from __future__ import annotations

import asyncio
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from edgeserve.api.server import InferenceServer
from edgeserve.errors import ConfigError
from edgeserve.serving.registry import ModelRegistry, ModelState
from edgeserve.types import InferRequest, InferResult
from tests.api.support import (
    WAIT_S,
    Api,
    LoopThread,
    live_model,
    scripted_submit,
    start_api,
    twice_model,
    wait_for,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Servers:
    """Extra servers for one test, each stopped at teardown."""

    def __init__(self, loop: LoopThread, folder: Path) -> None:
        self.loop = loop
        self.folder = folder
        self.started: list[InferenceServer] = []

    def start(self, registry: ModelRegistry, **kwargs: Any) -> tuple[InferenceServer, Path, str]:
        server, socket_path, tcp = start_api(self.loop, registry, self.folder, [True], **kwargs)
        self.started.append(server)
        return server, socket_path, tcp


@pytest.fixture
def servers(loop_thread: LoopThread, short_dir: Path) -> Iterator[Servers]:
    factory = Servers(loop_thread, short_dir)
    try:
        yield factory
    finally:
        for server in factory.started:
            loop_thread.run(server.stop(None))


def health_status(channel: grpc.Channel, service: str) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def fp32_input(x: np.ndarray) -> triton.InferInput:
    inp = triton.InferInput("x", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    return inp


# -- health -------------------------------------------------------------------------------


def test_health_overall_and_per_model(api: Api) -> None:
    with api.channel() as channel:
        assert health_status(channel, "") == SERVING
        for service in ("twice_fp32", "twice_fp32/1", "versioned", "versioned/1", "versioned/2"):
            assert health_status(channel, service) == SERVING, service
        with pytest.raises(grpc.RpcError) as info:
            health_status(channel, "nope")
        assert info.value.code() is grpc.StatusCode.NOT_FOUND


def test_health_follows_model_readiness(api: Api) -> None:
    with api.channel() as channel:
        api.set_state("flaky", "1", ModelState.DRAINING)
        try:
            wait_for(lambda: health_status(channel, "flaky") == NOT_SERVING, "flaky NOT_SERVING")
            assert health_status(channel, "flaky/1") == NOT_SERVING
            assert health_status(channel, "twice_fp32") == SERVING
        finally:
            api.set_state("flaky", "1", ModelState.READY)
        wait_for(lambda: health_status(channel, "flaky") == SERVING, "flaky SERVING again")
        assert health_status(channel, "flaky/1") == SERVING


def test_health_watch_sees_a_removed_model_stop_serving(api: Api) -> None:
    api.loop.call(api.registry.add, twice_model("FP32", name="passing"))
    with api.channel() as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        wait_for(lambda: health_status(channel, "passing") == SERVING, "passing SERVING")
        watch = stub.Watch(health_pb2.HealthCheckRequest(service="passing"), timeout=WAIT_S)
        assert next(watch).status == SERVING
        removed = api.loop.call(api.registry.remove, "passing", "1")
        assert removed.state is ModelState.DRAINING  # until lifecycle has closed it
        assert next(watch).status == NOT_SERVING
        watch.cancel()
        assert health_status(channel, "passing/1") == NOT_SERVING


def test_health_overall_follows_is_ready(api: Api) -> None:
    with api.channel() as channel:
        api.ready[0] = False
        try:
            assert health_status(channel, "") == NOT_SERVING
        finally:
            api.ready[0] = True
        assert health_status(channel, "") == SERVING


# -- reflection ---------------------------------------------------------------------------


def test_reflection_lists_and_describes_every_service(api: Api) -> None:
    with api.channel(api.uds) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {
            "inference.GRPCInferenceService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= services
        pool = descriptor_pool.DescriptorPool(database)
        inference = pool.FindServiceByName("inference.GRPCInferenceService")
        assert {m.name for m in inference.methods} >= {"ModelInfer", "ModelStreamInfer"}
        infer = pool.FindMessageTypeByName("inference.ModelInferRequest")
        assert infer.fields_by_name["raw_input_contents"].number == 7
        health = pool.FindServiceByName("grpc.health.v1.Health")
        assert {m.name for m in health.methods} >= {"Check", "Watch"}


# -- listeners ----------------------------------------------------------------------------


@pytest.mark.parametrize("address", ["0.0.0.0:8001", "10.1.2.3:80", "[::]:8001", "example.com:80"])
def test_non_loopback_addresses_are_refused(address: str) -> None:
    with pytest.raises(ConfigError) as info:
        InferenceServer(
            registry=ModelRegistry(),
            listen=[address],
            max_message_bytes=1024,
            is_ready=lambda: True,
            server_version="1",
        )
    assert info.value.key == "server.listen"
    assert f"'{address}'" in str(info.value) and "loopback" in str(info.value)


@pytest.mark.parametrize(
    "address", ["nonsense", "127.0.0.1:http", "unix://", "unix:relative.sock", "unix-abstract:x"]
)
def test_malformed_addresses_are_refused(address: str) -> None:
    with pytest.raises(ConfigError, match="server.listen"):
        InferenceServer(
            registry=ModelRegistry(),
            listen=[address],
            max_message_bytes=1024,
            is_ready=lambda: True,
            server_version="1",
        )


def test_non_loopback_allowed_when_configured(loop_thread: LoopThread) -> None:
    server = InferenceServer(
        registry=ModelRegistry(),
        listen=["0.0.0.0:0", "[::1]:0", "localhost:0", "tcp://127.0.0.1:0"],
        max_message_bytes=1024,
        is_ready=lambda: True,
        server_version="1",
        allow_non_loopback=True,
    )
    addresses = loop_thread.run(server.start())
    try:
        ports = [int(a.rpartition(":")[2]) for a in addresses]
        assert all(port > 0 for port in ports)
        assert addresses[0].startswith("0.0.0.0:")
        assert addresses[1].startswith("[::1]:") and addresses[3].startswith("127.0.0.1:")
        with triton.InferenceServerClient(f"127.0.0.1:{ports[0]}") as client:
            assert client.is_server_live()
    finally:
        loop_thread.run(server.stop(None))


def test_unix_socket_is_group_only_and_parent_is_created(api: Api) -> None:
    assert api.socket_path.parent.is_dir()
    mode = api.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o660


def test_stale_socket_is_replaced(servers: Servers, short_dir: Path) -> None:
    path = short_dir / "run" / "inference.sock"
    path.parent.mkdir()
    dead = socket.socket(socket.AF_UNIX)
    dead.bind(str(path))
    dead.close()  # the file stays behind, as after a crash
    assert stat.S_ISSOCK(path.lstat().st_mode)
    registry = ModelRegistry()
    servers.start(registry)
    with triton.InferenceServerClient(f"unix://{path}") as client:
        assert client.is_server_live()


def test_live_socket_and_other_files_are_refused(servers: Servers, short_dir: Path) -> None:
    path = short_dir / "run" / "inference.sock"
    path.parent.mkdir()
    with socket.socket(socket.AF_UNIX) as live:
        live.bind(str(path))
        live.listen()
        with pytest.raises(ConfigError, match="another process is listening"):
            servers.start(ModelRegistry())
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(ConfigError, match="is not a socket"):
        servers.start(ModelRegistry())
    assert path.read_text() == "not a socket"


def test_socket_is_removed_on_stop(loop_thread: LoopThread, short_dir: Path) -> None:
    server, path, _ = start_api(loop_thread, ModelRegistry(), short_dir, [True])
    assert path.exists()
    loop_thread.run(server.stop(None))
    assert not path.exists()


# -- limits and stop ----------------------------------------------------------------------


def test_stream_in_flight_limit(servers: Servers) -> None:
    active = [0]
    peak = [0]
    twice = scripted_submit("twice", ["x"], ["y"])

    async def counting(request: InferRequest) -> InferResult:
        active[0] += 1
        peak[0] = max(peak[0], active[0])
        try:
            await asyncio.sleep(0.02)  # a model that takes 20 ms
            return await twice(request)
        finally:
            active[0] -= 1

    registry = ModelRegistry()
    registry.add(live_model("count", [("x", "FP32", (-1, 3))], [("y", "FP32", (-1, 3))], counting))
    _, _, tcp = servers.start(registry, max_stream_in_flight=2)
    answers: list[object] = []
    done = threading.Event()

    def collect(result: object, error: object) -> None:
        answers.append(error or result)
        if len(answers) == 8:
            done.set()

    with triton.InferenceServerClient(tcp) as client:
        client.start_stream(callback=collect)
        for i in range(8):
            client.async_stream_infer(
                "count", [fp32_input(np.ones((1, 3), np.float32))], request_id=str(i)
            )
        assert done.wait(WAIT_S)
        client.stop_stream()
    assert all(isinstance(a, triton.InferResult) for a in answers), answers
    assert peak[0] == 2


def test_graceful_stop_finishes_requests_in_flight(servers: Servers) -> None:
    entered = threading.Event()
    release: list[asyncio.Event] = []
    twice = scripted_submit("twice", ["x"], ["y"])

    async def held(request: InferRequest) -> InferResult:
        release.append(asyncio.Event())
        entered.set()
        await asyncio.wait_for(release[0].wait(), WAIT_S)
        return await twice(request)

    registry = ModelRegistry()
    registry.add(live_model("held", [("x", "FP32", (-1, 3))], [("y", "FP32", (-1, 3))], held))
    server, path, tcp = servers.start(registry)
    outcome: list[object] = []

    def call() -> None:
        with triton.InferenceServerClient(tcp) as client:
            try:
                outcome.append(client.infer("held", [fp32_input(np.ones((1, 3), np.float32))]))
            except triton.InferenceServerException as exc:
                outcome.append(exc)

    caller = threading.Thread(target=call)
    caller.start()
    assert entered.wait(WAIT_S)
    loop = servers.loop.loop
    stopping = asyncio.run_coroutine_threadsafe(server.stop(WAIT_S), loop)

    def refused() -> bool:
        with triton.InferenceServerClient(tcp) as client:
            try:
                client.is_server_live(client_timeout=1)
            except triton.InferenceServerException:
                return True
        return False

    wait_for(refused, "the server to stop accepting new calls")
    assert not stopping.done()
    loop.call_soon_threadsafe(release[0].set)
    stopping.result(WAIT_S)
    caller.join(WAIT_S)
    (result,) = outcome
    assert isinstance(result, triton.InferResult), result
    np.testing.assert_array_equal(result.as_numpy("y"), np.full((1, 3), 2, np.float32))
    assert not path.exists()
