"""FleetLink against a real Mosquitto: delivery, PUBACK, outages, Will, limits, TLS, auth, ACL.

The other side of each conversation is a plain paho client (``Observer``) or another
process, never a mock. Waits are on conditions with deadlines.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

import pytest

from edgeserve.errors import InvalidArgument, Kind
from edgeserve.fleet.link import FleetLink
from edgeserve.fleet.link_types import (
    MAX_BACKOFF_S,
    LinkClosed,
    LinkError,
    LinkQueueFull,
    LinkRefused,
    LinkTls,
    PacketTooLarge,
    PublishFailed,
    Will,
    backoff_delay,
    publish_packet_size,
)
from tests.mqtt_broker import Mosquitto, Observer, free_port

T = TypeVar("T")
WAIT_S = 10.0


def run(coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout_s)

    return asyncio.run(bounded())


async def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


def make_link(broker: Mosquitto, **options: Any) -> FleetLink:
    options.setdefault("client_id", f"dev-{uuid.uuid4().hex[:8]}")
    options.setdefault("backoff_initial_s", 0.05)
    options.setdefault("backoff_max_s", 0.5)
    options.setdefault("port", broker.port)
    return FleetLink(host=broker.host, **options)


async def started(link: FleetLink) -> FleetLink:
    await link.start()
    await link.wait_connected(WAIT_S)
    return link


async def next_of(observer: Observer) -> tuple[str, bytes, bool]:
    got = await asyncio.to_thread(observer.get)
    return got.topic, got.payload, got.retain


def prefix() -> str:
    return f"test/{uuid.uuid4().hex[:8]}"


# -- pure helpers ----------------------------------------------------------------------


def test_backoff_grows_with_jitter_and_stays_under_the_cap() -> None:
    rand = random.Random(7)  # noqa: S311 - test determinism, not crypto
    delays = [backoff_delay(n, 0.5, MAX_BACKOFF_S, rand) for n in range(12)]
    for n, d in enumerate(delays):
        ceiling = min(MAX_BACKOFF_S, 0.5 * 2**n)
        assert ceiling / 2 <= d <= ceiling
    assert max(delays) <= MAX_BACKOFF_S
    assert len({round(d, 6) for d in delays[6:]}) > 1  # capped, yet not in lock-step
    with pytest.raises(InvalidArgument, match="backoff"):
        FleetLink(host="127.0.0.1", port=1, client_id="x", backoff_max_s=60.0)


# -- delivery --------------------------------------------------------------------------


def test_round_trip_qos1_and_retained(mosquitto: Mosquitto) -> None:
    p = prefix()
    observer = Observer(mosquitto, f"{p}/up/#")
    observer.publish(f"{p}/down/retained", b"desired-1", retain=True)

    async def scenario() -> None:
        got: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()

        async def on_message(topic: str, payload: bytes, retained: bool) -> None:
            await got.put((topic, payload, retained))

        link = await started(make_link(mosquitto))
        try:
            await link.subscribe(f"{p}/down/#", on_message)
            assert await got.get() == (f"{p}/down/retained", b"desired-1", True)
            await asyncio.to_thread(observer.publish, f"{p}/down/live", b"\x00cmd")
            assert await got.get() == (f"{p}/down/live", b"\x00cmd", False)

            await link.publish(f"{p}/up/state", b"reported", qos=1, retain=True)
            assert await next_of(observer) == (f"{p}/up/state", b"reported", False)
        finally:
            await link.close()

    try:
        run(scenario())
        late = Observer(mosquitto, f"{p}/up/#")  # a new subscriber gets the retained state
        try:
            got = late.get()
            assert (got.payload, got.retain) == (b"reported", True)
        finally:
            late.close()
    finally:
        observer.close()


def test_publish_waits_for_puback_through_an_outage_and_the_queue_is_bounded(
    fresh_mosquitto: Mosquitto,
) -> None:
    broker, p = fresh_mosquitto, prefix()

    async def scenario() -> None:
        link = await started(make_link(broker, max_pending=3))
        try:
            await link.publish(f"{p}/0", b"before", retain=True)
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: not link.connected, "the link to notice the outage")
            sends = [
                asyncio.create_task(link.publish(f"{p}/{i}", b"m", retain=True)) for i in (1, 2, 3)
            ]
            # A reconnect attempt fails while the broker is down; none of them resolved.
            await wait_until(lambda: "refused" in link.last_failure.lower(), "a failed attempt")
            assert not any(s.done() for s in sends)
            with pytest.raises(LinkQueueFull, match="3 messages"):
                await link.publish(f"{p}/4", b"m")
            await asyncio.to_thread(broker.start)
            await asyncio.wait_for(asyncio.gather(*sends), WAIT_S)
        finally:
            await link.close()

    run(scenario())
    observer = Observer(broker, f"{p}/#")
    try:
        seen = {observer.get().topic for _ in range(4)}
        assert seen == {f"{p}/{i}" for i in range(4)}
    finally:
        observer.close()


def test_reconnects_and_resubscribes_after_the_broker_is_killed(
    fresh_mosquitto: Mosquitto,
) -> None:
    broker, p = fresh_mosquitto, prefix()
    changes: list[bool] = []

    async def scenario() -> None:
        got: asyncio.Queue[tuple[str, bytes, bool]] = asyncio.Queue()
        link = await started(
            make_link(broker, on_connection_change=lambda up, _why: changes.append(up))
        )
        try:
            await link.subscribe(f"{p}/desired", lambda *m: got.put_nowait(m))
            await asyncio.to_thread(broker.kill)  # SIGKILL: the broker forgets the session
            await wait_until(lambda: not link.connected, "the link to notice the kill")
            await asyncio.to_thread(broker.start)
            await link.wait_connected(WAIT_S)
            publisher = await asyncio.to_thread(Observer, broker, f"{p}/unused")
            try:
                await asyncio.to_thread(publisher.publish, f"{p}/desired", b"serial-2", True)
                topic, payload, _retained = await asyncio.wait_for(got.get(), WAIT_S)
                assert (topic, payload) == (f"{p}/desired", b"serial-2")
            finally:
                publisher.close()
        finally:
            await link.close()

    run(scenario())
    assert changes == [True, False, True, False]


def test_close_fails_what_the_broker_never_acknowledged() -> None:
    async def scenario() -> None:
        # Nothing listens on this port: the message waits in the queue until close().
        link = FleetLink(host="127.0.0.1", port=free_port(), client_id="lonely")
        await link.start()
        pending = asyncio.create_task(link.publish("test/never", b"m"))
        await wait_until(lambda: link.last_failure != "not connected yet", "an attempt")
        assert not pending.done()
        await link.close()
        with pytest.raises(LinkClosed, match="closed before the broker acknowledged"):
            await pending
        with pytest.raises(LinkClosed):
            await link.publish("test/never", b"m")

    run(scenario())


# -- Last Will -------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from edgeserve.fleet.link import FleetLink
    from edgeserve.fleet.link_types import Will

    async def main() -> None:
        host, port, topic = sys.argv[1], int(sys.argv[2]), sys.argv[3]
        link = FleetLink(host=host, port=port, client_id="will-child",
                         will=Will(topic, b"offline"))
        await link.start()
        await link.wait_connected(10)
        await link.publish(topic, b"online", retain=True)
        print("ready", flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def test_last_will_is_published_when_the_process_is_killed(mosquitto: Mosquitto) -> None:
    topic = f"{prefix()}/online"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, mosquitto.host, str(mosquitto.port), topic],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "ready"  # bounded by pytest's timeout
        observer = Observer(mosquitto, topic)
        try:
            assert (observer.get().payload, observer.messages.empty()) == (b"online", True)
            os.kill(child.pid, signal.SIGKILL)
            child.wait(WAIT_S)
            assert observer.get().payload == b"offline"
        finally:
            observer.close()
        late = Observer(mosquitto, topic)
        try:
            got = late.get()
            assert (got.payload, got.retain) == (b"offline", True)
        finally:
            late.close()
    finally:
        child.kill()
        child.wait()
        if child.stdout:
            child.stdout.close()


def test_clean_close_does_not_send_the_will(mosquitto: Mosquitto) -> None:
    topic = f"{prefix()}/online"
    observer = Observer(mosquitto, topic)

    async def scenario() -> None:
        link = await started(make_link(mosquitto, will=Will(topic, b"offline")))
        await link.close()

    try:
        run(scenario())
        # Anything the close caused reaches the observer before a message sent after it.
        observer.publish(topic, b"marker")
        assert observer.get().payload == b"marker"
    finally:
        observer.close()


# -- limits ----------------------------------------------------------------------------


def test_oversize_message_is_refused_locally(
    mosquitto_factory: Callable[..., Mosquitto],
) -> None:
    broker = mosquitto_factory(max_packet_size=2048)
    topic = f"{prefix()}/chunk"
    at_limit = b"x" * (2048 - publish_packet_size(topic, b"", 1) - 1)  # 2-byte length field
    assert publish_packet_size(topic, at_limit, 1) == 2048

    async def scenario() -> None:
        link = await started(make_link(broker, max_packet_bytes=1 << 20))
        try:
            await link.publish(topic, at_limit)  # exactly the limit: the broker takes it
            with pytest.raises(PacketTooLarge, match="2049 bytes.*2048 bytes.*Maximum-Packet"):
                await link.publish(topic, at_limit + b"x")
            await link.publish(topic, b"small")  # the link was not dropped
            assert link.connected
        finally:
            await link.close()

    run(scenario())


def test_configured_limit_applies_when_the_broker_states_none(mosquitto: Mosquitto) -> None:
    async def scenario() -> None:
        link = await started(make_link(mosquitto, max_packet_bytes=512))
        try:
            with pytest.raises(PacketTooLarge, match="max_packet_bytes") as caught:
                await link.publish(f"{prefix()}/big", b"x" * 600)
            assert caught.value.kind is Kind.TOO_LARGE
        finally:
            await link.close()

    run(scenario())


# -- TLS, credentials, ACL -------------------------------------------------------------


@pytest.fixture
def tls_broker(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory(tls=True)


def _tls(broker: Mosquitto, ca: str | None = None) -> LinkTls:
    files = broker.tls_files
    assert files is not None
    return LinkTls(ca or str(files.ca_file), str(files.client_cert), str(files.client_key))


def test_tls_with_the_right_ca_and_client_certificate(tls_broker: Mosquitto) -> None:
    p = prefix()
    observer = Observer(tls_broker, f"{p}/#")

    async def scenario() -> None:
        link = await started(make_link(tls_broker, port=tls_broker.tls_port, tls=_tls(tls_broker)))
        try:
            await link.publish(f"{p}/over-tls", b"secret")
        finally:
            await link.close()

    try:
        run(scenario())
        assert observer.get().payload == b"secret"
    finally:
        observer.close()


def test_tls_with_a_wrong_ca_is_refused(tls_broker: Mosquitto) -> None:
    files = tls_broker.tls_files
    assert files is not None

    async def scenario() -> None:
        link = make_link(
            tls_broker, port=tls_broker.tls_port, tls=_tls(tls_broker, str(files.wrong_ca_file))
        )
        await link.start()
        try:
            with pytest.raises(LinkRefused, match="TLS handshake.*certificate verify failed"):
                await link.wait_connected(WAIT_S)
            assert not link.connected
        finally:
            await link.close()

    run(scenario())


def test_tls_never_falls_back_to_plaintext(tls_broker: Mosquitto) -> None:
    changes: list[bool] = []

    async def scenario() -> None:
        # TLS configured, but pointed at the plaintext listener: it must never connect.
        link = make_link(
            tls_broker, tls=_tls(tls_broker), on_connection_change=lambda up, _: changes.append(up)
        )
        await link.start()
        try:
            with pytest.raises(LinkError):
                await link.wait_connected(1.5)
            await wait_until(lambda: link.last_failure != "not connected yet", "an attempt")
        finally:
            await link.close()

    run(scenario())
    assert changes == []


PASSWORDS = {"devA": "pw-a", "devB": "pw-b"}
ACL = """\
user devA
topic readwrite test/acl/devices/devA/#
topic read test/acl/broadcast

user devB
topic readwrite test/acl/devices/devB/#
topic readwrite test/acl/broadcast
"""


@pytest.fixture
def acl_broker(mosquitto_factory: Callable[..., Mosquitto]) -> Mosquitto:
    return mosquitto_factory(allow_anonymous=False, users=PASSWORDS, acl=ACL)


def test_wrong_password_is_a_clear_error(acl_broker: Mosquitto) -> None:
    async def scenario() -> None:
        link = make_link(acl_broker, username="devA", password=PASSWORDS["devB"])
        await link.start()
        try:
            with pytest.raises(LinkRefused, match="refused the connection: Not authorized") as e:
                await link.wait_connected(WAIT_S)
            assert e.value.kind is Kind.UNAUTHENTICATED
        finally:
            await link.close()
        good = await started(make_link(acl_broker, username="devA", password=PASSWORDS["devA"]))
        await good.close()

    run(scenario())


def test_acl_keeps_a_device_out_of_another_devices_topics(acl_broker: Mosquitto) -> None:
    devb = Observer(
        acl_broker, "test/acl/devices/devB/#", username="devB", password=PASSWORDS["devB"]
    )

    async def scenario() -> None:
        got: list[tuple[str, bytes, bool]] = []
        link = await started(make_link(acl_broker, username="devA", password=PASSWORDS["devA"]))
        try:
            # Mosquitto 2.0 grants the SUBSCRIBE (no SUBACK failure) and filters on delivery.
            await link.subscribe("test/acl/devices/devB/#", lambda *m: got.append(m))
            await link.subscribe("test/acl/broadcast", lambda *m: got.append(m))
            await asyncio.to_thread(devb.publish, "test/acl/devices/devB/desired", b"theirs")
            await asyncio.to_thread(devb.publish, "test/acl/broadcast", b"marker")
            await wait_until(lambda: len(got) >= 1, "the broadcast marker")
            assert [m[1] for m in got] == [b"marker"]  # devB's message was never delivered

            # A publish to devB's topic: MQTT v5 PUBACK with "Not authorized" (0x87).
            with pytest.raises(PublishFailed, match="Not authorized") as refused:
                await link.publish("test/acl/devices/devB/desired", b"forged")
            assert refused.value.kind is Kind.PERMISSION_DENIED
            await link.publish("test/acl/devices/devA/reported", b"mine")
        finally:
            await link.close()

    try:
        run(scenario())
        assert devb.get().payload == b"theirs"  # devB's own copy
        assert devb.messages.empty()  # the forged one never reached devB
    finally:
        devb.close()


# -- duplicates ------------------------------------------------------------------------


def test_unacked_qos1_message_is_delivered_again_to_the_handler(
    fresh_mosquitto: Mosquitto,
) -> None:
    """PUBACK goes out only after the handler returned, and only on the connection the
    message came on: a message in the handler when the connection drops comes again.
    De-duplicating by content (serial, record id) is the caller's job."""
    broker, p = fresh_mosquitto, prefix()
    seen: list[tuple[str, bytes, bool]] = []

    async def scenario() -> None:
        release = asyncio.Event()

        async def slow(topic: str, payload: bytes, retained: bool) -> None:
            seen.append((topic, payload, retained))
            if len(seen) == 1:
                await release.wait()

        link = await started(make_link(broker, client_id=f"dup-{p[-8:]}"))
        try:
            await link.subscribe(f"{p}/cmd", slow)
            publisher = await asyncio.to_thread(Observer, broker, f"{p}/unused")
            await asyncio.to_thread(publisher.publish, f"{p}/cmd", b"doc serial=3")
            publisher.close()
            await wait_until(lambda: len(seen) == 1, "the first delivery")
            await asyncio.to_thread(broker.stop)  # the session (with the unacked message) is saved
            await wait_until(lambda: not link.connected, "the outage")
            await asyncio.to_thread(broker.start)
            await link.wait_connected(WAIT_S)
            release.set()
            await wait_until(lambda: len(seen) == 2, "the redelivery")
        finally:
            await link.close()

    run(scenario())
    assert seen == [(f"{p}/cmd", b"doc serial=3", False)] * 2


# -- messages before their subscription, SUBACK through an outage, cancellation -------------


def test_queued_messages_before_subscribe_reach_the_late_handler_exactly_once(
    fresh_mosquitto: Mosquitto,
) -> None:
    """A persistent session's queued messages arrive right after CONNACK, before the
    caller's ``subscribe()``: they wait for it, are delivered once, and are acked."""
    broker, p = fresh_mosquitto, prefix()
    client_id = f"late-{p[-8:]}"
    queued = [f"doc-{i}".encode() for i in range(10)]  # fewer than receive_maximum (32)

    async def scenario() -> None:
        # The session (persistent) subscribes to both filters, then the device goes away.
        first = await started(make_link(broker, client_id=client_id))
        await first.subscribe(f"{p}/cmd/#", lambda *m: None)
        await first.subscribe(f"{p}/marker", lambda *m: None)
        await first.close()
        publisher = await asyncio.to_thread(Observer, broker, f"{p}/unused")
        try:
            for i, payload in enumerate(queued):
                await asyncio.to_thread(publisher.publish, f"{p}/cmd/{i}", payload)
            await asyncio.to_thread(publisher.publish, f"{p}/marker", b"after the queue")

            got: list[bytes] = []
            marker = asyncio.Event()
            link = make_link(broker, client_id=client_id)
            await link.start()
            try:
                await link.subscribe(f"{p}/marker", lambda *m: marker.set())
                # The broker sends the queue in order: the marker comes after every cmd
                # message, all of which found no handler yet.
                await asyncio.wait_for(marker.wait(), WAIT_S)
                await link.subscribe(f"{p}/cmd/#", lambda _t, payload, _r: got.append(payload))
                await wait_until(lambda: len(got) >= len(queued), "the held messages")
                await asyncio.to_thread(publisher.publish, f"{p}/cmd/end", b"end")
                await wait_until(lambda: got[-1] == b"end", "the end marker")
                assert got == [*queued, b"end"]
            finally:
                await link.close()

            # They were acked: a new connection of the session gets nothing again.
            again: list[bytes] = []
            link = make_link(broker, client_id=client_id)
            await link.start()
            try:
                await link.subscribe(f"{p}/cmd/#", lambda _t, payload, _r: again.append(payload))
                await link.wait_connected(WAIT_S)
                await asyncio.to_thread(publisher.publish, f"{p}/cmd/probe", b"probe")
                await wait_until(lambda: b"probe" in again, "the probe")
                assert again == [b"probe"]
            finally:
                await link.close()
        finally:
            publisher.close()

    run(scenario())


def test_unmatched_messages_past_the_hold_bound_come_again_on_the_next_connection(
    fresh_mosquitto: Mosquitto,
) -> None:
    broker, p = fresh_mosquitto, prefix()
    client_id = f"bound-{p[-8:]}"

    async def scenario() -> None:
        first = await started(make_link(broker, client_id=client_id))
        await first.subscribe(f"{p}/cmd/#", lambda *m: None)
        await first.subscribe(f"{p}/marker", lambda *m: None)
        await first.close()
        publisher = await asyncio.to_thread(Observer, broker, f"{p}/unused")
        try:
            for i in range(3):
                await asyncio.to_thread(publisher.publish, f"{p}/cmd/{i}", b"m%d" % i)
            await asyncio.to_thread(publisher.publish, f"{p}/marker", b"after the queue")
        finally:
            publisher.close()

        got: list[bytes] = []
        marker = asyncio.Event()
        link = make_link(broker, client_id=client_id, hold_max_messages=2)
        await link.start()
        try:
            await link.subscribe(f"{p}/marker", lambda *m: marker.set())
            await asyncio.wait_for(marker.wait(), WAIT_S)
            await link.subscribe(f"{p}/cmd/#", lambda _t, payload, _r: got.append(payload))
            await wait_until(lambda: len(got) >= 2, "the two held messages")
            assert got == [b"m0", b"m1"]  # the third was left unacked...
            await asyncio.to_thread(broker.stop)
            await wait_until(lambda: not link.connected, "the outage")
            await asyncio.to_thread(broker.start)
            await wait_until(lambda: len(got) >= 3, "the redelivery")  # ...and comes again
            assert got[2] == b"m2"
        finally:
            await link.close()

    run(scenario())


def test_a_disconnect_while_subscribe_awaits_its_suback_does_not_hang_it(
    fresh_mosquitto: Mosquitto,
) -> None:
    broker, p = fresh_mosquitto, prefix()

    async def scenario() -> None:
        got: asyncio.Queue[bytes] = asyncio.Queue()
        link = await started(make_link(broker))
        try:
            await asyncio.to_thread(broker.pause)  # the SUBSCRIBE goes out; no SUBACK comes
            subscribing = asyncio.create_task(
                link.subscribe(f"{p}/desired", lambda _t, payload, _r: got.put_nowait(payload))
            )
            await asyncio.sleep(0)  # the task sends its SUBSCRIBE and awaits the SUBACK
            assert not subscribing.done()
            await asyncio.to_thread(broker.kill)  # the connection breaks under the wait
            await asyncio.wait_for(subscribing, WAIT_S)  # returns: registered, as if offline
            await asyncio.to_thread(broker.start)
            await link.wait_connected(WAIT_S)
            publisher = await asyncio.to_thread(Observer, broker, f"{p}/unused")
            try:
                await asyncio.to_thread(publisher.publish, f"{p}/desired", b"serial-1")
            finally:
                publisher.close()
            assert await asyncio.wait_for(got.get(), WAIT_S) == b"serial-1"  # renewed
        finally:
            await link.close()

    run(scenario())


def test_cancelling_wait_connected_propagates_even_as_the_connection_arrives(
    mosquitto: Mosquitto,
) -> None:
    """asyncio.wait_for (3.11) returns the result when a cancellation lands in the same
    loop turn as the result; the caller must see the CancelledError."""

    async def scenario() -> None:
        waiting: list[asyncio.Task[None]] = []

        def cancel_the_waiter(up: bool, _why: str) -> None:
            if up:  # runs on the loop just before wait_connected's waiter resolves
                waiting[0].cancel()

        link = make_link(mosquitto, on_connection_change=cancel_the_waiter)
        await link.start()
        try:
            waiting.append(asyncio.create_task(link.wait_connected(WAIT_S)))
            with pytest.raises(asyncio.CancelledError):
                await waiting[0]
            assert link.connected
            plain = asyncio.create_task(link.wait_connected(WAIT_S))
            plain.cancel()
            with pytest.raises(asyncio.CancelledError):
                await plain
        finally:
            await link.close()

    run(scenario())
