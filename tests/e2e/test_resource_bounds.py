"""Issue 10, findings 8, 10 and 11 against real daemons: idle connections, a stream client
that never reads, and concurrent maximum-size requests."""

from __future__ import annotations

import resource
import threading
import time
from pathlib import Path

import grpc
import numpy as np

from edgeserve.api.client import InferenceClient
from edgeserve.proto import kserve_v2_pb2_grpc as pb_grpc
from tests.e2e.bounds_support import (
    MAX_BATCH,
    MESSAGE_LIMIT,
    PeakRss,
    channel,
    close_all,
    closed_by_peer,
    idle_connections,
    infer_request,
    open_fds,
    rss_bytes,
    start_daemon,
)
from tests.management.conftest import run_cli
from tests.waiting import eventually

MIB = 1 << 20


def _nofile(soft: int, hard: int):  # noqa: ANN202
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    return limit


def _limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open files limit")


def _status_ok(daemon) -> bool:  # noqa: ANN001
    done = run_cli("status", "--config", str(daemon.config))
    return done.returncode == 0 and "unreachable" not in done.stdout + done.stderr


# -- finding 8: idle connections --------------------------------------------------------------


def test_the_daemon_lifts_its_soft_open_files_limit(daemons, mlp_archive_factory) -> None:
    daemon = daemons.start(mlp_archive_factory("1"), preexec_fn=_nofile(256, 4096))
    assert _limits(daemon.process.pid) == (4096, 4096)


def test_idle_connections_do_not_starve_new_clients(daemons, mlp_archive_factory) -> None:
    # Soft = hard = 512: the daemon cannot lift it, so it fits its connection cap in it.
    daemon = start_daemon(
        daemons,
        mlp_archive_factory("1"),
        sections={"server": {"connection_idle_s": 2}},
        preexec_fn=_nofile(512, 512),
    )
    pid = daemon.process.pid
    baseline = open_fds(pid)
    silent = idle_connections(daemon.tcp, 400, preface=False)
    talking = idle_connections(daemon.tcp, 100, preface=True)
    try:
        assert open_fds(pid) < 512 - 64, "idle clients took the daemon's descriptors"
        # The Unix socket has its own count: served at once.
        with InferenceClient(daemon.uds_address) as client:
            assert client.server_ready(timeout=5)
        # Management (its own listener and relay) answers too.
        assert _status_ok(daemon)
        # TCP: the silent sockets go after the handshake timeout, the others when idle.
        eventually(
            lambda: all(closed_by_peer(s) for s in silent + talking),
            "the daemon to close every idle connection",
            timeout_s=20,
        )
        with InferenceClient(daemon.tcp) as client:
            assert client.server_ready(timeout=5)
    finally:
        close_all(silent + talking)
    eventually(lambda: open_fds(pid) <= baseline + 4, "descriptors back to baseline", 10)
    assert "server.max_connections lowered from 512 to 128" in daemon.log()


# -- finding 10: a stream that is never read -------------------------------------------------


def test_a_stream_client_that_never_reads_pins_a_bounded_amount(daemons, wide_archives) -> None:
    daemon = start_daemon(
        daemons,
        wide_archives("wide", 0.2),
        sections={
            "server": {"max_message_bytes": MESSAGE_LIMIT, "stream_max_pending_bytes": 8 * MIB}
        },
    )
    pid = daemon.process.pid
    message = infer_request("wide", 1).SerializeToString()  # 4 MiB each way
    before = rss_bytes(pid)
    with channel(daemon.tcp) as chan, PeakRss(pid) as rss:
        answers = chan.stream_stream("/inference.GRPCInferenceService/ModelStreamInfer")(
            iter([message] * 100), timeout=60
        )  # 400 MiB offered, never read
        try:
            time.sleep(6.0)
        finally:
            answers.cancel()
    grown = (rss.peak - before) / MIB
    print(f"never-reading stream: peak RSS +{grown:.0f} MiB")
    # The bound's 8 MiB plus the request grpc is reading and the response it is writing,
    # and their copies in flight: far below the 400 MiB offered.
    assert grown < 128, f"resident memory grew {grown:.0f} MiB"
    with InferenceClient(daemon.tcp) as client:
        assert client.server_ready(timeout=5)


# -- finding 11: concurrent maximum-size requests --------------------------------------------


def test_concurrent_maximum_size_requests_stay_within_the_budget(
    daemons, wide_archives, mlp_archive_factory
) -> None:
    daemon = start_daemon(
        daemons,
        wide_archives("wide", 1.5),
        mlp_archive_factory("1"),
        sections={"server": {"max_message_bytes": MESSAGE_LIMIT, "inflight_bytes_factor": 4}},
    )
    pid = daemon.process.pid
    big = infer_request("wide", MAX_BATCH)  # 16 MiB, charged 4x of the 4 x 20 MiB budget
    with channel(daemon.tcp) as chan:
        pb_grpc.GRPCInferenceServiceStub(chan).ModelInfer(infer_request("wide", 1), timeout=30)
    before = rss_bytes(pid)
    outcomes: list[tuple[str, float]] = []
    lock = threading.Lock()

    def send() -> None:
        started = time.monotonic()
        with channel(daemon.tcp) as chan:
            try:
                pb_grpc.GRPCInferenceServiceStub(chan).ModelInfer(big, timeout=60)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
        with lock:
            outcomes.append((code, time.monotonic() - started))

    with PeakRss(pid) as rss:
        threads = [threading.Thread(target=send) for _ in range(8)]
        for thread in threads:
            thread.start()
        # The budget is full (a first refusal came back) while the rest are in flight.
        eventually(
            lambda: any(code == "RESOURCE_EXHAUSTED" for code, _ in outcomes), "a refusal", 60
        )
        with InferenceClient(daemon.tcp) as client:  # valid small requests beside them
            for _ in range(5):
                _, outputs = client.infer("mlp", {"x": np.ones((2, 16), np.float32)})
                assert outputs["output__0"].shape == (2, 4)
        for thread in threads:
            thread.join()
    codes = sorted(code for code, _ in outcomes)
    grown = (rss.peak - before) / MIB
    print(f"8 x 16 MiB requests: peak RSS +{grown:.0f} MiB, outcomes {codes}")
    assert set(codes) == {"OK", "RESOURCE_EXHAUSTED"}, codes
    assert all(s < 5 for code, s in outcomes if code == "RESOURCE_EXHAUSTED"), outcomes
    # Unbounded, the same requests take about 550 MiB (66 MiB each in flight).
    assert grown < 320, f"resident memory grew {grown:.0f} MiB"
