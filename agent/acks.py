"""MQTT acknowledgements: a received command is PUBACKed only once it is handled and recorded.

paho runs with manual acknowledgements. A QoS 1 command is acknowledged (PUBACK) only when
it has been handled or refused, recorded, and every event queued by then has reached the
broker, so a crash or a stop before that leaves it unacknowledged and the broker sends it
again on the next connect of the persistent session. Acknowledgements go out in the order
the messages arrived (MQTT 5 §4.6), and only on the connection that received them: packet
ids belong to one connection, and a message still unacknowledged when its connection ends
is the broker's to send again.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["Connection", "Ledger", "MqttReceipt"]


class Ledger(Protocol):
    """What a receipt needs from the link: the event count, acknowledging, memory held."""

    @property
    def events_queued(self) -> int:
        """Events that entered the outbound queue so far."""

    def acknowledge(self) -> None:
        """PUBACK what is due now."""

    def released(self, size: int) -> None:
        """A message of `size` payload bytes is no longer held."""


@dataclass(eq=False, slots=True)
class _Ack:
    mid: int
    due: int | None = None  # the event count that must have reached the broker first


class Connection:
    """The acknowledgements one MQTT connection owes, in arrival order."""

    def __init__(self, ack: Callable[[int], None]) -> None:
        self._ack = ack  # paho's PUBACK of one message id
        self._owed: deque[_Ack] = deque()
        self.open = True
        # a later CONNACK said the broker kept the session: it sends what this one left again
        self.resent = False
        self.held = 0  # messages received here whose payload the boundary still holds
        self.acknowledged = 0

    def receive(self, ledger: Ledger, mid: int, qos: int, size: int) -> MqttReceipt:
        ack = _Ack(mid) if qos > 0 else None
        if ack is not None:
            self._owed.append(ack)
        self.held += 1
        return MqttReceipt(self, ack, size, ledger)

    def acknowledge(self, events_sent: int) -> None:
        """PUBACK, in arrival order, each handled message whose answers reached the broker."""
        owed = self._owed
        while self.open and owed and owed[0].due is not None and owed[0].due <= events_sent:
            self._ack(owed.popleft().mid)
            self.acknowledged += 1

    def close(self) -> int:
        """The connection is gone; return how many messages the broker should send again."""
        self.open = False
        owed = len(self._owed)
        self._owed.clear()
        return owed


@dataclass(eq=False, slots=True)
class MqttReceipt:
    """The `agent.inbox.Receipt` of one message received over MQTT."""

    _connection: Connection
    _ack: _Ack | None
    _size: int
    _ledger: Ledger
    _released: bool = False

    @property
    def live(self) -> bool:
        return self._connection.open

    @property
    def redelivered(self) -> bool:
        return self._connection.resent

    def settle(self) -> None:
        if self._ack is not None:
            self._ack.due = self._ledger.events_queued
        self._ledger.acknowledge()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._connection.held -= 1
            self._ledger.released(self._size)
