"""The uploader against a real Mosquitto, a real FleetLink and a real SQLite buffer.

Live rows go before the backlog; rows leave the buffer only after their PUBACK (a broker
stopped mid-way leaves them, and they all arrive once it is back); the rate cap holds over
a measured window; a broker that refuses the topic leaves every row in place. The other
end is a plain paho client with a persistent session (what ``fleet collect`` does).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgeserve.fleet.link import FleetLink
from edgeserve.telemetry.buffer import TelemetryBuffer
from edgeserve.telemetry.rows import Row
from edgeserve.telemetry.uploader import Uploader, encode_batch
from tests.mqtt_broker import Mosquitto

T = TypeVar("T")
WAIT_S = 20.0
DEVICE = "dev-1"


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 60.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@dataclass(frozen=True)
class Arrival:
    at: float
    size: int
    message: dict[str, Any]

    @property
    def ids(self) -> list[int]:
        return [r["id"] for r in self.message["records"]]


class Collector:
    """A paho client with a persistent session: what arrives while it is away waits."""

    def __init__(self, broker: Mosquitto, topic: str) -> None:
        self.arrivals: list[Arrival] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self._client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"collector-{uuid.uuid4().hex[:8]}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        self._client.reconnect_delay_set(1, 2)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_args: subscribed.set()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        self._client.connect(broker.host, broker.port, clean_start=False, properties=props)
        self._client.loop_start()
        self._client.subscribe(topic, qos=1)
        if not subscribed.wait(5.0):
            self.close()
            raise RuntimeError("collector: no SUBACK")

    def _on_message(self, _c: Any, _u: Any, msg: mqtt.MQTTMessage) -> None:
        arrival = Arrival(time.monotonic(), len(msg.payload), json.loads(msg.payload))
        with self._lock:
            self.arrivals.append(arrival)

    def snapshot(self) -> list[Arrival]:
        with self._lock:
            return list(self.arrivals)

    def ids(self) -> list[int]:
        return [i for a in self.snapshot() for i in a.ids]

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    mosquitto = Mosquitto(tmp_path / "mosquitto")
    try:
        mosquitto.start()
        yield mosquitto
    finally:
        mosquitto.close()


@pytest.fixture
def buffer(tmp_path: Path) -> Iterator[TelemetryBuffer]:
    spool = TelemetryBuffer(tmp_path / "telemetry.db", max_bytes=16 * 1024 * 1024)
    try:
        yield spool
    finally:
        spool.close()


def rows(n: int, cls: str = "rollup", pad: int = 300) -> list[Row]:
    return [Row(cls, f"test_{cls}", {"n": i, "pad": "x" * pad}) for i in range(n)]  # type: ignore[arg-type]


def buffered_ids(buffer: TelemetryBuffer) -> set[int]:
    return {r.id for r in buffer.pending(1 << 40, 0)}


class Uploading:
    """A FleetLink and an Uploader on it, as the daemon wires them."""

    def __init__(
        self, broker: Mosquitto, buffer: TelemetryBuffer, topic: str, **options: Any
    ) -> None:
        self.link = FleetLink(
            host=broker.host,
            port=broker.port,
            client_id=f"{DEVICE}-{uuid.uuid4().hex[:6]}",
            backoff_initial_s=0.05,
            backoff_max_s=0.5,
            on_connection_change=lambda _connected, _reason: self.uploader.wake(),
        )
        options.setdefault("batch_bytes", 1024)
        options.setdefault("bytes_per_s", 1 << 20)
        self.uploader = Uploader(
            buffer, self.link, topic=topic, device_id=DEVICE, boot_id="boot-1", **options
        )
        self.task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Uploading:
        self.task = asyncio.get_running_loop().create_task(self.uploader.run())
        await self.link.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.link.close()


def topic() -> str:
    return f"test/{uuid.uuid4().hex[:8]}/devices/{DEVICE}/telemetry"


def test_live_rows_go_first_then_the_backlog_oldest_first(
    broker: Mosquitto, buffer: TelemetryBuffer
) -> None:
    where = topic()
    base = buffer.last_id
    assert buffer.append(rows(20, "sample") + rows(20, "rollup") + rows(2, "event"))
    samples = list(range(base + 1, base + 21))
    rollups = list(range(base + 21, base + 41))
    events = [base + 41, base + 42]
    after = buffer.last_id
    assert buffer.append(rows(1, "sample") + rows(2, "rollup"))  # the newest interval
    live = set(range(after + 1, buffer.last_id + 1))
    everything = buffered_ids(buffer)
    collector = Collector(broker, where)

    async def scenario() -> None:
        async with Uploading(broker, buffer, where) as up:
            up.uploader.live_from(after)
            await wait_until(lambda: len(collector.ids()) >= len(everything), "every record")
            await wait_until(lambda: up.uploader.stats().records == len(everything), "acks")

    try:
        run(scenario())
    finally:
        collector.close()
    order = collector.ids()
    assert sorted(order) == sorted(everything)  # each once: no outage, no resend
    assert set(order[: len(live)]) == live  # the newest interval first
    records = [r for a in collector.snapshot() for r in a.message["records"]]
    assert [r["class"] for r in records[: len(live)]] == ["rollup", "rollup", "sample"]
    first = collector.snapshot()[0].message["records"]
    # Then the backlog: events, rollups, samples (by priority), each oldest first.
    assert order[len(live) :] == events + rollups + samples
    record = first[0]
    assert set(record) == {"id", "class", "kind", "time", "body"}
    assert record["kind"] == "test_rollup" and record["body"]["pad"] == "x" * 300
    assert record["time"].endswith("Z")
    envelope = collector.snapshot()[0].message
    assert (envelope["device"], envelope["boot_id"]) == (DEVICE, "boot-1")
    assert buffer.stats().backlog_rows == 0
    assert buffer.stats().last_upload is not None


def test_rows_leave_only_after_puback_and_survive_a_broker_outage(
    broker: Mosquitto, buffer: TelemetryBuffer
) -> None:
    where = topic()
    assert buffer.append(rows(60))
    everything = buffered_ids(buffer)
    collector = Collector(broker, where)

    async def scenario() -> None:
        # About 2 rows a message and 8 KiB/s: the upload takes seconds, the outage cuts it.
        async with Uploading(broker, buffer, where, batch_bytes=1024, bytes_per_s=8192) as up:
            await wait_until(lambda: len(collector.snapshot()) >= 2, "the first messages")
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: not up.link.connected, "the link to notice")
            during = await asyncio.to_thread(buffered_ids, buffer)
            assert during, "the outage came too late to leave rows behind"
            await wait_until(lambda: "Refused" in up.link.last_failure, "a failed reconnect")
            # Nothing left the buffer while no broker could acknowledge it.
            assert await asyncio.to_thread(buffered_ids, buffer) == during
            await asyncio.to_thread(broker.start)
            await wait_until(lambda: set(collector.ids()) >= everything, "every record", 60.0)
            await wait_until(lambda: buffer.stats().backlog_rows == 0, "an empty buffer")

    try:
        run(scenario(), timeout_s=120.0)
    finally:
        collector.close()
    assert set(collector.ids()) == everything  # at least once: duplicates allowed, no loss


def test_the_rate_cap_holds_over_a_measured_window(
    broker: Mosquitto, buffer: TelemetryBuffer
) -> None:
    where = topic()
    rate = 16 * 1024
    assert buffer.append(rows(140))
    everything = buffered_ids(buffer)
    collector = Collector(broker, where)

    async def scenario() -> None:
        async with Uploading(broker, buffer, where, batch_bytes=2048, bytes_per_s=rate):
            await wait_until(lambda: set(collector.ids()) >= everything, "every record", 60.0)

    try:
        run(scenario(), timeout_s=90.0)
    finally:
        collector.close()
    arrivals = collector.snapshot()
    assert len(arrivals) > 10
    window = arrivals[-1].at - arrivals[0].at
    # The first message spends the burst (one batch); the rest are paced by the bucket.
    paced = sum(a.size for a in arrivals[1:])
    measured = paced / window
    assert measured <= rate * 1.2, f"{measured:.0f} B/s over a cap of {rate} B/s"
    assert measured >= rate * 0.4, f"{measured:.0f} B/s: far below the cap of {rate} B/s"
    assert all(a.size <= 2048 + 200 for a in arrivals)  # batch_bytes plus the envelope


def test_a_refused_publish_backs_off_and_keeps_the_rows(tmp_path: Path) -> None:
    acl = f"user {DEVICE}\ntopic readwrite test/acl/devices/{DEVICE}/online\n"
    broker = Mosquitto(tmp_path / "acl", allow_anonymous=False, users={DEVICE: "pw"}, acl=acl)
    spool = TelemetryBuffer(tmp_path / "telemetry.db")
    try:
        broker.start()
        assert spool.append(rows(5))
        everything = buffered_ids(spool)

        async def scenario() -> None:
            link = FleetLink(
                host=broker.host,
                port=broker.port,
                client_id=DEVICE,
                username=DEVICE,
                password="pw",  # noqa: S106 - a test broker's password
            )
            uploader = Uploader(
                spool,
                link,
                topic=f"test/acl/devices/{DEVICE}/telemetry",
                device_id=DEVICE,
                boot_id="b",
                batch_bytes=1024,
                bytes_per_s=1 << 20,
            )
            task = asyncio.get_running_loop().create_task(uploader.run())
            try:
                await link.start()
                await link.wait_connected(WAIT_S)
                uploader.wake()
                await wait_until(lambda: uploader.stats().failures >= 1, "a refused publish")
                assert "Not authorized" in (uploader.stats().last_error or "")
                assert uploader.stats().records == 0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                await link.close()

        run(scenario())
        assert buffered_ids(spool) == everything  # refused: every row stays for a later try
    finally:
        spool.close()
        broker.close()


def test_the_message_is_compact_json_of_the_stored_records(buffer: TelemetryBuffer) -> None:
    assert buffer.append([Row("event", "restart", {"boot_id": "b", "é": 1})])
    stored = buffer.pending(1 << 20, 0)
    message = encode_batch(DEVICE, "boot", stored)
    assert b" " not in message
    decoded = json.loads(message)
    assert decoded["records"] == [r.record() for r in stored]
    assert decoded["records"][0]["body"] == {"boot_id": "b", "é": 1}
    # What pending() counted as wire size is what the records take in the message.
    empty = {"device": DEVICE, "boot_id": "boot", "records": []}
    envelope = len(json.dumps(empty, separators=(",", ":")))
    assert len(message) == envelope + sum(r.wire_size for r in stored)
