"""Print the OAK devices depthai can see, one JSON list per line.

`python -m agent.cameras.discover` prints once; `--every SECONDS` keeps scanning until its
stdout is closed. The agent runs the latter as a child process: `getAllAvailableDevices()`
holds the GIL for ~0.5 s, which in the agent's process would stall the event loop, and a
long-lived child pays depthai's ~0.6 s of first-scan CPU (USB and network set-up) once
instead of every scan. Devices already opened are not listed.

The agent starts it in a session of its own, so a terminal's Ctrl-C reaches only the agent,
which then stops the child by PID. Run by hand, Ctrl-C ends it without a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import time

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m agent.cameras.discover")
    parser.add_argument("--every", type=float, help="scan every SECONDS until stdout closes")
    args = parser.parse_args(argv)
    # depthai logs to stdout, even on import: keep stdout for the JSON, send logs to stderr
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    import depthai as dai  # noqa: PLC0415 - only after stdout is redirected

    while True:
        devices = [
            {
                "mxid": info.getMxId(),
                "name": info.name,
                "state": info.state.name,
                "protocol": info.protocol.name,
            }
            for info in dai.Device.getAllAvailableDevices()
        ]
        try:
            out.write(json.dumps(devices) + "\n")
        except BrokenPipeError:
            with contextlib.suppress(BrokenPipeError):  # close() flushes into the broken pipe
                out.close()
            return 0  # the agent has gone
        if args.every is None:
            return 0
        time.sleep(args.every)


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(128 + signal.SIGINT)
