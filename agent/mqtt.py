"""The only owner of aiomqtt.Client: connect, will, subscriptions, reconnect, outbound queues.

Outbound traffic has three lanes with different promises:
- retained state (availability, info, status): the latest payload per topic is kept and
  republished after every reconnect, so a broker restart never leaves stale state;
- events (QoS 1): queued while disconnected, up to `event_queue_size`; past that the oldest
  event is dropped and counted; sent in order once connected;
- detections (QoS 0): published only while connected; dropped and counted when the
  connection is down or the publisher falls behind, never queued for later.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Protocol

import aiomqtt
import anyio
import structlog
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, MQTT_ERR_SUCCESS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.errors import AgentError, SessionTakenOver
from agent.heap import release_free_memory
from agent.inbox import Connection, Inbox, Settling

if TYPE_CHECKING:
    from anyio.abc import TaskStatus

    from agent.config import MqttSection
    from agent.messages import ReplyTo

__all__ = ["LinkStats", "MqttLink"]

log = structlog.get_logger(__name__)

_REFUSED_PROTOCOL: Final = frozenset({1, 132})  # 3.1.1 and MQTT 5 "unsupported protocol version"
_SESSION_TAKEN_OVER: Final = 142  # MQTT 5 DISCONNECT reason code
_STABLE_SECONDS: Final = 5.0  # a session shorter than this does not reset the backoff
_SHORT_SESSIONS: Final = 3  # in a row, on 3.1.1: probably another client with our id
_PACKET_HEADROOM: Final = 64 * 1024  # fixed header, topic and properties beside the payload
# the broker drops packets above this multiple of max_payload_bytes; smaller ones that are
# still too large reach the agent and are answered `payload_too_large`
_PACKET_FACTOR: Final = 2
_TRIM_ABOVE: Final = 1024 * 1024  # payload bytes after which freed memory is handed back
_FINAL_FLUSH_SECONDS: Final = 3.0
_HANDLER_GRACE_SECONDS: Final = 5.0  # for the command in hand when shutting down
_DRAIN_POLL_SECONDS: Final = 0.005
_DETECTION_BATCH: Final = 256

Handler = Callable[[aiomqtt.Message], Awaitable[None]]
Refuse = Callable[[aiomqtt.Message], None]
Report = Callable[[AgentError], None]  # a problem of the agent itself


class Records(Protocol):
    """Where handled commands are recorded: acknowledgements and shutdown wait on it."""

    def when_recorded(self, then: Callable[[], None]) -> None:
        """Call `then` once every command handled so far is recorded (or refused) and answered."""

    async def closed(self) -> None:
        """At shutdown: return once the records are final."""


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
    ) -> None:
        self._settings = settings
        self._client_id = client_id
        self._will_topic = will_topic
        self._subscriptions = subscriptions
        self._event_limit = event_queue_size
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
        self._paused: Callable[[], None] | None = None  # resumes reading the socket
        self._handling = anyio.Lock()  # held while a command is handled
        self._inbox = Inbox()
        self._connection: Connection | None = None
        self._session_present = False
        self._takeover_reported = False
        self._refuse: Refuse | None = None
        self._report: Report | None = None
        self._records: Records | None = None
        # events that entered / left the queue (sent or dropped): acknowledgements wait on them
        self._events_queued = 0
        self._events_done = 0

    @property
    def protocol(self) -> str:
        return "5" if self._protocol == aiomqtt.ProtocolVersion.V5 else "3.1.1"

    # --- producers: never block, called from any task on the loop --------------------------

    def retain(self, topic: str, payload: bytes) -> None:
        """Set the retained state of `topic`; the latest value wins and survives reconnects."""
        if self._box.retained.get(topic) == payload:
            return
        self._box.retained[topic] = payload
        self._box.dirty[topic] = None
        self._wakeup.set()

    def send(self, topic: str, payload: bytes) -> None:
        """Queue a QoS 1 event."""
        self._enqueue(_Queued(topic, payload))

    def send_reply(self, reply: ReplyTo, payload: bytes) -> None:
        """Queue a QoS 1 copy of an event to an MQTT 5 Response Topic."""
        self._enqueue(_Queued(reply.topic, payload, reply))

    def _enqueue(self, item: _Queued) -> None:
        events = self._box.events
        if len(events) >= self._event_limit:
            events.popleft()
            self.stats.events_dropped += 1
            self._event_done()
            log.error("event queue full, oldest event dropped", limit=self._event_limit)
        events.append(item)
        self._events_queued += 1
        self._wakeup.set()

    def _event_done(self) -> None:
        self._events_done += 1
        self._acknowledge()

    def _acknowledge(self) -> None:
        connection = self._connection
        if connection is not None:
            before = connection.acknowledged
            connection.acknowledge(self._events_done)
            self.stats.commands_acknowledged += connection.acknowledged - before

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
        handler: Handler,
        *,
        refuse: Refuse | None = None,
        report: Report | None = None,
        records: Records | None = None,
        task_status: TaskStatus[None],
    ) -> None:
        """Connect, serve, reconnect with backoff and jitter, until cancelled.

        Commands are handled by one task that outlives every connection, one at a time and
        shielded, and each is acknowledged only once handled (agent/inbox.py). On shutdown
        the command in hand is finished first, commands received but not yet handled are
        given to `refuse` (to be answered), the last events and acknowledgements go out and
        then `offline`; what arrives after that stays unacknowledged, for the next start.
        `report` is told about problems of the link itself (a session taken over).
        `records`: a handled command is acknowledged only once it is recorded there, and a
        shutdown sends its last acknowledgements once the records are final.
        """
        self._refuse, self._report, self._records = refuse, report, records
        task_status.started()
        with self._detections_in, self._detections_out:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._consume, handler, name="mqtt.commands")
                await self._reconnect_forever()

    async def _consume(self, handler: Handler) -> None:
        while True:
            delivery = await self._inbox.get()
            self._resume_reading()
            with anyio.CancelScope(shield=True):
                async with self._handling:
                    await handler(delivery.message)
                    size = (
                        len(delivery.message.payload)
                        if isinstance(delivery.message.payload, bytes)
                        else 0
                    )
                    self._settle(delivery.settling())
                    del delivery  # the payload may be large: hold it no longer than needed
                    if size > _TRIM_ABOVE:
                        await anyio.to_thread.run_sync(release_free_memory)

    def _settle(self, settling: Settling) -> None:
        """Acknowledge a handled command once it is recorded and its answers are out."""

        def recorded() -> None:
            # the answers handed over by now (`accepted` included) go first
            settling.handled(self._events_queued)
            self._acknowledge()

        if self._records is None:
            recorded()
        else:
            self._records.when_recorded(recorded)

    async def _finish_commands(self) -> None:
        """Wait for the command in hand; answer those not handled yet, without handling them."""
        with anyio.move_on_after(_HANDLER_GRACE_SECONDS) as scope:
            await self._handling.acquire()
        if scope.cancelled_caught:
            log.error("shutting down with a command still being handled")
            return
        try:
            if self._records is not None:
                # its last write tells about the handled commands it records as unfinished
                with anyio.move_on_after(_FINAL_FLUSH_SECONDS) as closing:
                    await self._records.closed()
                if closing.cancelled_caught:
                    # acknowledgements go in arrival order: those after it could not go either,
                    # so the ones not handled are left unanswered too, for the broker to resend
                    log.error("records not final in time; commands stay unacknowledged")
                    return
            # the consumer is cancelled now: it takes no further message
            for delivery in self._inbox.take_all():
                # one from a connection that is gone cannot be acknowledged: the broker
                # sends it again, and the next start handles it
                if self._refuse is not None and delivery.connection.open:
                    self._refuse(delivery.message)
                    delivery.handled(self._events_queued)
            self._acknowledge()
        finally:
            self._handling.release()
            self._resume_reading()  # the PUBACKs of the last events must still come in

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
            if self._should_fall_back(error):
                continue
            connected = self.stats.connects > connects
            lasted = time.monotonic() - started
            if connected and lasted >= _STABLE_SECONDS:
                attempt, short_sessions = 0, 0  # back off from scratch after a stable session
                self._takeover_reported = False
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

    def _client(self) -> aiomqtt.Client:
        v5 = self._protocol == aiomqtt.ProtocolVersion.V5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._settings.session_expiry
            # flow control: at most this many unacknowledged commands in flight to us
            properties.ReceiveMaximum = self._settings.receive_maximum
            if self._max_packet is not None:
                properties.MaximumPacketSize = self._max_packet
        client = aiomqtt.Client(
            self._settings.host,
            self._settings.port,
            identifier=self._client_id,
            username=self._settings.username,
            password=self._settings.password,
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
        paho = client._client  # aiomqtt offers neither manual acks nor the session flag
        paho.manual_ack_set(True)
        on_connect: Any = paho.on_connect

        def note_session(*args: Any) -> None:
            self._session_present = bool(args[2].session_present)  # (client, userdata, flags, ...)
            on_connect(*args)

        paho.on_connect = note_session
        _register_writers_safely(client)
        self._read_while_room(client)
        return client

    def _inbox_full(self) -> bool:
        # not counting aiomqtt's queue: while we wait for a SUBACK it must go on reading
        if len(self._inbox) >= self._settings.receive_maximum:
            return True
        return self._max_payload is not None and self._inbox.size >= self._max_payload

    def _resume_reading(self) -> None:
        resume, self._paused = self._paused, None
        if resume is not None:
            resume()

    def _read_while_room(self, client: aiomqtt.Client) -> None:
        """Read the socket only while the inbox has room; TCP holds back the rest.

        The broker should stop at our Receive Maximum, but mosquitto 2.0.11 does not once
        acknowledgements flow (measured: 151 unacknowledged with a Receive Maximum of 4),
        and 3.1.1 has none: without this, a burst of large commands all sits in memory.
        Reading pauses when `receive_maximum` commands or `max_payload_bytes` of payload
        wait, and resumes as soon as the handler takes the next one. aiomqtt's reader is
        replaced by one that does the same and checks first.
        """
        paho = client._client
        loop = asyncio.get_running_loop()
        on_open: Any = paho.on_socket_open  # aiomqtt's: registers its reader, starts loop_misc

        def read() -> None:
            sock = paho.socket()
            if sock is None:
                return
            if self._inbox_full():
                fd = sock.fileno()
                loop.remove_reader(fd)
                self._paused = lambda: add(sock)
                return
            try:
                paho.loop_read()
            except Exception as exc:  # noqa: BLE001  # a broken socket ends the session
                disconnected = client._disconnected
                if not disconnected.done():
                    disconnected.set_exception(exc)

        def add(sock: Any) -> None:
            current: Any = paho.socket()
            if current is not None and current is sock:  # still this connection's socket
                loop.add_reader(current.fileno(), read)

        def opened(paho_client: Any, userdata: Any, sock: Any) -> None:
            on_open(paho_client, userdata, sock)
            loop.call_soon_threadsafe(add, sock)  # queued after aiomqtt's: replaces its reader

        paho.on_socket_open = opened

    async def _connect(self, stack: AsyncExitStack) -> aiomqtt.Client:
        client = self._client()
        try:
            await stack.enter_async_context(client)
        except aiomqtt.MqttCodeError:
            raise
        except aiomqtt.MqttError as exc:
            paho = client._client
            if paho.socket() is None:  # no TCP connection: nothing to close, no answer expected
                raise
            # connected, CONNECT sent, no CONNACK: aiomqtt leaves that socket open
            paho._sock_close()
            raise _NoConnack(
                f"no answer to CONNECT within {self._settings.publish_timeout:g} s"
            ) from exc
        return client

    async def _session(self) -> None:
        async with AsyncExitStack() as stack:
            client = await self._connect(stack)
            connection = Connection(client)
            try:
                self._connection = connection
                if self._session_present:
                    # unacknowledged commands of the last connection come again on this one
                    resent = self._inbox.forget_closed()
                    if resent:
                        log.info("commands left from the last connection come again", count=resent)
                await self._subscribe(client)
                self.connected = True
                self.stats.connects += 1
                for topic in self._box.retained:
                    self._box.dirty[topic] = None
                log.info(
                    "mqtt connected",
                    host=self._settings.host,
                    port=self._settings.port,
                    protocol=self.protocol,
                    client_id=self._client_id,
                    session_present=self._session_present,
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._send_loop, client, name="mqtt.send")
                    tg.start_soon(self._detection_loop, client, name="mqtt.detections")
                    async for message in client.messages:
                        self._inbox.put(connection.receive(message))
                    tg.cancel_scope.cancel()
            except anyio.get_cancelled_exc_class():
                # the command in hand, the records' last write, then events and `offline`
                limit = _HANDLER_GRACE_SECONDS + 2 * _FINAL_FLUSH_SECONDS
                with anyio.move_on_after(limit, shield=True):
                    await self._finish_commands()
                    await self._farewell(client)
                raise
            finally:
                unacknowledged = connection.close()
                if unacknowledged:
                    log.info("connection closed with commands unacknowledged", count=unacknowledged)
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

    async def _publish_next(self, client: aiomqtt.Client) -> bool:
        """Publish one queued item, retained state first; False when nothing is queued."""
        box = self._box
        timeout = self._settings.publish_timeout
        if box.dirty:
            topic = next(iter(box.dirty))
            del box.dirty[topic]
            try:
                await client.publish(
                    topic, box.retained[topic], qos=1, retain=True, timeout=timeout
                )
            except BaseException:
                box.dirty[topic] = None
                raise
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
                await client.publish(
                    item.topic, item.payload, qos=1, properties=properties, timeout=timeout
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
            paho = client._client
            with _writing_directly(client):
                for topic, payload in batch:
                    info = paho.publish(topic, payload, 0)
                    if info.rc != MQTT_ERR_SUCCESS:
                        raise aiomqtt.MqttCodeError(info.rc, "Could not publish a detection")
            self.stats.detections_sent += len(batch)
            if paho.want_write():
                # the socket did not take it all: wait for it to drain, so that detections
                # queue (and are dropped, counted) in our bounded stream, not in paho
                await self._drained(paho)

    async def _drained(self, paho: Any) -> None:
        timeout = self._settings.publish_timeout
        with anyio.move_on_after(timeout):
            # paho signals a drained socket only through aiomqtt's callbacks: poll, rarely
            while paho.want_write():  # noqa: ASYNC110
                await anyio.sleep(_DRAIN_POLL_SECONDS)
            return
        raise aiomqtt.MqttError(f"the broker took no data for {timeout:g} s")

    async def _farewell(self, client: aiomqtt.Client) -> None:
        """On clean shutdown: flush queued state and events, then say `offline` ourselves."""
        if not self.connected:
            return
        with contextlib.suppress(aiomqtt.MqttError):
            # events first, within most of the time allowed: `offline` must still go out,
            # as a clean disconnect does not fire the will
            with anyio.move_on_after(_FINAL_FLUSH_SECONDS * 2 / 3):
                while await self._publish_next(client):
                    pass
            self.retain(self._will_topic, b"offline")  # retained state goes first
            while await self._publish_next(client):
                pass


@contextlib.contextmanager
def _writing_directly(client: aiomqtt.Client) -> Iterator[None]:
    """Let paho write QoS 0 packets to the socket at once, inside the calling task.

    Through aiomqtt every publish costs a cross-thread wakeup (`call_soon_threadsafe` of
    `add_writer`), a writer callback and, for QoS 0, a suspension until that callback ran:
    about three event-loop passes per detection. With no write callback registered, paho
    writes from `publish` itself. Afterwards the callback is restored and, if the socket
    took only part of the data, the writer is registered as usual.

    Only while no writer is registered or pending: writing then could unregister a writer
    whose `add_writer` aiomqtt has queued but not run, and that writer would spin.
    """
    paho = client._client  # aiomqtt exposes no batch publish
    if paho._registered_write:
        yield  # paho queues; the registered writer sends it all on the next pass
        return
    register = paho.on_socket_register_write
    paho.on_socket_register_write = None
    try:
        yield
    finally:
        paho.on_socket_register_write = register
        if paho.want_write():
            paho._registered_write = False  # set while no callback was there
            paho._call_socket_register_write()


def _register_writers_safely(client: aiomqtt.Client) -> None:
    """Register paho's socket writer only while that socket is still the client's.

    aiomqtt queues `add_writer(fd)` with `call_soon_threadsafe` (paho may ask from the
    connect thread). When the broker drops the connection before the queued call runs, paho
    has closed the socket and `add_writer` fails on a dead descriptor inside the event loop
    (seen about once in twenty broker-restart tests under load). The queued call here checks
    first; the writer does what aiomqtt's does.
    """
    paho = client._client
    loop = asyncio.get_running_loop()

    def write() -> None:
        try:
            paho.loop_write()
        except Exception as exc:  # noqa: BLE001  # a broken pipe ends the session, as in aiomqtt
            disconnected = client._disconnected
            if not disconnected.done():
                disconnected.set_exception(exc)

    def add(sock: Any) -> None:
        current = paho.socket()
        if current is not None and current is sock:  # paho forgets a socket before closing it
            loop.add_writer(current.fileno(), write)

    def register(_client: Any, _userdata: Any, sock: Any) -> None:
        loop.call_soon_threadsafe(add, sock)

    paho.on_socket_register_write = register


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
