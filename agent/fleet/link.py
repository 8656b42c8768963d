"""The device's MQTT link: the only module that imports paho, spoken in asyncio terms.

Threads. A dedicated network thread (``edgeserve-fleet-link``) owns the socket: it connects
(TCP + TLS handshake, blocking, never on the event loop), then runs paho's ``loop()`` until
the connection ends, then waits out a back-off of our own (exponential, with jitter, capped
at 30 s: paho's ``loop_forever`` back-off has no jitter, and a fleet that loses its broker
must not reconnect in lock-step) and connects again. Socket reads, TLS and packet parsing
(artifact chunks can be megabytes) thus never run on the loop that serves inference. Every
paho callback only hops onto the loop with ``call_soon_threadsafe``; all state of this
class is touched on the loop. ``publish``/``subscribe``/``ack`` are handed to paho from the
loop, which paho supports across threads; a no-op ``on_socket_register_write`` keeps paho
from writing to the socket from the loop's thread (the network thread is woken instead).

Delivery. Incoming messages are handled one at a time, in order, by the handlers whose
filter matches; a QoS 1 message is PUBACKed only after its handlers returned (manual ack),
and only on the connection it arrived on. A crash or disconnect before that makes the
broker deliver it again: handlers see duplicates (at least once) and de-duplicate by
content (a document's serial, a record's id). Payloads are never logged.

Unmatched messages. With a persistent session the broker sends what it queued for us
right after CONNACK, often before the caller's ``subscribe()`` calls ran. A message that
matches no handler is therefore held, unacknowledged, and handed to the first
``subscribe()`` whose filter matches it (then acked after that handler, as usual). The
hold is bounded: at most ``hold_max_messages`` (1000) messages and ``hold_max_bytes``
(16 MiB); a message past either bound is not acked, so the broker delivers it again on the
next connection (a QoS 0 one is dropped). A held QoS 1 message still counts against our
Receive Maximum, so the broker sends no further QoS 1 messages while ``receive_maximum``
of them are held; a message still unmatched after ``hold_unmatched_s`` (60 s) is therefore
acked and dropped with a warning, as is at once a message matching only a filter that was
``unsubscribe()``d. Held QoS 1 messages are forgotten when their connection ends (the
broker sends them again). A broken connection lets a ``subscribe()`` awaiting its SUBACK
return as if it had been called offline: the filter stays registered and is renewed on
the next connection.

The error family, ``Will``, ``LinkTls`` and the pure helpers live in ``fleet/link_types.py``
(no paho there); the names imported from it below stay importable from here.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import random
import ssl
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from edgeserve.errors import InvalidArgument
from edgeserve.fleet.link_types import (
    MAX_BACKOFF_S,
    MQTT_MAX_PACKET,
    Held,
    LinkClosed,
    LinkError,
    LinkNotConnected,
    LinkQueueFull,
    LinkRefused,
    LinkTls,
    PacketTooLarge,
    PublishFailed,
    UnmatchedHold,
    Will,
    backoff_delay,
    publish_packet_size,
)

log = logging.getLogger("edgeserve.fleet")

HOLD_MAX_MESSAGES = 1_000
HOLD_MAX_BYTES = 16 << 20
Handler = Callable[[str, bytes, bool], Awaitable[None] | None]
ConnectionHook = Callable[[bool, str], None]
_Inbound = tuple[mqtt.MQTTMessage, int]  # a message and the connection (generation) it came on


class _HandshakeClosingSocket(ssl.SSLSocket):
    """Closes itself when the TLS handshake fails (paho drops such a socket unclosed)."""

    def do_handshake(self, block: bool = False) -> None:
        try:
            super().do_handshake(block)
        except BaseException:
            self.close()
            raise


@dataclass
class _Pending:
    topic: str
    future: asyncio.Future[None]


@dataclass
class _Subscription:
    handler: Handler
    qos: int
    # SUBACK futures of this filter's SUBSCRIBE packets in flight
    waiters: list[asyncio.Future[list[ReasonCode]]] = field(default_factory=list)


class FleetLink:
    """One MQTT v5 connection to the fleet broker, reconnecting until ``close()``."""

    def __init__(
        self,
        *,
        host: str,
        port: int,
        client_id: str,
        tls: LinkTls | None = None,
        username: str | None = None,
        password: str | None = None,
        will: Will | None = None,
        keepalive_s: int = 30,
        session_expiry_s: int = 7 * 86_400,
        max_pending: int = 1_000,
        max_packet_bytes: int = MQTT_MAX_PACKET,
        receive_maximum: int = 32,
        backoff_initial_s: float = 1.0,
        backoff_max_s: float = MAX_BACKOFF_S,
        connect_timeout_s: float = 10.0,
        hold_max_messages: int = HOLD_MAX_MESSAGES,
        hold_max_bytes: int = HOLD_MAX_BYTES,
        hold_unmatched_s: float = 60.0,
        on_connection_change: ConnectionHook | None = None,
    ) -> None:
        if not 0 < backoff_initial_s <= backoff_max_s <= MAX_BACKOFF_S:
            raise InvalidArgument(
                f"fleet link: need 0 < backoff_initial_s <= backoff_max_s <= {MAX_BACKOFF_S}"
            )
        if max_pending < 1 or max_packet_bytes < 64:
            raise InvalidArgument("fleet link: max_pending >= 1 and max_packet_bytes >= 64")
        self._where = f"{host}:{port}"
        self._max_pending = max_pending
        self._max_packet_bytes = max_packet_bytes
        self._backoff = (backoff_initial_s, backoff_max_s)
        self._on_connection_change = on_connection_change
        self._client = self._make_client(client_id, tls, username, password, will)
        self._client.connect_timeout = connect_timeout_s
        self._client.max_queued_messages_set(max_pending)
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = session_expiry_s
        props.ReceiveMaximum = receive_maximum
        # Only records host, port and options; the network thread connects.
        self._client.connect_async(host, port, keepalive_s, clean_start=False, properties=props)

        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._closed = False
        self._finished = False
        self._connected = False
        self._generation = 0  # counts successful CONNACKs; acks go only to their connection
        self._broker_max_packet: int | None = None
        self._last_failure = "not connected yet"
        self._pending: dict[int, _Pending] = {}
        self._subs: dict[str, _Subscription] = {}
        self._unsubscribe_later: set[str] = set()  # dropped while offline: tell the broker
        self._suback: dict[int, list[tuple[str, asyncio.Future[list[ReasonCode]]]]] = {}
        self._connect_waiters: set[asyncio.Future[None]] = set()
        self._inbox: deque[_Inbound] = deque()
        self._inbox_ready = asyncio.Event()
        self._held = UnmatchedHold[_Inbound](hold_max_messages, hold_max_bytes, hold_unmatched_s)
        self._hold_timer: asyncio.TimerHandle | None = None
        self._unsubscribed: set[str] = set()  # unsubscribe()d: their messages are dropped
        self._tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def _make_client(
        client_id: str,
        tls: LinkTls | None,
        username: str | None,
        password: str | None,
        will: Will | None,
    ) -> mqtt.Client:
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            reconnect_on_failure=False,
            manual_ack=True,
        )
        if tls is not None:
            try:
                context = ssl.create_default_context(cafile=tls.ca_file)
                context.minimum_version = ssl.TLSVersion.TLSv1_2
                context.sslsocket_class = _HandshakeClosingSocket
                if tls.cert_file:
                    context.load_cert_chain(tls.cert_file, tls.key_file)
            except (OSError, ssl.SSLError) as exc:
                raise LinkError(f"fleet link: cannot load the TLS files: {exc}") from exc
            client.tls_set_context(context)
        if username is not None:
            client.username_pw_set(username, password)
        if will is not None:
            client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        return client

    # -- public API ----------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        """True between a successful CONNACK and the loss of that connection."""
        return self._connected

    @property
    def last_failure(self) -> str:
        """Why the last connection attempt or connection ended (for status)."""
        return self._last_failure

    async def start(self) -> None:
        """Start connecting in the background; returns at once, broker up or not."""
        if self._closed or self._thread is not None:
            raise LinkClosed("fleet link: start() may be called once, before close()")
        self._loop = asyncio.get_running_loop()
        c = self._client
        c.on_connect = lambda _c, _u, flags, rc, props: self._hop(
            self._connack, flags.session_present, rc, props
        )
        c.on_disconnect = lambda _c, _u, _flags, rc, _p: self._hop(self._lost, str(rc))
        c.on_publish = lambda _c, _u, mid, rc, _p: self._hop(self._puback, mid, rc)
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._hop(self._subacked, mid, rcs)
        c.on_message = lambda _c, _u, msg: self._hop(self._received, msg)
        c.on_socket_register_write = lambda _c, _u, _s: None  # see the module docstring
        self._spawn(self._deliver_forever())
        self._thread = threading.Thread(
            target=self._network_thread, name="edgeserve-fleet-link", daemon=True
        )
        self._thread.start()

    async def wait_connected(self, timeout_s: float) -> None:
        """Return once connected; ``LinkRefused`` at once if the broker or TLS refuses us."""
        if self._connected:
            return
        waiter = self._running_loop().create_future()
        self._connect_waiters.add(waiter)
        try:
            # Not wait_for: on 3.11 it can swallow a cancellation that lands as waiter resolves.
            async with asyncio.timeout(timeout_s):
                await waiter
        except TimeoutError:
            raise LinkNotConnected(
                f"fleet link: not connected to {self._where} within {timeout_s} s "
                f"({self._last_failure})"
            ) from None
        finally:
            self._connect_waiters.discard(waiter)

    async def publish(self, topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> None:
        """Hand a message to the broker; with QoS 1 return once the broker PUBACKed it.

        While offline a QoS 1 message waits in the bounded queue and is sent on reconnect;
        QoS 0 raises ``LinkNotConnected``. Cancelling the caller does not unsend it.
        """
        loop = self._running_loop()
        if qos not in (0, 1):
            raise InvalidArgument(f"fleet link: qos must be 0 or 1, got {qos}")
        size = publish_packet_size(topic, payload, qos)
        limit, source = self._packet_limit()
        if size > limit:
            raise PacketTooLarge(topic, size, limit, source)
        if qos and len(self._pending) >= self._max_pending:
            raise LinkQueueFull(self._max_pending)
        try:
            info = self._client.publish(topic, payload, qos=qos, retain=retain)
        except ValueError as exc:
            raise InvalidArgument(f"fleet link: cannot publish to '{topic}': {exc}") from None
        if info.rc == MQTTErrorCode.MQTT_ERR_QUEUE_SIZE:
            raise LinkQueueFull(self._max_pending)
        if qos == 0:
            if info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN:
                raise LinkNotConnected(f"fleet link: not connected; QoS 0 to '{topic}' dropped")
            if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
                raise PublishFailed.rc(topic, mqtt.error_string(info.rc))
            return
        if info.rc not in (MQTTErrorCode.MQTT_ERR_SUCCESS, MQTTErrorCode.MQTT_ERR_NO_CONN):
            raise PublishFailed.rc(topic, mqtt.error_string(info.rc))
        future: asyncio.Future[None] = loop.create_future()
        self._pending[info.mid] = _Pending(topic, future)
        await future

    async def subscribe(self, topic_filter: str, handler: Handler, qos: int = 1) -> None:
        """Route messages matching ``topic_filter`` to ``handler(topic, payload, retained)``.

        The subscription is renewed after every reconnect, and held messages it matches are
        delivered now (see the module docstring). When connected, waits for the SUBACK and
        raises ``LinkRefused`` if the broker refuses the filter; a connection lost meanwhile
        makes it return as if called offline.
        """
        self._running_loop()
        self._unsubscribe_later.discard(topic_filter)
        self._unsubscribed.discard(topic_filter)
        sub = self._subs.setdefault(topic_filter, _Subscription(handler, qos))
        sub.handler, sub.qos = handler, qos
        self._release_held(topic_filter)
        if not self._connected:
            return
        waiter = self._send_subscribe([topic_filter])
        if waiter is not None:
            codes = await waiter
            if codes and codes[0].is_failure:
                raise LinkRefused(
                    f"fleet link: broker refused the subscription '{topic_filter}': {codes[0]}"
                )

    async def unsubscribe(self, topic_filter: str) -> None:
        """Stop routing ``topic_filter`` and drop it from the broker's (persistent) session.

        Messages for it still queued or held here are acked and dropped. The UNSUBSCRIBE goes
        out now when connected, else on the next connection; its UNSUBACK is not awaited (it
        carries nothing to act on). Unknown filters are ignored.
        """
        self._running_loop()
        if self._subs.pop(topic_filter, None) is None:
            return
        self._unsubscribed.add(topic_filter)
        sent = (
            self._connected
            and self._client.unsubscribe(topic_filter)[0] == MQTTErrorCode.MQTT_ERR_SUCCESS
        )
        if not sent:
            self._unsubscribe_later.add(topic_filter)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Disconnect cleanly (reason 0: the Will is not sent), stop the thread, fail leftovers."""
        if self._closed:
            return
        self._closed = True
        self._stopping.set()
        self._client.disconnect(reasoncode=ReasonCode(PacketTypes.DISCONNECT, identifier=0))
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, timeout_s)
            if thread.is_alive():
                log.warning("fleet link: network thread did not stop within %s s", timeout_s)
        self._finished = True  # callbacks still queued on the loop are dropped from here on
        if self._hold_timer is not None:
            self._hold_timer.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._set_connected(False, "closed")
        self._fail_all(LinkClosed("fleet link: closed before the broker acknowledged"))

    # -- network thread ------------------------------------------------------------------

    def _network_thread(self) -> None:
        attempt = 0
        rand = random.SystemRandom()
        while not self._stopping.is_set():
            generation = self._generation
            try:
                self._client.reconnect()
            except Exception as exc:  # noqa: BLE001 - any failure is one more attempt
                self._hop(self._connect_failed, exc)
            else:
                if self._stopping.is_set():  # close() raced the connect
                    self._client.disconnect(ReasonCode(PacketTypes.DISCONNECT, identifier=0))
                try:
                    while self._client.loop(timeout=1.0) == MQTTErrorCode.MQTT_ERR_SUCCESS:
                        pass
                except Exception:  # paho bug or a socket oddity: keep the thread alive
                    log.exception("fleet link: network loop failed; reconnecting")
            if self._generation != generation:  # an int written on the loop, read here
                attempt = 0  # a CONNACK came in since: start the back-off afresh
            delay = backoff_delay(attempt, *self._backoff, rand)
            attempt += 1
            self._stopping.wait(delay)

    def _hop(self, callback: Callable[..., None], *args: object) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._on_loop, callback, args)

    def _on_loop(self, callback: Callable[..., None], args: tuple[object, ...]) -> None:
        if not self._finished:
            callback(*args)

    # -- on the loop ---------------------------------------------------------------------

    def _connack(self, session_present: bool, rc: ReasonCode, props: Properties | None) -> None:
        if rc.is_failure:
            self._last_failure = f"refused: {rc}"
            log.warning("fleet link: broker %s refused the connection: %s", self._where, rc)
            self._fail_waiters(LinkRefused.connack(self._where, str(rc)))
            return
        self._generation += 1
        self._settle_subacks()  # of an earlier connection, if its loss went unreported
        limit = getattr(props, "MaximumPacketSize", None)
        self._broker_max_packet = int(limit) if limit else None
        log.info("fleet link: connected to %s (session present: %s)", self._where, session_present)
        self._set_connected(True, f"connected to {self._where}")
        for waiter in self._connect_waiters:
            if not waiter.done():
                waiter.set_result(None)
        if self._subs:
            self._send_subscribe(list(self._subs))
        if self._unsubscribe_later:
            code, _mid = self._client.unsubscribe(sorted(self._unsubscribe_later))
            if code == MQTTErrorCode.MQTT_ERR_SUCCESS:
                self._unsubscribe_later.clear()

    def _lost(self, reason: str) -> None:
        self._settle_subacks()
        # Unacked QoS 1 messages of the lost connection come again on the next one.
        self._held.take(lambda h: h.qos > 0)
        if self._connected:  # else keep the reason the attempt failed (a refused CONNACK)
            self._last_failure = f"connection lost: {reason}"
            self._set_connected(False, self._last_failure)

    def _connect_failed(self, exc: Exception) -> None:
        self._last_failure = f"{type(exc).__name__}: {exc}"
        log.info("fleet link: cannot connect to %s: %s", self._where, self._last_failure)
        if isinstance(exc, ssl.SSLError):
            self._fail_waiters(LinkRefused.tls(self._where, str(exc)))

    def _set_connected(self, connected: bool, reason: str) -> None:
        if connected == self._connected:
            return
        self._connected = connected
        if not connected and not self._closed:
            log.warning("fleet link: disconnected from %s: %s", self._where, reason)
        if self._on_connection_change is not None:
            try:
                self._on_connection_change(connected, reason)
            except Exception:
                log.exception("fleet link: on_connection_change raised")

    def _puback(self, mid: int, rc: ReasonCode) -> None:
        pending = self._pending.pop(mid, None)
        if pending is None or pending.future.done():
            return
        if rc.is_failure:
            pending.future.set_exception(PublishFailed.refused(pending.topic, str(rc), rc.value))
        else:
            pending.future.set_result(None)

    def _send_subscribe(self, filters: list[str]) -> asyncio.Future[list[ReasonCode]] | None:
        request = [(f, SubscribeOptions(qos=self._subs[f].qos)) for f in filters]
        rc, mid = self._client.subscribe(request)
        if rc != MQTTErrorCode.MQTT_ERR_SUCCESS or mid is None:
            log.info("fleet link: subscribe deferred to the next connection: %s", rc)
            return None
        future: asyncio.Future[list[ReasonCode]] = self._running_loop().create_future()
        self._suback[mid] = [(f, future) for f in filters]
        return future

    def _subacked(self, mid: int, codes: list[ReasonCode]) -> None:
        entries = self._suback.pop(mid, [])
        for (topic_filter, _), code in zip(entries, codes, strict=False):
            if code.is_failure:
                log.warning("fleet link: broker refused subscription %s: %s", topic_filter, code)
        if entries and not entries[0][1].done():
            entries[0][1].set_result(list(codes))

    def _settle_subacks(self) -> None:
        """SUBACKs that will never come: their ``subscribe()`` returns, renewed on reconnect."""
        entries, self._suback = self._suback, {}
        for waiters in entries.values():
            for _f, future in waiters:
                if not future.done():
                    future.set_result([])

    def _received(self, message: mqtt.MQTTMessage) -> None:
        self._inbox.append((message, self._generation))
        self._inbox_ready.set()

    async def _deliver_forever(self) -> None:
        while True:
            while not self._inbox:
                self._inbox_ready.clear()
                await self._inbox_ready.wait()
            message, generation = self._inbox.popleft()
            topic = message.topic
            subs = [s for f, s in self._subs.items() if mqtt.topic_matches_sub(f, topic)]
            if not subs:
                self._unmatched(message, generation)
                continue
            for sub in subs:
                await self._call(sub.handler, topic, message)
            self._ack(message, generation)

    def _ack(self, message: mqtt.MQTTMessage, generation: int) -> None:
        if message.qos and generation == self._generation and self._connected:
            self._client.ack(message.mid, message.qos)

    def _unmatched(self, message: mqtt.MQTTMessage, generation: int) -> None:
        topic, size = message.topic, len(message.payload)
        if any(mqtt.topic_matches_sub(f, topic) for f in self._unsubscribed):
            self._ack(message, generation)  # for a filter we dropped: drop it too
            return
        if message.qos and not (generation == self._generation and self._connected):
            return  # unacked on a lost connection: the broker sends it again
        held = Held((message, generation), topic, size, message.qos, time.monotonic())
        if not self._held.add(held):
            log.warning(
                "fleet link: %d messages (%d max) wait for a subscription; one to '%s' is %s",
                len(self._held),
                self._held.max_messages,
                topic,
                "left unacked for the next connection" if message.qos else "dropped",
            )
        elif self._hold_timer is None:
            self._schedule_expiry()

    def _release_held(self, topic_filter: str) -> None:
        taken = self._held.take(lambda h: mqtt.topic_matches_sub(topic_filter, h.topic))
        if taken:  # they came before anything in the inbox: deliver them first, in order
            self._inbox.extendleft(reversed([h.item for h in taken]))
            self._inbox_ready.set()

    def _schedule_expiry(self) -> None:
        when = self._held.next_expiry()
        self._hold_timer = None
        if when is not None:
            delay = max(0.0, when - time.monotonic())
            self._hold_timer = self._running_loop().call_later(delay, self._expire_held)

    def _expire_held(self) -> None:
        for held in self._held.expired(time.monotonic()):
            log.warning(
                "fleet link: no subscription matched '%s' within %s s; acked and dropped",
                held.topic,
                self._held.max_age_s,
            )
            self._ack(*held.item)
        self._schedule_expiry()

    async def _call(self, handler: Handler, topic: str, message: mqtt.MQTTMessage) -> None:
        try:
            result = handler(topic, bytes(message.payload), bool(message.retain))
            if inspect.isawaitable(result):
                await result
        except asyncio.CancelledError:
            raise
        except Exception:
            # The handler's bug; the message is acked anyway so it cannot wedge the link.
            log.exception(
                "fleet link: handler for '%s' raised (%d bytes)", topic, len(message.payload)
            )

    # -- helpers -------------------------------------------------------------------------

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None or self._closed:
            raise LinkClosed("fleet link: not started, or closed")
        return self._loop

    def _packet_limit(self) -> tuple[int, str]:
        if self._broker_max_packet is not None:
            return self._broker_max_packet, "the broker's Maximum-Packet-Size"
        return self._max_packet_bytes, "max_packet_bytes"

    def _spawn(self, coro: Awaitable[None]) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fail_waiters(self, exc: LinkError) -> None:
        for waiter in self._connect_waiters:
            if not waiter.done():
                waiter.set_exception(exc)

    def _fail_all(self, exc: LinkError) -> None:
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if not p.future.done():
                p.future.set_exception(exc)
        for entries in self._suback.values():
            for _f, future in entries:
                if not future.done():
                    future.set_exception(exc)
        self._suback.clear()
        self._fail_waiters(exc)
