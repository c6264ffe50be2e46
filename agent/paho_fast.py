"""Where the MQTT link reaches under aiomqtt into paho, and the guard that allows it.

aiomqtt 2.x wraps one paho client (`Client._client`) and exposes neither manual
acknowledgements nor the CONNACK's session-present flag: `manual_acks` switches them on
through paho's public API on that client, and the link cannot work without it. Nor does it
keep the CONNACK's properties: `on_connack` reads the broker's Maximum Packet Size there (the
client uses it to choose between an inline and a chunked model); nor does its Message keep
paho's DUP flag: `duplicates` reads it through paho's public `on_message`.

The fast path proper also uses private attributes, of aiomqtt (`Client._disconnected`) and
of paho (`_registered_write`, `_call_socket_register_write`, `_sock_close`). It is used
only with the aiomqtt and paho versions it was written for (`FAST_PATH`, `fast_path_for`);
with others the link uses aiomqtt's public API instead (each function's `fast=False`), and
logs once what it does without:
- `pause_reading_while`: aiomqtt reads the socket whenever it is readable and queues every
  message, unbounded; this reads only while the boundary holds fewer than its limit.
- `register_writers_safely`: aiomqtt queues `add_writer(fd)` from paho's thread and runs it
  even after that socket closed, on a dead descriptor.
- `publish_batch`: aiomqtt's publish costs about three event-loop passes per QoS 0 packet;
  this writes a batch from paho's own `publish`, in the calling task.
- `close_unanswered`: aiomqtt leaves the socket of a CONNECT without CONNACK open.

`tolerate_property_strings` is not about speed: it replaces paho's reader of MQTT 5 string
properties (`paho.mqtt.properties.readUTF`), which refuses U+FEFF (that MQTT 5 allows,
[MQTT-1.5.4-3], and mosquitto forwards) and raises on ill-formed UTF-8: either drops the
connection, and the broker sends the same unacknowledged command again on every reconnect,
forever. With it, such a string reaches the command boundary (ill-formed bytes as U+FFFD),
which answers the command.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any, Final

import aiomqtt
import anyio
import paho.mqtt
import paho.mqtt.client as mqtt
import paho.mqtt.properties
from paho.mqtt.exception import MalformedPacket
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

__all__ = [
    "FAST_PATH",
    "VERSIONS",
    "ReadGate",
    "close_unanswered",
    "duplicates",
    "fast_path_for",
    "has_socket",
    "manual_acks",
    "on_connack",
    "pause_reading_while",
    "publish_batch",
    "register_writers_safely",
    "tolerate_property_strings",
]

# (major, minor) of the releases whose internals this module was written against
_WRITTEN_FOR: Final = {"aiomqtt": (2, 5), "paho-mqtt": (2, 2)}
_PAHO_INTERNALS: Final = ("_call_socket_register_write", "_sock_close")
_DRAIN_POLL_SECONDS: Final = 0.005


def _major_minor(version: str) -> tuple[int, int] | None:
    parts = version.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return None


def _supported() -> bool:
    found = {"aiomqtt": aiomqtt.__version__, "paho-mqtt": paho.mqtt.__version__}
    if any(_major_minor(found[name]) != wanted for name, wanted in _WRITTEN_FOR.items()):
        return False
    return all(hasattr(mqtt.Client, name) for name in _PAHO_INTERNALS)


FAST_PATH: Final = _supported()
"""True with the aiomqtt and paho versions whose internals the fast path was written for."""

VERSIONS: Final = f"aiomqtt {aiomqtt.__version__}, paho-mqtt {paho.mqtt.__version__}"


def _paho(client: aiomqtt.Client) -> mqtt.Client:
    paho_client = getattr(client, "_client", None)
    if not isinstance(paho_client, mqtt.Client):
        # without it commands would be acknowledged on arrival: refuse to run instead
        msg = f"aiomqtt keeps no paho client in `_client` ({VERSIONS}): no manual acks"
        raise TypeError(msg)
    return paho_client


def _read_text(buffer: bytes | bytearray, maxlen: int) -> tuple[str, int]:
    """An MQTT string (two length bytes, then the bytes) and the bytes it took; as paho's
    `readUTF`, but neither U+FEFF nor ill-formed UTF-8 (read as U+FFFD) are refused."""
    if maxlen < 2:  # the length field
        raise MalformedPacket("Not enough data to read string length")
    length = int.from_bytes(buffer[:2], "big")
    if length > maxlen - 2:
        raise MalformedPacket("Length delimited string too long")
    return bytes(buffer[2 : 2 + length]).decode("utf-8", errors="replace"), length + 2


def _check_read_text() -> bool:
    """Whether paho reads string properties through the module's `readUTF` (checked on a
    user property holding U+FEFF, which the original refuses)."""
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    properties.UserProperty = [("k", "\ufeff")]
    packed = properties.pack()  # type: ignore[no-untyped-call]
    try:
        read = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        read.unpack(packed)  # type: ignore[no-untyped-call]
    except MalformedPacket:
        return False
    return getattr(read, "UserProperty", None) == [("k", "\ufeff")]


def tolerate_property_strings() -> bool:
    """Have paho read string properties with `_read_text` (see the module's docstring);
    True once it does. Idempotent; process-wide, as paho's reader is."""
    module: Any = paho.mqtt.properties
    if getattr(module, "readUTF", None) is not _read_text:
        if not callable(getattr(module, "readUTF", None)):
            return False
        module.readUTF = _read_text
    return _check_read_text()


def fast_path_for(client: aiomqtt.Client) -> bool:
    """Whether the fast path may be used with this client (FAST_PATH, and its internals)."""
    return (
        FAST_PATH
        and isinstance(getattr(client, "_disconnected", None), asyncio.Future)
        and hasattr(_paho(client), "_registered_write")
    )


def manual_acks(
    client: aiomqtt.Client, on_session: Callable[[bool], None]
) -> Callable[[int], None]:
    """Acknowledge QoS 1 messages by hand, and tell `on_session` each CONNACK's
    session-present flag; return the function that acknowledges one message id."""
    paho = _paho(client)
    paho.manual_ack_set(True)
    on_connect: Any = paho.on_connect  # aiomqtt's

    def note_session(*args: Any) -> None:
        on_session(bool(args[2].session_present))  # (client, userdata, flags, ...)
        on_connect(*args)

    paho.on_connect = note_session

    def ack(mid: int) -> None:
        paho.ack(mid, 1)

    return ack


def duplicates(client: aiomqtt.Client) -> Callable[[int], bool]:
    """Return what tells, for a message id just received, whether the broker flagged it DUP.

    aiomqtt's Message leaves out paho's `dup` (the broker sent this message before, to a
    connection that did not acknowledge it); paho's public `on_message` sees it. Each id
    is asked about once, when its message is delivered. Call before connecting.
    """
    paho = _paho(client)
    on_message: Any = paho.on_message  # aiomqtt's
    flagged: set[int] = set()

    def note(*args: Any) -> None:
        message = args[2]  # (client, userdata, message)
        if message.dup and message.qos > 0:
            flagged.add(message.mid)
        on_message(*args)

    paho.on_message = note

    def take(mid: int) -> bool:
        if mid in flagged:
            flagged.discard(mid)
            return True
        return False

    return take


def _fail_session(client: aiomqtt.Client, exc: Exception) -> None:
    """End the session with `exc`, as aiomqtt's own reader and writer do."""
    disconnected: asyncio.Future[None] = client._disconnected  # private: guarded by FAST_PATH
    if not disconnected.done():
        disconnected.set_exception(exc)


class ReadGate:
    """Resumes reading a socket that `pause_reading_while` paused; does nothing otherwise."""

    def __init__(self) -> None:
        self._paused: Callable[[], None] | None = None

    @property
    def paused(self) -> bool:
        """Whether the socket is not being read now."""
        return self._paused is not None

    def pause(self, resume: Callable[[], None]) -> None:
        self._paused = resume

    def resume(self) -> None:
        resume, self._paused = self._paused, None
        if resume is not None:
            resume()


def pause_reading_while(
    client: aiomqtt.Client, full: Callable[[], bool], *, fast: bool
) -> ReadGate:
    """Read the socket only while `full()` is False; TCP holds back the rest.

    aiomqtt's reader is replaced by one that checks first; a paused reader is added back by
    the returned gate's `resume()`. Call before connecting. Without the fast path: no pause.
    """
    gate = ReadGate()
    if not fast:
        return gate
    paho = _paho(client)
    loop = asyncio.get_running_loop()
    on_open: Any = paho.on_socket_open  # aiomqtt's: registers its reader, starts loop_misc

    def read() -> None:
        sock = paho.socket()
        if sock is None:
            return
        if full():
            loop.remove_reader(sock.fileno())
            gate.pause(lambda: add(sock))
            return
        try:
            paho.loop_read()
        except Exception as exc:  # noqa: BLE001  # a broken socket ends the session
            _fail_session(client, exc)

    def add(sock: Any) -> None:
        current: Any = paho.socket()
        if current is not None and current is sock:  # still this connection's socket
            loop.add_reader(current.fileno(), read)

    def opened(paho_client: Any, userdata: Any, sock: Any) -> None:
        on_open(paho_client, userdata, sock)
        loop.call_soon_threadsafe(add, sock)  # queued after aiomqtt's: replaces its reader

    paho.on_socket_open = opened
    return gate


def register_writers_safely(client: aiomqtt.Client, *, fast: bool) -> None:
    """Register paho's socket writer only while that socket is still the client's.

    aiomqtt queues `add_writer(fd)` with `call_soon_threadsafe` (paho may ask from the
    connect thread). When the broker drops the connection before the queued call runs, paho
    has closed the socket and `add_writer` fails on a dead descriptor inside the event loop
    (seen about once in twenty broker-restart tests under load). The queued call here checks
    first; the writer does what aiomqtt's does. Call before connecting.
    """
    if not fast:
        return
    paho = _paho(client)
    loop = asyncio.get_running_loop()

    def write() -> None:
        try:
            paho.loop_write()
        except Exception as exc:  # noqa: BLE001  # a broken pipe ends the session, as in aiomqtt
            _fail_session(client, exc)

    def add(sock: Any) -> None:
        current = paho.socket()
        if current is not None and current is sock:  # paho forgets a socket before closing it
            loop.add_writer(current.fileno(), write)

    def register(_client: Any, _userdata: Any, sock: Any) -> None:
        loop.call_soon_threadsafe(add, sock)

    paho.on_socket_register_write = register


def on_connack(client: aiomqtt.Client, found: Callable[[int | None], None]) -> None:
    """Tell `found` the Maximum Packet Size of each CONNACK (MQTT 5; None when it names
    none, or on 3.1.1): aiomqtt does not keep the CONNACK's properties. Call before connecting.
    """
    paho = _paho(client)
    on_connect: Any = paho.on_connect  # aiomqtt's

    def note_limit(*args: Any) -> None:  # (client, userdata, flags, reason, properties)
        properties = args[4] if len(args) > 4 else None
        limit = getattr(properties, "MaximumPacketSize", None)
        found(limit if isinstance(limit, int) else None)
        on_connect(*args)

    paho.on_connect = note_limit


def has_socket(client: aiomqtt.Client) -> bool:
    """Whether paho holds a TCP connection (public paho API)."""
    return _paho(client).socket() is not None


def close_unanswered(client: aiomqtt.Client, *, fast: bool) -> None:
    """Close the socket of a CONNECT that got no CONNACK (aiomqtt leaves it open).

    Without the fast path it stays open until the client is collected.
    """
    if fast:
        _paho(client)._sock_close()  # private: guarded by FAST_PATH


async def publish_batch(
    client: aiomqtt.Client, batch: list[tuple[str, bytes]], *, stall_seconds: float, fast: bool
) -> None:
    """Publish QoS 0 packets; return once the socket took them (or paho queued them).

    Raise aiomqtt.MqttError when paho refuses one or the broker takes no data for
    `stall_seconds`.
    """
    timeout = stall_seconds
    if not fast:
        for topic, payload in batch:
            await client.publish(topic, payload, qos=0, timeout=timeout)
        return
    paho = _paho(client)
    with _writing_directly(paho):
        for topic, payload in batch:
            info = paho.publish(topic, payload, 0)
            if info.rc != mqtt.MQTT_ERR_SUCCESS:
                raise aiomqtt.MqttCodeError(info.rc, "Could not publish a detection")
    if paho.want_write():
        # the socket did not take it all: wait for it to drain, so that detections
        # queue (and are dropped, counted) in the link's bounded stream, not in paho
        with anyio.move_on_after(timeout):
            # paho signals a drained socket only through aiomqtt's callbacks: poll, rarely
            while paho.want_write():  # noqa: ASYNC110
                await anyio.sleep(_DRAIN_POLL_SECONDS)
            return
        raise aiomqtt.MqttError(f"the broker took no data for {timeout:g} s")


@contextlib.contextmanager
def _writing_directly(paho: mqtt.Client) -> Iterator[None]:
    """Let paho write QoS 0 packets to the socket at once, inside the calling task.

    Through aiomqtt every publish costs a cross-thread wakeup (`call_soon_threadsafe` of
    `add_writer`), a writer callback and, for QoS 0, a suspension until that callback ran:
    about three event-loop passes per detection. With no write callback registered, paho
    writes from `publish` itself. Afterwards the callback is restored and, if the socket
    took only part of the data, the writer is registered as usual.

    Only while no writer is registered or pending: writing then could unregister a writer
    whose `add_writer` aiomqtt has queued but not run, and that writer would spin.
    """
    if paho._registered_write:  # private: guarded by FAST_PATH
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
            paho._call_socket_register_write()  # private: guarded by FAST_PATH
