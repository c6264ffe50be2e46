"""Received commands and their acknowledgements: a command is acknowledged once handled.

paho runs with manual acknowledgements. A QoS 1 command is acknowledged (PUBACK) only when
it has been handled or refused and every event queued by then has reached the broker, so a
crash or a stop before that leaves it unacknowledged and the broker sends it again on the
next connect of the persistent session. Acknowledgements go out in the order the messages
arrived (MQTT 5 §4.6), and only on the connection that received them: packet ids belong to
one connection, and a message still unacknowledged when its connection ends is the
broker's to send again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import anyio.lowlevel

if TYPE_CHECKING:
    import aiomqtt

__all__ = ["Connection", "Delivery", "Inbox", "Settling"]


@dataclass(eq=False, slots=True)
class _Ack:
    mid: int
    due: int | None = None  # the event count that must have reached the broker first


@dataclass(eq=False, slots=True)
class Delivery:
    """One received message, with the connection that owes its acknowledgement."""

    message: aiomqtt.Message
    connection: Connection
    _ack: _Ack | None

    def handled(self, events_queued: int) -> None:
        """Acknowledge once the first `events_queued` events have reached the broker."""
        self.settling().handled(events_queued)

    def settling(self) -> Settling:
        """The acknowledgement alone, to settle later without holding the payload."""
        return Settling(self._ack)


@dataclass(eq=False, slots=True)
class Settling:
    """A handled message's acknowledgement, waiting until the message is recorded."""

    _ack: _Ack | None

    def handled(self, events_queued: int) -> None:
        """Acknowledge once the first `events_queued` events have reached the broker."""
        if self._ack is not None:
            self._ack.due = events_queued


class Connection:
    """The acknowledgements one MQTT connection owes, in arrival order."""

    def __init__(self, client: aiomqtt.Client) -> None:
        self._paho: Any = client._client  # aiomqtt exposes no acknowledgement
        self._owed: deque[_Ack] = deque()
        self.open = True
        self.acknowledged = 0

    def receive(self, message: aiomqtt.Message) -> Delivery:
        ack = _Ack(message.mid) if message.qos > 0 else None
        if ack is not None:
            self._owed.append(ack)
        return Delivery(message, self, ack)

    def acknowledge(self, events_sent: int) -> None:
        """PUBACK, in arrival order, each handled message whose answers reached the broker."""
        owed = self._owed
        while self.open and owed and owed[0].due is not None and owed[0].due <= events_sent:
            self._paho.ack(owed.popleft().mid, 1)
            self.acknowledged += 1

    @property
    def owed(self) -> int:
        return len(self._owed)

    def close(self) -> int:
        """The connection is gone; return how many messages the broker should send again."""
        self.open = False
        owed = len(self._owed)
        self._owed.clear()
        return owed


class Inbox:
    """Deliveries waiting to be handled, in arrival order, across connections."""

    def __init__(self) -> None:
        self._waiting: deque[Delivery] = deque()
        self._arrived = anyio.Event()
        self.size = 0  # payload bytes waiting

    def __len__(self) -> int:
        return len(self._waiting)

    def put(self, delivery: Delivery) -> None:
        self._waiting.append(delivery)
        self.size += _size(delivery)
        self._arrived.set()

    async def get(self) -> Delivery:
        await anyio.lowlevel.checkpoint()  # a cancelled consumer takes nothing more
        while not self._waiting:
            self._arrived = anyio.Event()
            await self._arrived.wait()
        delivery = self._waiting.popleft()
        self.size -= _size(delivery)
        return delivery

    def take_all(self) -> list[Delivery]:
        taken = list(self._waiting)
        self._waiting.clear()
        self.size = 0
        return taken

    def forget_closed(self) -> int:
        """Drop deliveries of closed connections: the broker kept the session and resends them."""
        kept = deque(d for d in self._waiting if d.connection.open)
        dropped = len(self._waiting) - len(kept)
        self._waiting = kept
        self.size = sum(_size(d) for d in kept)
        return dropped


def _size(delivery: Delivery) -> int:
    payload = delivery.message.payload
    return len(payload) if isinstance(payload, bytes) else 0
