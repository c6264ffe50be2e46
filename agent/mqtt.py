"""The only owner of aiomqtt.Client: connect, will, subscriptions, reconnect, outbound queues.

Inbound, the link only transports: each message received goes, as an `agent.inbox.Inbound`
with its receipt (`agent.acks`), to the receiver given to `run` (the command intake), which
owns its handling. The link reads the socket only while the receiver holds fewer than
`receive_maximum` messages and `max_payload_bytes` of payload (TCP holds back the rest).

Outbound traffic has three lanes with different promises:
- retained state (availability, info, status): the latest payload per topic is kept and
  republished after every reconnect, so a broker restart never leaves stale state;
- events (QoS 1): queued while disconnected or while the broker is slow to acknowledge,
  sent in order. An answer to a command is never dropped: a command is acknowledged only
  once its answers reached the broker, so a lost answer would be a command acknowledged and
  never answered. Reports on `{base}/errors` that find `event_queue_size` events queued are
  dropped and counted instead;
- detections (QoS 0): published only while connected; dropped and counted when the
  connection is down or the publisher falls behind, never queued for later.
"""

from __future__ import annotations

import contextlib
import math
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Final

import aiomqtt
import anyio
import structlog
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import paho_fast
from agent.acks import Connection
from agent.connect import BrokerOptions, broker_options, connect_problem
from agent.errors import AgentError, SessionTakenOver
from agent.inbox import Inbound
from agent.messages import LinkCounters

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from agent.config import MqttSection
    from agent.inbox import Receipt
    from agent.messages import ReplyTo

__all__ = ["LinkStats", "MqttLink", "payload_bytes", "user_properties"]

log = structlog.get_logger(__name__)

_REFUSED_PROTOCOL: Final = frozenset({1, 132})  # 3.1.1 and MQTT 5 "unsupported protocol version"
_SESSION_TAKEN_OVER: Final = 142  # MQTT 5 DISCONNECT reason code
_STABLE_SECONDS: Final = 5.0  # a session shorter than this does not reset the backoff
_SHORT_SESSIONS: Final = 3  # in a row, on 3.1.1: probably another client with our id
_PACKET_HEADROOM: Final = 64 * 1024  # fixed header, topic and properties beside the payload
# the broker drops packets above this multiple of max_payload_bytes; smaller ones that are
# still too large reach the agent and are answered `payload_too_large`
_PACKET_FACTOR: Final = 2
_FINAL_FLUSH_SECONDS: Final = 3.0
# at shutdown: the receiver's last answers (its grace for the commands in hand and the
# records' last write), then the last events and `offline`
_SHUTDOWN_SECONDS: Final = 5.0 + 2 * _FINAL_FLUSH_SECONDS
_DETECTION_BATCH: Final = 256

Receive = Callable[[Inbound, "Receipt"], None]  # never blocks
Report = Callable[[AgentError], None]  # a problem of the agent itself


def user_properties(properties: Properties | None) -> tuple[tuple[str, str], ...]:
    """A message's MQTT 5 user properties as (name, value) pairs; anything else paho might
    hand over (not a list of string pairs) is left out, for the boundary to find nothing."""
    found = getattr(properties, "UserProperty", None) if properties else None
    if not isinstance(found, list):
        return ()
    return tuple(
        (pair[0], pair[1])
        for pair in found
        if isinstance(pair, tuple)
        and len(pair) == 2  # a pair
        and isinstance(pair[0], str)
        and isinstance(pair[1], str)
    )


def payload_bytes(message: aiomqtt.Message) -> bytes:
    """A received message's payload as bytes (paho delivers bytes; aiomqtt types it wider)."""
    payload = message.payload
    if isinstance(payload, bytes):
        return payload
    return bytes(payload) if isinstance(payload, bytearray) else b""


class _NoConnack(aiomqtt.MqttError):
    """The broker accepted the TCP connection but did not answer the CONNECT in time."""


@dataclass(slots=True)
class LinkStats:
    connects: int = 0
    commands_acknowledged: int = 0
    events_sent: int = 0
    events_dropped: int = 0
    detections_sent: int = 0
    detections_dropped_disconnected: int = 0
    detections_dropped_backpressure: int = 0
    retained_sent: int = 0

    def counters(self) -> LinkCounters:
        """A copy for the retained `info`."""
        return LinkCounters(**asdict(self))


@dataclass(slots=True)
class _Queued:
    topic: str
    payload: bytes
    reply: ReplyTo | None = None
    handed_to: object = None  # the client whose paho holds it after a cancelled publish


@dataclass(slots=True)
class _Outbox:
    retained: dict[str, bytes] = field(default_factory=dict)
    dirty: dict[str, None] = field(default_factory=dict)  # ordered set of retained topics
    events: deque[_Queued] = field(default_factory=deque)


class MqttLink:
    """Keeps one MQTT connection alive and owns everything published through it."""

    def __init__(
        self,
        settings: MqttSection,
        *,
        client_id: str,
        will_topic: str,
        subscriptions: tuple[str, ...],
        event_queue_size: int = 10_000,
        detection_queue_size: int = 1024,
        max_payload_bytes: int | None = None,
        fast_path: bool = True,
        broker: BrokerOptions | None = None,
    ) -> None:
        self._settings = settings
        # how to reach the broker (TLS, credentials, transport); read from `settings` if not given
        self._broker = broker if broker is not None else broker_options(settings)
        self._problems_reported: set[str] = set()  # TLS and login problems, told once each
        self._client_id = client_id
        self._will_topic = will_topic
        self._subscriptions = subscriptions
        self._event_limit = event_queue_size
        self._over_limit = False  # the queue went past event_queue_size (logged once a spell)
        self._box = _Outbox()
        self._wakeup = anyio.Event()
        self._detections_in, self._detections_out = anyio.create_memory_object_stream[
            tuple[str, bytes]
        ](detection_queue_size)
        self._protocol = (
            aiomqtt.ProtocolVersion.V5 if settings.protocol == "5" else aiomqtt.ProtocolVersion.V311
        )
        self.connected = False
        self.stats = LinkStats()
        self._max_payload = max_payload_bytes
        # MQTT 5: the broker drops what is far too large before it is sent to us
        self._max_packet = (
            None
            if max_payload_bytes is None
            else _PACKET_FACTOR * max_payload_bytes + _PACKET_HEADROOM
        )
        self._gate = paho_fast.ReadGate()  # resumes reading the socket
        # messages handed to the receiver and not released yet, and their payload bytes
        self._held = 0
        self._held_bytes = 0
        self._closing = False  # at shutdown: read on, for the PUBACKs of the last events
        self._connection: Connection | None = None
        self._closed: list[Connection] = []  # closed with messages the receiver still holds
        self._session_present = False
        self._takeover_reported = False
        self._receive: Receive | None = None
        self._answered: Callable[[], Awaitable[None]] | None = None
        self._report: Report | None = None
        # events that entered / left the queue (sent or dropped): acknowledgements wait on them
        self._events_queued = 0
        self._events_done = 0
        # when a publish began waiting for its PUBACK, and when the broker was last heard
        self._awaiting: float | None = None
        self._heard = 0.0
        # False: aiomqtt's public API only (agent/paho_fast.py), as with other versions
        self._fast_path = fast_path
        self._fast = False  # the fast path is used with the current client
        if not paho_fast.tolerate_property_strings():
            log.warning(
                "paho refuses some MQTT 5 string properties: a command carrying U+FEFF in one "
                "drops the connection on every delivery",
                versions=paho_fast.VERSIONS,
            )
        self._sent_before: Callable[[int], bool] = lambda _mid: False  # the MQTT DUP flag
        if fast_path and not paho_fast.FAST_PATH:
            log.warning(
                "paho fast path off: written for other versions; using aiomqtt's public API "
                "(reading is not paused, detections are published one at a time)",
                versions=paho_fast.VERSIONS,
            )

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"

    # --- producers: never block, called from any task on the loop --------------------------

    def retain(self, topic: str, payload: bytes) -> None:
        """Set the retained state of `topic`; the latest value wins and survives reconnects.

        An empty payload clears the topic on the broker; once sent, it is forgotten.
        """
        if self._box.retained.get(topic) == payload:
            return
        self._box.retained[topic] = payload
        self._box.dirty[topic] = None
        self._wakeup.set()

    def republish_retained(self) -> None:
        """Publish every retained topic again (Home Assistant restarted and asks for it)."""
        for topic in self._box.retained:
            self._box.dirty[topic] = None
        self._wakeup.set()

    def send(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 event that answers a command: never dropped."""
        self._enqueue(_Queued(topic, payload))

    def send_reply(self, reply: ReplyTo, payload: bytes) -> None:
        """Queue a QoS 1 copy of an event to an MQTT 5 Response Topic: never dropped."""
        self._enqueue(_Queued(reply.topic, payload, reply))

    def report(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 report of the agent's own: dropped (counted) when the queue is full."""
        if len(self._box.events) >= self._event_limit:
            # dropped before it is queued: the count acknowledgements wait on stays in order
            self.stats.events_dropped += 1
            log.error("event queue full, report dropped", limit=self._event_limit, topic=topic)
            return
        self._enqueue(_Queued(topic, payload))

    def _enqueue(self, item: _Queued) -> None:
        events = self._box.events
        events.append(item)
        self._events_queued += 1
        if len(events) > self._event_limit and not self._over_limit:
            # kept: these are answers, and what the broker already sent must be answered;
            # once read, a command's answer needs memory until the broker acknowledges it
            self._over_limit = True
            log.warning(
                "event queue past event_queue_size; answers are kept, reports dropped",
                limit=self._event_limit,
            )
        self._wakeup.set()

    def _event_done(self) -> None:
        self._events_done += 1
        if self._over_limit and len(self._box.events) <= self._event_limit // 2:
            self._over_limit = False
            log.info("event queue back under event_queue_size", queued=len(self._box.events))
        self.acknowledge()

    # --- for the receipts (agent.acks.Ledger) ----------------------------------------------

    @property
    def events_queued(self) -> int:
        return self._events_queued

    def acknowledge(self) -> None:
        """PUBACK, on the current connection, what is handled and answered by now."""
        connection = self._connection
        if connection is not None:
            before = connection.acknowledged
            connection.acknowledge(self._events_done)
            self.stats.commands_acknowledged += connection.acknowledged - before

    def released(self, size: int) -> None:
        self._held -= 1
        self._held_bytes -= size
        self._gate.resume()  # the reader checks for room itself

    @property
    def has_room_for_detections(self) -> bool:
        """False when a detection offered now would be dropped: skip building it."""
        if not self.connected:
            return False
        stats = self._detections_in.statistics()
        return stats.current_buffer_used < stats.max_buffer_size

    def count_dropped_detection(self) -> None:
        if self.connected:
            self.stats.detections_dropped_backpressure += 1
        else:
            self.stats.detections_dropped_disconnected += 1

    def offer(self, topic: str, payload: bytes) -> None:
        """Publish a detection at QoS 0 if it can go now; otherwise drop and count it."""
        if not self.connected:
            self.stats.detections_dropped_disconnected += 1
            return
        try:
            self._detections_in.send_nowait((topic, payload))
        except anyio.WouldBlock:
            self.stats.detections_dropped_backpressure += 1

    # --- the connection ------------------------------------------------------------------

    async def run(
        self,
        receive: Receive,
        *,
        answered: Callable[[], Awaitable[None]] | None = None,
        report: Report | None = None,
        task_status: TaskStatus[None],
    ) -> None:
        """Connect, serve, reconnect with backoff and jitter, until cancelled.

        Each message received goes to `receive` with its receipt; it is acknowledged once
        the receiver settles the receipt and the events queued by then reached the broker.
        On shutdown `answered` is awaited first (the receiver's last answers), then the last
        events and acknowledgements go out and then `offline`; what arrives after that
        stays unacknowledged, for the next start. `report` is told about problems of the
        link itself (a session taken over).
        """
        self._receive, self._answered, self._report = receive, answered, report
        task_status.started()
        with self._detections_in, self._detections_out:
            await self._reconnect_forever()

    async def _reconnect_forever(self) -> None:
        attempt = 0
        short_sessions = 0
        while True:
            error: BaseException | None = None
            started = time.monotonic()
            connects = self.stats.connects
            try:
                await self._session()
            except* aiomqtt.MqttCodeError as group:
                error = group.exceptions[0]
            except* aiomqtt.MqttError as group:
                error = group.exceptions[0]
            except* OSError as group:  # a socket torn down under paho while the broker died
                error = group.exceptions[0]
            finally:
                self.connected = False
                self._drop_queued_detections()
            problem = connect_problem(error, self._broker)
            if problem is None and self._should_fall_back(error):
                continue
            if problem is not None and problem.cause not in self._problems_reported:
                self._problems_reported.add(problem.cause)  # once per distinct cause
                log.error(problem.message, broker=self._broker.where, cause=problem.cause)
            connected = self.stats.connects > connects
            lasted = time.monotonic() - started
            if connected and lasted >= _STABLE_SECONDS:
                attempt, short_sessions = 0, 0  # back off from scratch after a stable session
                self._takeover_reported = False
                self._problems_reported.clear()
            else:
                attempt += 1  # a session that ends right after it began is no reason to hurry
                short_sessions += connected
                self._check_takeover(error, short_sessions)
            delay = min(
                self._settings.reconnect_max, self._settings.reconnect_min * 2 ** min(attempt, 16)
            ) * random.uniform(0.5, 1.0)  # noqa: S311  # jitter, not cryptography
            log.warning(
                "mqtt disconnected, reconnecting", error=str(error), retry_in=round(delay, 2)
            )
            await anyio.sleep(delay)

    def _check_takeover(self, error: BaseException | None, short_sessions: int) -> None:
        """Say once per streak of short sessions that another client seems to use our id."""
        taken_over = _reason_code(error) == _SESSION_TAKEN_OVER  # MQTT 5 tells; 3.1.1 just closes
        if self._takeover_reported or not (taken_over or short_sessions >= _SHORT_SESSIONS):
            return
        self._takeover_reported = True
        agent_id = self._will_topic.rsplit("/", 2)[-2]  # {prefix}/{agent_id}/availability
        if taken_over:
            message = (
                f"another client with client id {self._client_id} took over the session; "
                f"is a second agent running with agent.id {agent_id}?"
            )
        else:
            message = (
                f"the broker closed {short_sessions} connections in a row within "
                f"{_STABLE_SECONDS:g} s of connecting; is another client using client id "
                f"{self._client_id} (a second agent with agent.id {agent_id})?"
            )
        log.error(message, client_id=self._client_id, code="session_taken_over")
        if self._report is not None:
            self._report(SessionTakenOver(message))

    def _drop_queued_detections(self) -> None:
        """Detections never wait for a reconnect: stale frames are worth less than none."""
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
            while True:
                self._detections_out.receive_nowait()
                self.stats.detections_dropped_disconnected += 1

    def _should_fall_back(self, error: BaseException | None) -> bool:
        """MQTT 5 refused, or a CONNECT left unanswered: use 3.1.1 from now on."""
        if self._protocol != aiomqtt.ProtocolVersion.V5 or error is None:
            return False
        if isinstance(error, _NoConnack):
            log.warning(
                "broker did not answer an MQTT 5 CONNECT, falling back to MQTT 3.1.1",
                host=self._settings.host,
                port=self._settings.port,
                waited=self._settings.publish_timeout,
            )
        elif isinstance(error, aiomqtt.MqttCodeError) and _reason_code(error) in _REFUSED_PROTOCOL:
            log.warning(
                "broker refused MQTT 5, falling back to MQTT 3.1.1",
                host=self._settings.host,
                port=self._settings.port,
            )
        else:
            return False
        self._protocol = aiomqtt.ProtocolVersion.V311
        return True

    def _client(self) -> tuple[aiomqtt.Client, Callable[[int], None]]:
        v5 = self._protocol == aiomqtt.ProtocolVersion.V5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._settings.session_expiry
            # flow control: at most this many unacknowledged commands in flight to us
            properties.ReceiveMaximum = self._settings.receive_maximum
            if self._max_packet is not None:
                properties.MaximumPacketSize = self._max_packet
        if self._broker.insecure:
            log.warning(
                "TLS certificate checks are off (mqtt.tls.insecure_skip_verify): for tests only",
                broker=self._broker.where,
            )
        client = aiomqtt.Client(
            **self._broker.client_kwargs(),
            identifier=self._client_id,
            protocol=self._protocol,
            will=aiomqtt.Will(self._will_topic, b"offline", qos=1, retain=True),
            # a persistent session: commands sent while we are away wait for us
            clean_session=None if v5 else False,
            clean_start=False if v5 else MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            keepalive=self._settings.keepalive,
            timeout=self._settings.publish_timeout,
            # without it every QoS 1 event waits ~40 ms on the broker's delayed ACK
            socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
        )
        ack = paho_fast.manual_acks(client, self._note_session)
        self._sent_before = paho_fast.duplicates(client)
        self._fast = fast = self._fast_path and paho_fast.fast_path_for(client)
        paho_fast.register_writers_safely(client, fast=fast)
        # The broker should stop at our Receive Maximum, but mosquitto 2.0.11 does not once
        # acknowledgements flow (measured: 151 unacknowledged with a Receive Maximum of 4),
        # and 3.1.1 has none: without this, a burst of large commands all sits in memory.
        self._gate = paho_fast.pause_reading_while(client, self._full, fast=fast)
        return client, ack

    def _note_session(self, present: bool) -> None:
        self._session_present = present

    def _full(self) -> bool:
        """Whether the receiver holds as much as it may: then the socket is not read."""
        if self._closing:
            return False
        # not counting aiomqtt's queue: while we wait for a SUBACK it must go on reading
        if self._held >= self._settings.receive_maximum:
            return True
        return self._max_payload is not None and self._held_bytes >= self._max_payload

    async def _connect(self, stack: AsyncExitStack) -> tuple[aiomqtt.Client, Callable[[int], None]]:
        client, ack = self._client()
        try:
            await stack.enter_async_context(client)
        except aiomqtt.MqttCodeError:
            raise
        except aiomqtt.MqttError as exc:
            if not paho_fast.has_socket(client):  # no TCP connection: no answer expected
                raise
            paho_fast.close_unanswered(client, fast=self._fast)
            raise _NoConnack(
                f"no answer to CONNECT within {self._settings.publish_timeout:g} s"
            ) from exc
        return client, ack

    def _deliver(self, connection: Connection, message: aiomqtt.Message) -> None:
        payload = payload_bytes(message)
        properties = message.properties
        data = getattr(properties, "CorrelationData", None) if properties else None
        inbound = Inbound(
            topic=message.topic.value,
            payload=payload,
            retain=message.retain,
            response_topic=(getattr(properties, "ResponseTopic", None) if properties else None),
            correlation_data=bytes(data) if data is not None else None,
            user_properties=user_properties(properties),
            resent=self._sent_before(message.mid),
        )
        self._heard = time.monotonic()
        receipt = connection.receive(self, message.mid, message.qos, len(payload))
        self._held += 1
        self._held_bytes += len(payload)
        if self._receive is None:  # nobody to hand it to: never acknowledged
            receipt.release()
            return
        self._receive(inbound, receipt)

    def _forget_closed(self) -> None:
        """A CONNACK said the session was kept: what closed connections left comes again."""
        closed, self._closed = [c for c in self._closed if c.held], []
        if not self._session_present:
            return  # not sent again: the receiver handles what it holds
        for connection in closed:
            connection.resent = True
        resent = sum(c.held for c in closed)
        if resent:
            log.info("commands left from the last connection come again", count=resent)

    async def _session(self) -> None:
        async with AsyncExitStack() as stack:
            client, ack = await self._connect(stack)
            connection = Connection(ack)
            try:
                self._connection = connection
                self._forget_closed()
                await self._subscribe(client)
                self.connected = True
                self.stats.connects += 1
                for topic in self._box.retained:
                    self._box.dirty[topic] = None
                log.info(
                    "mqtt connected",
                    host=self._settings.host,
                    port=self._settings.port,
                    broker=self._broker.where,
                    protocol=self.protocol,
                    client_id=self._client_id,
                    session_present=self._session_present,
                )
                self._heard = time.monotonic()
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._send_loop, client, name="mqtt.send")
                    tg.start_soon(self._watch_acknowledgements, name="mqtt.watchdog")
                    tg.start_soon(self._detection_loop, client, name="mqtt.detections")
                    async for message in client.messages:
                        self._deliver(connection, message)
                        del message  # the payload may be large: the receiver decides how long
                    tg.cancel_scope.cancel()
            except anyio.get_cancelled_exc_class():
                # the receiver's last answers, then events, acknowledgements and `offline`
                with anyio.move_on_after(_SHUTDOWN_SECONDS, shield=True):
                    if self._answered is not None:
                        await self._answered()
                    self._closing = True
                    self._gate.resume()  # the PUBACKs of the last events must still come in
                    await self._farewell(client)
                raise
            finally:
                unacknowledged = connection.close()
                if unacknowledged:
                    log.info("connection closed with commands unacknowledged", count=unacknowledged)
                if connection.held:
                    self._closed.append(connection)
                self._connection = None

    async def _subscribe(self, client: aiomqtt.Client) -> None:
        for topic in self._subscriptions:
            if self._protocol == aiomqtt.ProtocolVersion.V5:
                # keep the retain flag as published so retained commands are recognised;
                # do not resend retained messages to a session that already subscribed
                options = SubscribeOptions(qos=1, retainAsPublished=True, retainHandling=1)
                await client.subscribe(topic, options=options)
            else:
                await client.subscribe(topic, qos=1)

    async def _acknowledged(self, publish: Awaitable[None]) -> None:
        """Await a QoS 1 publish; the watchdog ends the session if the broker went quiet."""
        self._awaiting = time.monotonic()
        try:
            await publish
        finally:
            self._awaiting = None
        self._heard = time.monotonic()

    async def _watch_acknowledgements(self) -> None:
        """End the session when a PUBACK is overdue and nothing else came from the broker.

        Not a deadline per publish: the broker queues its PUBACK behind every command it
        sent us before, so under a flood of commands a PUBACK can take as long as reading
        them all (mosquitto 2.0.11 ignores the Receive Maximum). A broker that keeps
        sending is alive; one silent for `publish_timeout` while we wait for it is not.
        While we do not read the socket ourselves, the broker is not to blame.
        """
        timeout = self._settings.publish_timeout
        overdue = False
        while True:
            await anyio.sleep(timeout / 4)
            now = time.monotonic()
            if self._gate.paused:
                self._heard = now
                continue
            awaiting = self._awaiting
            if awaiting is None or now - max(awaiting, self._heard) < timeout:
                overdue = False
                continue
            # a second look: after a stall of our own loop, what was read meanwhile has
            # not been handed on yet when this wakes up
            if overdue:
                raise aiomqtt.MqttError(
                    f"no acknowledgement and nothing else from the broker for {timeout:g} s"
                )
            overdue = True

    async def _publish_next(self, client: aiomqtt.Client, ack_wait: float = math.inf) -> bool:
        """Publish one queued item, retained state first; False when nothing is queued.

        Without `ack_wait`, a publish waits for its PUBACK as long as the watchdog lets it.
        """
        box = self._box
        if box.dirty:
            topic = next(iter(box.dirty))
            del box.dirty[topic]
            payload = box.retained[topic]
            try:
                await self._acknowledged(
                    client.publish(topic, payload, qos=1, retain=True, timeout=ack_wait)
                )
            except BaseException:
                box.dirty[topic] = None
                raise
            self.stats.retained_sent += 1
            if not payload and box.retained.get(topic) == payload:
                del box.retained[topic]  # cleared on the broker: nothing to republish
            return True
        if box.events:
            item = box.events[0]
            if item.handed_to is client:
                # a publish cut off by the shutdown: paho has it and sends it on this same
                # connection before DISCONNECT; publishing it again would send it twice
                box.events.popleft()
                self.stats.events_sent += 1
                self._event_done()
                return True
            properties = None
            if item.reply is not None and item.reply.correlation_data is not None:
                properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
                properties.CorrelationData = item.reply.correlation_data
            try:
                await self._acknowledged(
                    client.publish(
                        item.topic, item.payload, qos=1, properties=properties, timeout=ack_wait
                    )
                )
            except ValueError as exc:  # paho refuses the topic: never let it end the session
                log.error("event not publishable, dropped", topic=item.topic, error=str(exc))  # noqa: TRY400
                self.stats.events_dropped += 1
            except BaseException:
                # aiomqtt hands it to paho before its first await; a new connection sends
                # it again (paho's queue goes with the old client), this one need not
                item.handed_to = client
                raise
            else:
                self.stats.events_sent += 1
            if box.events and box.events[0] is item:  # else the full queue dropped it meanwhile
                box.events.popleft()
                self._event_done()
            return True
        return False

    async def _send_loop(self, client: aiomqtt.Client) -> None:
        while True:
            self._wakeup = anyio.Event()
            while await self._publish_next(client):
                pass
            await self._wakeup.wait()

    async def _detection_loop(self, client: aiomqtt.Client) -> None:
        receive = self._detections_out
        while True:
            batch = [await receive.receive()]
            # drain what queued meanwhile: one loop pass for the batch, not one per message
            with contextlib.suppress(anyio.WouldBlock):
                while len(batch) < _DETECTION_BATCH:
                    batch.append(receive.receive_nowait())
            await paho_fast.publish_batch(
                client, batch, stall_seconds=self._settings.publish_timeout, fast=self._fast
            )
            self.stats.detections_sent += len(batch)

    async def _farewell(self, client: aiomqtt.Client) -> None:
        """On clean shutdown: flush queued state and events, then say `offline` ourselves."""
        if not self.connected:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            # events first, within most of the time allowed: `offline` must still go out,
            # as a clean disconnect does not fire the will
            ack_wait = self._settings.publish_timeout  # no watchdog runs any more
            with anyio.move_on_after(_FINAL_FLUSH_SECONDS * 2 / 3):
                while await self._publish_next(client, ack_wait):
                    pass
            self.retain(self._will_topic, b"offline")  # retained state goes first
            while await self._publish_next(client, ack_wait):
                pass


def _reason_code(error: BaseException | None) -> int | None:
    """The MQTT reason code behind an error, following its causes (aiomqtt wraps them)."""
    seen = 0
    while error is not None and seen < 8:  # a bound, not a magic number
        if isinstance(error, aiomqtt.MqttCodeError):
            rc = error.rc
            value = rc if isinstance(rc, int) else getattr(rc, "value", None)
            return value if isinstance(value, int) else None
        error = error.__cause__ or error.__context__
        seen += 1
    return None
