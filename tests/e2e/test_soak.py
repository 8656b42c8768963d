"""Issue 10's soak: a real daemon under valid load from a few clients while hostile ones
do what they can (idle TCP and management connections, a stream that never reads and one
that reads slowly, oversize and malformed messages, huge dims with no elements, long model
names). Every valid request succeeds, memory stays bounded, and once the hostile clients
leave the daemon's open descriptors are back where they started. About a minute."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import partial

import grpc
import numpy as np

from edgeserve.api.client import InferenceClient
from edgeserve.proto import kserve_v2_pb2 as pb
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc
from tests.e2e.bounds_support import (
    MAX_BATCH,
    MESSAGE_LIMIT,
    PeakRss,
    channel,
    close_all,
    idle_connections,
    infer_request,
    open_fds,
    rss_bytes,
    start_daemon,
)
from tests.management.conftest import open_run_dir, run_cli
from tests.management.test_relay_bounds import answers, hold_connections
from tests.waiting import eventually

SOAK_S = 30.0
MIB = 1 << 20
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
INFER = "/inference.GRPCInferenceService/ModelInfer"


class _Load:
    """Valid clients in threads until ``stop``; every outcome that is not a success kept."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.ok = 0
        self.failures: list[str] = []
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []

    def run(self, what: str, step: Callable[[], None]) -> None:
        def loop() -> None:
            while not self.stop.is_set():
                try:
                    step()
                except Exception as exc:  # noqa: BLE001 (every failure is the finding)
                    with self._lock:
                        self.failures.append(f"{what}: {type(exc).__name__}: {exc}")
                else:
                    with self._lock:
                        self.ok += 1

        thread = threading.Thread(target=loop, name=what)
        thread.start()
        self._threads.append(thread)

    def join(self) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)


def _code(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as exc:
        return f"{exc.code().name} {len(exc.details() or '')}"
    return "OK"


def test_soak(daemons, mlp_archive_factory, wide_archives, accounts) -> None:
    daemon = start_daemon(
        daemons,
        mlp_archive_factory("1"),
        wide_archives("wide", 0.1),
        sections={
            "server": {
                "max_message_bytes": MESSAGE_LIMIT,
                "connection_idle_s": 2,
                "stream_max_pending_bytes": 8 * MIB,
                "inflight_bytes_factor": 8,
            },
            "management": {"allowed_group": accounts.group, "idle_timeout_s": 3},
        },
    )
    open_run_dir(daemon, accounts.gid)
    pid = daemon.process.pid
    x = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    with InferenceClient(daemon.tcp) as warm:
        expected = warm.infer("mlp", {"x": x})[1]["output__0"]
    fds_before, rss_before = open_fds(pid), rss_bytes(pid)

    load = _Load()
    tcp, uds = InferenceClient(daemon.tcp), InferenceClient(daemon.uds_address)

    def check(client: InferenceClient) -> Callable[[], None]:
        def step() -> None:
            got = client.infer("mlp", {"x": x}, timeout=30)[1]["output__0"]
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)

        return step

    def new_client() -> None:  # a fresh connection each time
        with InferenceClient(daemon.tcp) as client:
            check(client)()

    hostile: dict[str, list[str]] = {}
    with PeakRss(pid) as rss:
        load.run("tcp", check(tcp))
        load.run("uds", check(uds))
        load.run("new connections", new_client)

        # Idle connections: silent, and HTTP/2 ones with no call; management as a member.
        idle = idle_connections(daemon.tcp, 200, preface=False)
        idle += idle_connections(daemon.tcp, 50, preface=True)
        holder = hold_connections(accounts.insider, daemon.run_dir / "management.sock", 40)

        # Streams: one never read, one read slowly.
        wide = infer_request("wide", 1).SerializeToString()
        never = channel(daemon.tcp)
        unread = never.stream_stream(STREAM)(iter([wide] * 60), timeout=120)
        slow = channel(daemon.tcp)
        slow_answers = slow.stream_stream(STREAM)(iter([wide] * 30), timeout=120)

        def read_slowly() -> None:
            for _ in slow_answers:
                time.sleep(0.5)

        slow_reader = threading.Thread(target=read_slowly)
        slow_reader.start()

        # One-shot hostile requests, each repeated through the soak.
        big = infer_request("wide", MAX_BATCH)
        oversize = infer_request("wide", MAX_BATCH)
        oversize.raw_input_contents[0] += b"\0" * (6 * MIB)
        empty_huge = pb.ModelInferRequest(model_name="mlp")
        empty_huge.inputs.add(name="x", datatype="FP32", shape=[0, 1 << 40])
        empty_huge.raw_input_contents.append(b"")
        long_name = pb.ModelInferRequest(model_name="m" * 20_000)
        started = time.monotonic()
        while time.monotonic() - started < SOAK_S:
            # A connection per round: one left idle past connection_idle_s while status
            # runs would get the server's idle GOAWAY, and a call racing it UNAVAILABLE.
            with channel(daemon.tcp) as chan:
                stub = pb_grpc.GRPCInferenceServiceStub(chan)
                raw = chan.unary_unary(INFER)
                for name, call in (
                    ("max size", partial(stub.ModelInfer, big, timeout=30)),
                    ("oversize", partial(stub.ModelInfer, oversize, timeout=30)),
                    ("malformed", partial(raw, b"\x0a\xff\xff\xff\xff\x0f", timeout=30)),
                    ("huge dims, no elements", partial(stub.ModelInfer, empty_huge, timeout=30)),
                    ("long model name", partial(stub.ModelInfer, long_name, timeout=30)),
                ):
                    hostile.setdefault(name, []).append(_code(call))
            status = run_cli("status", "--config", str(daemon.config))  # root, valid
            if not answers(status):
                load.failures.append(f"edgeserve status: {status.stdout}{status.stderr}")
            time.sleep(0.5)

        # The hostile clients leave.
        unread.cancel()
        slow_answers.cancel()
        slow_reader.join(timeout=30)
        never.close()
        slow.close()
        close_all(idle)
        holder.kill()
        holder.communicate()
        served = load.ok  # the valid clients go on being served once the others left
        eventually(lambda: load.ok >= served + 50, "valid requests after the hostile clients")
        load.join()
    tcp.close()
    uds.close()

    assert load.failures == [], load.failures[:5]
    assert load.ok > 100, f"only {load.ok} valid requests in {SOAK_S:.0f} s"
    codes = {name: sorted({c.split()[0] for c in seen}) for name, seen in hostile.items()}
    assert set(codes["max size"]) <= {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert codes["oversize"] == ["RESOURCE_EXHAUSTED"], codes
    assert codes["malformed"] == ["INVALID_ARGUMENT"], codes
    assert codes["huge dims, no elements"] == ["INVALID_ARGUMENT"], codes
    assert codes["long model name"] == ["NOT_FOUND"], codes
    assert all(int(c.split()[1]) < 1000 for c in hostile["long model name"]), "name echoed"
    grown = (rss.peak - rss_before) / MIB
    print(f"soak: {load.ok} valid requests, peak RSS +{grown:.0f} MiB, hostile {codes}")
    assert grown < 400, f"resident memory grew {grown:.0f} MiB"
    eventually(
        lambda: open_fds(pid) <= fds_before + 2,
        f"open descriptors back to {fds_before} (now {open_fds(pid)})",
        timeout_s=20,
    )
