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
import math
import random
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import aiomqtt
import anyio
import structlog
from paho.mqtt.client import MQTT_CLEAN_START_FIRST_ONLY, MQTT_ERR_SUCCESS
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

if TYPE_CHECKING:
    from anyio.abc import TaskStatus
    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from agent.config import MqttSection

__all__ = ["LinkStats", "MqttLink", "ReplyTo"]

log = structlog.get_logger(__name__)

_REFUSED_PROTOCOL: Final = frozenset({1, 132})  # 3.1.1 and MQTT 5 "unsupported protocol version"
_FINAL_FLUSH_SECONDS: Final = 3.0
_HANDLER_GRACE_SECONDS: Final = 5.0  # for the command in hand when shutting down
_DRAIN_POLL_SECONDS: Final = 0.005
_DETECTION_BATCH: Final = 256

Handler = Callable[[aiomqtt.Message], Awaitable[None]]
Refuse = Callable[[aiomqtt.Message], None]


@dataclass(frozen=True, slots=True)
class ReplyTo:
    """An MQTT 5 Response Topic with the Correlation Data to copy back."""

    topic: str
    correlation_data: bytes | None = None


@dataclass(slots=True)
class LinkStats:
    connects: int = 0
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
        self._handling = anyio.Lock()  # held while a command is handled
        self._leftovers: MemoryObjectReceiveStream[aiomqtt.Message] | None = None
        self._refuse: Refuse | None = None

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
            log.error("event queue full, oldest event dropped", limit=self._event_limit)
        events.append(item)
        self._wakeup.set()

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
        self, handler: Handler, *, refuse: Refuse | None = None, task_status: TaskStatus[None]
    ) -> None:
        """Connect, serve, reconnect with backoff and jitter, until cancelled.

        Commands are handled by one task that outlives every connection: a disconnect never
        cuts a command off halfway (the broker has its PUBACK by then), and handling one
        command is shielded. On shutdown the command in hand is finished first, commands
        received but not yet handled are given to `refuse` (to be answered), and only then
        are the last events and `offline` sent.
        """
        # unbounded: a received message is acknowledged already; it must not be dropped
        inbox_in, inbox_out = anyio.create_memory_object_stream[aiomqtt.Message](math.inf)
        self._leftovers, self._refuse = inbox_out, refuse
        task_status.started()
        with self._detections_in, self._detections_out, inbox_in, inbox_out:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._consume, inbox_out, handler, name="mqtt.commands")
                await self._reconnect_forever(inbox_in)

    async def _consume(
        self, inbox: MemoryObjectReceiveStream[aiomqtt.Message], handler: Handler
    ) -> None:
        async for message in inbox:
            with anyio.CancelScope(shield=True):
                async with self._handling:
                    await handler(message)

    async def _finish_commands(self) -> None:
        """Wait for the command in hand; answer those not handled yet, without handling them."""
        with anyio.move_on_after(_HANDLER_GRACE_SECONDS) as scope:
            await self._handling.acquire()
        if scope.cancelled_caught:
            log.error("shutting down with a command still being handled")
            return
        try:
            # the consumer is cancelled now: it takes no further message
            with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
                while self._leftovers is not None and self._refuse is not None:
                    self._refuse(self._leftovers.receive_nowait())
        finally:
            self._handling.release()

    async def _reconnect_forever(self, inbox: MemoryObjectSendStream[aiomqtt.Message]) -> None:
        attempt = 0
        while True:
            error: BaseException | None = None
            connects = self.stats.connects
            try:
                await self._session(inbox)
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
                log.warning(
                    "broker refused MQTT 5, falling back to MQTT 3.1.1",
                    host=self._settings.host,
                    port=self._settings.port,
                )
                self._protocol = aiomqtt.ProtocolVersion.V311
                continue
            # back off from scratch after a session that got connected
            attempt = 0 if self.stats.connects > connects else attempt + 1
            delay = min(
                self._settings.reconnect_max, self._settings.reconnect_min * 2 ** min(attempt, 16)
            ) * random.uniform(0.5, 1.0)  # noqa: S311  # jitter, not cryptography
            log.warning(
                "mqtt disconnected, reconnecting", error=str(error), retry_in=round(delay, 2)
            )
            await anyio.sleep(delay)

    def _drop_queued_detections(self) -> None:
        """Detections never wait for a reconnect: stale frames are worth less than none."""
        with contextlib.suppress(anyio.WouldBlock, anyio.ClosedResourceError):
            while True:
                self._detections_out.receive_nowait()
                self.stats.detections_dropped_disconnected += 1

    def _should_fall_back(self, error: BaseException | None) -> bool:
        if self._protocol != aiomqtt.ProtocolVersion.V5:
            return False
        if not isinstance(error, aiomqtt.MqttCodeError):
            return False
        rc = error.rc
        value = rc if isinstance(rc, int) else getattr(rc, "value", None)
        return value in _REFUSED_PROTOCOL

    def _client(self) -> aiomqtt.Client:
        v5 = self._protocol == aiomqtt.ProtocolVersion.V5
        properties = None
        if v5:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = self._settings.session_expiry
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
        _register_writers_safely(client)
        return client

    async def _session(self, inbox: MemoryObjectSendStream[aiomqtt.Message]) -> None:
        async with self._client() as client:
            try:
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
                )
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._send_loop, client, name="mqtt.send")
                    tg.start_soon(self._detection_loop, client, name="mqtt.detections")
                    async for message in client.messages:
                        inbox.send_nowait(message)
                    tg.cancel_scope.cancel()
            except anyio.get_cancelled_exc_class():
                limit = _HANDLER_GRACE_SECONDS + _FINAL_FLUSH_SECONDS
                with anyio.move_on_after(limit, shield=True):
                    await self._finish_commands()
                    await self._farewell(client)
                raise

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
            else:
                self.stats.events_sent += 1
            if box.events and box.events[0] is item:
                box.events.popleft()
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
