"""The agent's side of the discovery child: keep it running, read the devices it lists."""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING, Final

import anyio
import msgspec
import structlog
from anyio.streams.buffered import BufferedByteReceiveStream

if TYPE_CHECKING:
    from anyio.abc import Process
    from anyio.streams.memory import MemoryObjectSendStream

__all__ = ["Found", "discover_forever"]

log = structlog.get_logger(__name__)

_DISCOVERY_LINE_MAX: Final = 1 << 20
_CHILD_STOP_TIMEOUT: Final = 5.0  # SIGKILL is immediate unless the child hangs in the kernel


class Found(msgspec.Struct, frozen=True):
    """One device as `python -m agent.cameras.discover` lists it."""

    mxid: str
    name: str
    state: str
    protocol: str

    @property
    def target(self) -> str:
        # a USB port name changes when the device boots; an IP address does not
        return self.name if self.protocol == "X_LINK_TCP_IP" else self.mxid


_found_decoder: Final = msgspec.json.Decoder(list[Found])


async def discover_forever(interval: float, send: MemoryObjectSendStream[list[Found]]) -> None:
    """Keep a discovery child process running; send the devices of each of its scans.

    The child runs in its own session, so a terminal's Ctrl-C (SIGINT to the foreground
    process group), Ctrl-Z or hang-up never reaches it: only this task stops it, by PID.
    """
    command = [sys.executable, "-m", "agent.cameras.discover", "--every", str(interval)]
    async with send:
        while True:
            # stderr is inherited: it carries depthai's own log lines
            process = await anyio.open_process(
                command, stdin=subprocess.DEVNULL, stderr=None, start_new_session=True
            )
            try:
                assert process.stdout is not None  # open_process pipes stdout
                lines = BufferedByteReceiveStream(process.stdout)
                while True:
                    line = await lines.receive_until(b"\n", _DISCOVERY_LINE_MAX)
                    try:
                        found = _found_decoder.decode(line)
                    except msgspec.DecodeError as exc:  # stray output of the child
                        log.warning("camera discovery line skipped", error=str(exc))
                        continue
                    await send.send(found)
            except (anyio.EndOfStream, anyio.IncompleteRead):
                log.warning(
                    "camera discovery stopped; restarting it", returncode=process.returncode
                )
            finally:
                await _stop_child(process)
            await anyio.sleep(interval)


async def _stop_child(process: Process) -> None:
    """Kill the discovery child by its PID and reap it, shielded and bounded in time."""
    with anyio.CancelScope(shield=True), anyio.move_on_after(_CHILD_STOP_TIMEOUT) as bound:
        if process.returncode is None:
            process.kill()  # it holds no device and writes no file: nothing to clean up
        await process.aclose()
    if bound.cancelled_caught:  # in an uninterruptible call (hung USB): it dies when that returns
        log.warning("camera discovery child did not exit", pid=process.pid)
