"""The embedded amqtt broker for the demo: MQTT 3.1.1, loopback, anonymous."""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import anyio
import structlog
from amqtt.broker import Broker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["embedded_broker"]

log = structlog.get_logger(__name__)


@asynccontextmanager
async def embedded_broker(host: str, port: int) -> AsyncIterator[None]:
    """Run an in-process broker on host:port for as long as the context is open."""
    logging.getLogger("amqtt").setLevel(logging.ERROR)  # it logs every connection at INFO
    broker = Broker(
        {
            "listeners": {"default": {"type": "tcp", "bind": f"{host}:{port}"}},
            "plugins": {
                "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
            },
        }
    )
    await broker.start()
    log.info("embedded broker listening", host=host, port=port, protocol="3.1.1")
    try:
        yield
    finally:
        with anyio.move_on_after(3, shield=True):
            await broker.shutdown()
