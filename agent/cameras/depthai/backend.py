"""Every OAK device discovery finds (or an address reaches), each adopted as a DepthaiCamera."""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Final

import anyio
import anyio.to_thread
import structlog

from agent.cameras.depthai.camera import DepthaiCamera
from agent.cameras.depthai.device import DeviceBusy, probe
from agent.cameras.depthai.discovery import Found, discover_forever

if TYPE_CHECKING:
    from collections.abc import Mapping

    from anyio.abc import TaskGroup, TaskStatus

    from agent.cameras.base import CameraListener
    from agent.config import DepthaiSection

__all__ = ["DepthaiBackend"]

log = structlog.get_logger(__name__)

_PROBE_RETRY_MAX: Final = 300.0


class DepthaiBackend:
    """Every OAK device depthai finds (or `poe_addresses` reach), filtered by `allow`."""

    name = "depthai"

    def __init__(self, settings: DepthaiSection) -> None:
        self._settings = settings
        self._cameras: dict[str, DepthaiCamera] = {}
        self._by_address: dict[str, str] = {}
        self._retry_at: dict[str, tuple[float, int]] = {}  # target -> (when, failures)
        self._probe_limiter = anyio.CapacityLimiter(1)

    @property
    def cameras(self) -> Mapping[str, DepthaiCamera]:
        return self._cameras

    async def run(self, listener: CameraListener, *, task_status: TaskStatus[None]) -> None:
        if not self._settings.enabled:
            task_status.started()
            return
        send, receive = anyio.create_memory_object_stream[list[Found]](1)
        async with anyio.create_task_group() as tg, receive:
            interval = self._settings.discovery_interval
            tg.start_soon(discover_forever, interval, send, name="depthai.discovery")
            found = await receive.receive()
            await self._scan(tg, listener, found)
            log.info("depthai cameras", cameras=sorted(self._cameras))
            task_status.started()
            async for found in receive:
                await self._scan(tg, listener, found)

    def _allowed(self, mxid: str) -> bool:
        return not self._settings.allow or mxid in self._settings.allow

    async def _scan(self, tg: TaskGroup, listener: CameraListener, found: list[Found]) -> None:
        listed = {f.mxid: f for f in found if self._allowed(f.mxid)}
        for mxid, camera in self._cameras.items():
            if mxid in listed:
                camera.seen(listed[mxid].target)
            else:
                camera.missed()
        for device in listed.values():
            if device.mxid not in self._cameras:
                await self._adopt(tg, listener, device.target, unicast=False)
        for address in self._settings.poe_addresses:
            reached = self._cameras.get(self._by_address.get(address, ""))
            if reached is None or not reached.present:
                await self._adopt(tg, listener, address, unicast=True)

    async def _adopt(
        self, tg: TaskGroup, listener: CameraListener, target: str, *, unicast: bool
    ) -> None:
        """Open a device once to learn its features, then drive it (or mark it present)."""
        when, failures = self._retry_at.get(target, (0.0, 0))
        if time.monotonic() < when:
            return
        try:
            with anyio.fail_after(self._settings.boot_timeout):
                # an abandoned probe closes its device itself when it returns
                probed = await anyio.to_thread.run_sync(
                    probe,
                    target,
                    self._settings.boot_timeout,
                    limiter=self._probe_limiter,
                    abandon_on_cancel=True,
                )
        # RuntimeError: depthai could not open it (gone, booted by another host, ...)
        except (DeviceBusy, RuntimeError, TimeoutError) as exc:
            delay = min(_PROBE_RETRY_MAX, self._settings.discovery_interval * 2.0**failures)
            self._retry_at[target] = (time.monotonic() + delay, failures + 1)
            log.warning("camera probe failed", target=target, error=str(exc), retry_in=delay)
            return
        self._retry_at.pop(target, None)
        mxid, product = probed.mxid, probed.product
        if unicast:
            self._by_address[target] = mxid
        adopted = self._cameras.get(mxid)
        if adopted is not None:
            adopted.seen(target)
            return
        if not self._allowed(mxid):
            log.warning("camera not in the allow-list; ignoring it", camera=mxid, target=target)
            self._retry_at[target] = (math.inf, failures)
            return
        camera = DepthaiCamera(
            mxid,
            name=self._settings.names.get(mxid) or product or mxid,
            product=product or "OAK",
            firmware=probed.bootloader,
            features=probed.features,
            target=target,
            settings=self._settings,
            listener=listener,
            unicast=unicast,
        )
        # the listener adopts a camera through `cameras`, so it goes there first
        self._cameras[mxid] = camera
        await tg.start(camera.run, name=f"camera[{mxid}].depthai")
        log.info("camera adopted", camera=mxid, product=product, streams=camera.streams)
        listener.on_presence(mxid, True)
