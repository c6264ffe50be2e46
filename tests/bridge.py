"""A site mosquitto bridged to a central one, and a TCP link between them that can be cut."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import anyio

from agent.fleet.bridge import bridge_topics
from tests.brokers import free_port, run_broker

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

    from anyio.abc import SocketListener, SocketStream, TaskGroup

    from tests.brokers import Broker

__all__ = ["CutLink", "bridge_settings", "bridged", "cut_link"]


def bridge_settings(name: str, central_port: int, prefix: str) -> tuple[str, ...]:
    """mosquitto lines: anonymous clients, and a bridge at QoS 1 whose session the central
    broker keeps while the link is down."""
    return (
        "allow_anonymous true",
        f"connection {name}",
        f"address 127.0.0.1:{central_port}",
        f"remote_clientid bridge-{name}",
        *bridge_topics(prefix),
        "cleansession false",
        "restart_timeout 1 2",
        "keepalive_interval 5",
        "notifications false",
    )


@contextlib.contextmanager
def bridged(
    workdir: Path, prefix: str, *, central_port: int | None = None, site: tuple[str, ...] = ()
) -> Iterator[tuple[Broker, Broker]]:
    """A central mosquitto and a site mosquitto bridged straight to it; `site`: more lines
    for the site broker (e.g. its `max_packet_size`)."""
    with run_broker("mosquitto", workdir / "central", port=central_port) as central:
        settings = (*site, *bridge_settings("site", central.port, prefix))
        with run_broker("mosquitto", workdir / "site", settings=settings) as site_broker:
            yield central, site_broker


class CutLink:
    """A TCP relay from a local port to `target`; `cut()` drops every connection and takes
    no new one until `restore()`."""

    def __init__(self, target: int) -> None:
        self.port = free_port()
        self._target = target
        self._open = anyio.Event()
        self._open.set()
        self._scope = anyio.CancelScope()
        self.connections = 0

    def cut(self) -> None:
        self._open = anyio.Event()
        self._scope.cancel()
        self._scope = anyio.CancelScope()

    def restore(self) -> None:
        self._open.set()

    async def serve(self, tg: TaskGroup) -> None:
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=self.port)
        tg.start_soon(self._accept, listener)

    async def _accept(self, listener: anyio.abc.Listener[SocketStream] | SocketListener) -> None:
        async with listener:
            await listener.serve(self._relay)

    async def _relay(self, client: SocketStream) -> None:
        async with client:
            await self._open.wait()
            scope = self._scope
            self.connections += 1
            with scope, contextlib.suppress(OSError, anyio.BrokenResourceError):
                async with (
                    await anyio.connect_tcp("127.0.0.1", self._target) as server,
                    anyio.create_task_group() as tg,
                ):
                    tg.start_soon(_pump, client, server)
                    tg.start_soon(_pump, server, client)


async def _pump(source: SocketStream, sink: SocketStream) -> None:
    with contextlib.suppress(anyio.EndOfStream, anyio.BrokenResourceError, OSError):
        async for chunk in source:
            await sink.send(chunk)
    with contextlib.suppress(OSError, anyio.BrokenResourceError):
        await sink.send_eof()


@contextlib.asynccontextmanager
async def cut_link(workdir: Path, prefix: str) -> AsyncIterator[tuple[Broker, Broker, CutLink]]:
    """Central and site mosquittos bridged through a link the test can cut."""
    with run_broker("mosquitto", workdir / "central") as central:
        link = CutLink(central.port)
        async with anyio.create_task_group() as tg:
            await link.serve(tg)
            settings = bridge_settings("site", link.port, prefix)
            with run_broker("mosquitto", workdir / "site", settings=settings) as site:
                yield central, site, link
            tg.cancel_scope.cancel()
