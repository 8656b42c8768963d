"""Artifacts as retained MQTT chunks, against a real Mosquitto: publish, fetch, delete.

The controller side is ``publish_artifact`` over a real ``FleetLink``; the device side is a
``Fetcher`` on another link; a plain paho ``Observer`` checks what the broker retains.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tracemalloc
import uuid
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from edgeserve.errors import InvalidArgument
from edgeserve.fleet.artifacts import (
    CHUNK_BYTES,
    ChunkMap,
    chunk_count,
    chunk_size,
    chunk_topic,
    delete_artifact,
    publish_artifact,
)
from edgeserve.fleet.fetcher import Artifact, Fetcher
from edgeserve.fleet.link import FleetLink
from edgeserve.types import NetworkCounters
from tests.mqtt_broker import Mosquitto, Observer

T = TypeVar("T")
WAIT_S = 10.0
SIZE = 1_300_000  # 5 chunks, the last one short


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


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


def artifact_file(tmp_path: Path, size: int = SIZE, name: str = "model.esar") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def fetcher(tmp_path: Path, link: FleetLink, counters: NetworkCounters) -> Fetcher:
    state = tmp_path / "state"
    return Fetcher(
        state / "staging",
        state_dir=state,
        link=link,
        counters=counters,
        max_bytes=64 * 1024 * 1024,
        stall_timeout_s=5.0,
        backoff_initial_s=0.05,
        backoff_max_s=0.2,
    )


def test_chunk_layout_follows_from_the_length_alone() -> None:
    assert CHUNK_BYTES == 256 * 1024
    assert chunk_count(1) == 1
    assert chunk_count(CHUNK_BYTES) == 1
    assert chunk_count(CHUNK_BYTES + 1) == 2
    assert chunk_count(SIZE) == 5
    assert [chunk_size(SIZE, i) for i in range(5)] == [CHUNK_BYTES] * 4 + [SIZE - 4 * CHUNK_BYTES]
    with pytest.raises(InvalidArgument, match="chunk 5 is out of range"):
        chunk_size(SIZE, 5)
    with pytest.raises(InvalidArgument, match="positive"):
        chunk_count(0)
    sha = "ab" * 32
    assert chunk_topic("edgeserve/v1", sha, 3) == f"edgeserve/v1/artifacts/{sha}/3"
    with pytest.raises(InvalidArgument, match="64 lowercase hex"):
        chunk_topic("p", "AB" * 32, 0)


def test_chunk_map_round_trips_and_refuses_another_layout(tmp_path: Path) -> None:
    bitmap = ChunkMap.from_prefix(SIZE, 2 * CHUNK_BYTES + 10)
    assert bitmap.missing() == [2, 3, 4] and bitmap.prefix_bytes() == 2 * CHUNK_BYTES
    bitmap.set(4)
    bitmap.save(tmp_path / "x.chunks")
    loaded = ChunkMap.load(tmp_path / "x.chunks", SIZE)
    assert loaded is not None and loaded.missing() == [2, 3]
    assert ChunkMap.load(tmp_path / "x.chunks", SIZE + 1) is None  # another length
    (tmp_path / "x.chunks").write_bytes(b"ESCHUNK1")  # torn
    assert ChunkMap.load(tmp_path / "x.chunks", SIZE) is None
    assert ChunkMap.from_prefix(SIZE, SIZE).missing() == []


def test_live_publish_reaches_a_waiting_device(mosquitto: Mosquitto, tmp_path: Path) -> None:
    source = artifact_file(tmp_path)
    expected = hashlib.sha256(source.read_bytes()).hexdigest()
    prefix = f"test/{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        controller, device = await connected(mosquitto), await connected(mosquitto)
        counters = NetworkCounters()
        seen: list[tuple[int, int]] = []
        try:
            artifact = Artifact("mlp", "1", expected, SIZE)
            fetch = asyncio.ensure_future(
                fetcher(tmp_path, device, counters).fetch(
                    artifact, prefix, progress=lambda d, t: seen.append((d, t))
                )
            )
            published: list[tuple[int, int]] = []
            sha, length = await publish_artifact(
                controller, prefix, source, progress=lambda d, t: published.append((d, t))
            )
            assert (sha, length) == (expected, SIZE)
            assert published[-1] == (SIZE, SIZE)
            assert [d for d, _ in published] == sorted(d for d, _ in published)
            path = await fetch
            assert path == (tmp_path / "state" / "staging" / f"{expected}.esar").resolve()
            assert path.read_bytes() == source.read_bytes()
            assert seen[-1] == (SIZE, SIZE)
            assert counters.artifacts == SIZE
            assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
        finally:
            await controller.close()
            await device.close()

    run(scenario())


def test_retained_chunks_reach_a_device_that_connects_later(
    mosquitto: Mosquitto, tmp_path: Path
) -> None:
    source = artifact_file(tmp_path)
    prefix = f"test/{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        controller = await connected(mosquitto)
        try:
            sha, length = await publish_artifact(controller, prefix, source)
        finally:
            await controller.close()
        device = await connected(mosquitto)
        try:
            counters = NetworkCounters()
            path = await fetcher(tmp_path, device, counters).fetch(
                Artifact("mlp", "1", sha, length), prefix
            )
            assert path.read_bytes() == source.read_bytes()
            assert counters.snapshot() == {"artifacts": SIZE, "control": 0, "telemetry": 0}
        finally:
            await device.close()

    run(scenario())


def test_publish_streams_the_file(mosquitto: Mosquitto, tmp_path: Path) -> None:
    size = 48 * CHUNK_BYTES  # 12 MiB
    source = artifact_file(tmp_path, size)
    prefix = f"test/{uuid.uuid4().hex[:8]}"

    async def scenario() -> int:
        controller = await connected(mosquitto)
        try:
            tracemalloc.start()
            try:
                await publish_artifact(controller, prefix, source, in_flight=2)
                return tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
        finally:
            await controller.close()

    peak = run(scenario())
    # Never the whole file: a few chunks in flight (and paho's copies of them) at most.
    assert peak < 12 * CHUNK_BYTES, f"peak {peak} bytes while publishing {size}"


def test_delete_clears_the_retained_chunks(mosquitto: Mosquitto, tmp_path: Path) -> None:
    source = artifact_file(tmp_path, 2 * CHUNK_BYTES + 1)
    prefix = f"test/{uuid.uuid4().hex[:8]}"

    async def scenario() -> str:
        controller = await connected(mosquitto)
        try:
            sha, length = await publish_artifact(controller, prefix, source)
            await delete_artifact(controller, prefix, sha, length)
            # A marker retained after the deletes: a new subscriber sees only it.
            await controller.publish(f"{prefix}/artifacts/marker", b"m", retain=True)
            return sha
        finally:
            await controller.close()

    run(scenario())
    observer = Observer(mosquitto, f"{prefix}/artifacts/#")
    try:
        first = observer.get()
        assert first.topic == f"{prefix}/artifacts/marker"
    finally:
        observer.close()
