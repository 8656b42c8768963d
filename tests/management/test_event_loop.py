"""Nothing an operator hands the daemon blocks its event loop (issue 10, finding 2).

A real daemon serves while a probe client asks ServerLive over and over on the inference
socket; each slow management operation (a FIFO named as an archive, a large archive
uploaded, a large archive loaded from archive_dir) runs meanwhile, and the probe's worst
answer time must stay small: inference and management share one event loop, so anything
blocking it shows up there.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from edgeserve.api.client import ClientError
from edgeserve.archive.format import read_manifest, write_archive
from edgeserve.proto import kserve_v2_pb2 as kpb
from edgeserve.proto import kserve_v2_pb2_grpc as kpb_grpc
from tests.management.conftest import drop_in
from tests.waiting import eventually

WORST_LAG_S = 1.0
"""The slowest probe answer accepted while an operation runs: generous for a shared,
loaded test machine; a blocked loop answers nothing for as long as the block lasts."""
BIG_MEMBER_BYTES = 96 << 20
"""Incompressible bytes in the large archive: hashing and unpacking take seconds here."""


class LagProbe:
    """Asks ServerLive in a loop from a thread; ``worst`` is the slowest answer."""

    def __init__(self, address: str) -> None:
        self._channel = grpc.insecure_channel(address)
        self._stub = kpb_grpc.GRPCInferenceServiceStub(self._channel)
        self._stop = threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LagProbe:
        self._stub.ServerLive(kpb.ServerLiveRequest(), timeout=10)  # connected before timing
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)
        self._channel.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            start = time.monotonic()
            try:
                self._stub.ServerLive(kpb.ServerLiveRequest(), timeout=30)
            except grpc.RpcError as err:
                self.failures.append(str(err.code()))
            self.latencies.append(time.monotonic() - start)
            self._stop.wait(0.01)

    @property
    def worst(self) -> float:
        return max(self.latencies, default=float("inf"))

    def summary(self) -> str:
        return (
            f"{len(self.latencies)} probes, median {statistics.median(self.latencies):.4f} s, "
            f"worst {self.worst:.3f} s, failures {self.failures}"
        )


@pytest.fixture
def big_archive(
    mlp_archive_factory: Any, signing_key: tuple[Path, Path], tmp_path: Path
) -> Iterator[Any]:
    """factory(version) -> a signed mlp archive with an extra ~96 MiB random member."""
    blob = tmp_path / "blob.bin"
    with blob.open("wb") as out:
        for _ in range(BIG_MEMBER_BYTES >> 20):
            out.write(os.urandom(1 << 20))
    base = mlp_archive_factory("1")
    manifest = read_manifest(base, trust=None)
    with zipfile.ZipFile(base) as zf:
        members: dict[str, bytes | Path] = {n: zf.read(n) for n in manifest.files}
    members["blob.bin"] = blob

    def make(version: str) -> Path:
        target = tmp_path / f"big-{version}.esar"
        changed = dataclasses.replace(manifest, version=version)
        write_archive(target, changed, members, sign_key=signing_key[0])
        return target

    yield make


def test_a_fifo_named_as_an_archive_is_refused_at_once(mdaemons, mlp_archive_factory, client_of):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    fifo = daemon.state_dir / "incoming" / "pipe.esar"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    client = client_of(daemon, timeout=10)
    with LagProbe(daemon.tcp) as probe:
        started = time.monotonic()
        try:
            with pytest.raises(ClientError) as caught:
                client.load(archive="pipe.esar")
            took = time.monotonic() - started
            asked = len(probe.latencies)  # the probe keeps asking after the refusal, too
            eventually(lambda: len(probe.latencies) >= asked + 10, "10 probes after it", 30)
        finally:
            _release(fifo)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT, caught.value
    assert "'pipe.esar' is not a regular file (a FIFO)" in str(caught.value)
    assert took < WORST_LAG_S, f"the refusal took {took:.2f} s"
    assert probe.worst < WORST_LAG_S and not probe.failures, probe.summary()
    assert client.list_models()[0]["version"] == "1", "nothing else changed"


def _release(fifo: Path) -> None:
    """A daemon that waits in open() for a writer (the bug) is given one, so it goes on."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError:
        pass  # no reader waiting: nothing to release


def test_a_large_upload_leaves_the_loop_free(mdaemons, mlp_archive_factory, big_archive, client_of):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    archive = big_archive("big-up")
    with LagProbe(daemon.tcp) as probe:
        loaded = client_of(daemon).upload(archive)
    assert loaded["version"] == "big-up"
    assert probe.worst < WORST_LAG_S and not probe.failures, probe.summary()
    assert len(probe.latencies) > 20, probe.summary()  # it ran long enough to matter


def test_a_large_archive_from_archive_dir_leaves_the_loop_free(
    mdaemons, mlp_archive_factory, big_archive, client_of
):
    daemon = mdaemons.start(mlp_archive_factory("1"))
    drop_in(daemon, big_archive("big-path"), "big.esar")
    with LagProbe(daemon.tcp) as probe:
        loaded = client_of(daemon).load(archive="big.esar")
    assert loaded["version"] == "big-path"
    assert probe.worst < WORST_LAG_S and not probe.failures, probe.summary()
    assert len(probe.latencies) > 20, probe.summary()
