"""What a front end hands the command boundary: a message, and the receipt it owes the sender.

Transport-neutral: the MQTT link builds these from what paho received, and another front
end (a REST gateway) can build them from a request. The receipt is how the boundary tells
the front end that a message was handled and recorded (MQTT: PUBACK it, in arrival order,
once the answers queued by then are out) and that its payload is no longer held (MQTT:
reading resumes once there is room).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

__all__ = ["Inbound", "Receipt"]


@dataclass(frozen=True, slots=True)
class Inbound:
    """One received message: where it was sent, its bytes, and where answers may be copied."""

    topic: str
    payload: bytes
    retain: bool = False
    # MQTT 5 Response Topic and Correlation Data, unchecked: the boundary validates them
    response_topic: str | None = None
    correlation_data: bytes | None = None
    # MQTT 5 user properties as received, in order, duplicates kept (signatures travel here)
    user_properties: tuple[tuple[str, str], ...] = ()
    # the transport delivered it before, unacknowledged (MQTT: the DUP flag)
    resent: bool = False


class Receipt(Protocol):
    """What the front end owes the sender of one message."""

    @property
    def live(self) -> bool:
        """Whether settling still reaches the sender (MQTT: the connection is still open)."""

    @property
    def redelivered(self) -> bool:
        """Whether the sender gets this message delivered again (MQTT: a later connection
        kept the session): handling this copy would handle it twice."""

    def settle(self) -> None:
        """Handled or refused, and recorded: acknowledge it once the answers queued by now
        have gone out."""

    def release(self) -> None:
        """Its payload is no longer held (called once, when handled, refused or dropped)."""
