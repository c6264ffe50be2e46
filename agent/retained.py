"""Read what a broker retains under some topic filters, with a short-lived client.

For `oak-agent status` and the Home Assistant ghost scan: subscribe, take the retained
messages that arrive, and stop once none came for `quiet` seconds (or after `limit`
seconds, or `max_messages`), whichever is first. MQTT has no marker for "that was the
last retained message", so a quiet spell stands in for it: a message that arrives later
than that is missed, never misread.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Final

import aiomqtt
import anyio

from agent.mqtt import payload_bytes

if TYPE_CHECKING:
    from agent.connect import BrokerOptions

__all__ = ["collect_retained"]

_CONNECT_TIMEOUT: Final = 10.0


async def collect_retained(
    broker: BrokerOptions,
    filters: tuple[str, ...],
    *,
    quiet: float = 1.0,
    limit: float = 10.0,
    max_messages: int = 10_000,
    client_prefix: str = "oak-agent-read",
) -> dict[str, bytes]:
    """The retained payload of each topic matching `filters` (empty ones left out).

    Raises aiomqtt.MqttError when the broker cannot be reached or drops the connection.
    """
    found: dict[str, bytes] = {}
    client = aiomqtt.Client(
        **broker.client_kwargs(),
        identifier=f"{client_prefix}-{uuid.uuid4().hex[:12]}",
        protocol=aiomqtt.ProtocolVersion.V311,  # the embedded amqtt broker speaks only 3.1.1
        timeout=_CONNECT_TIMEOUT,
    )
    with anyio.move_on_after(limit):
        async with client:
            for wanted in filters:
                await client.subscribe(wanted, qos=0)
            messages = aiter(client.messages)
            while len(found) < max_messages:
                with anyio.move_on_after(quiet) as idle:
                    message = await anext(messages)
                if idle.cancelled_caught:
                    break
                # amqtt may also send retained messages of topics someone else subscribed to
                if not message.retain or not any(message.topic.matches(f) for f in filters):
                    continue
                payload = payload_bytes(message)
                if payload:
                    found[message.topic.value] = payload
                else:
                    found.pop(message.topic.value, None)
    return found
