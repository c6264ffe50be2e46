"""Which OAK devices are attached: the gate of every `hardware` test."""

from __future__ import annotations

import json
import subprocess
import sys

__all__ = ["DEVICES", "NO_DEVICE"]


def _devices() -> list[str]:
    # a subprocess, like the agent: the device search holds the GIL for ~0.5 s
    try:
        result = subprocess.run(
            [sys.executable, "-m", "agent.cameras.discover"],
            capture_output=True,
            check=False,
            timeout=60,
        )
    except subprocess.TimeoutExpired:
        return []
    if result.returncode != 0 or not result.stdout.strip():
        return []
    # depthai's own log lines go to stdout before the JSON
    return [device["mxid"] for device in json.loads(result.stdout.splitlines()[-1])]


DEVICES = _devices()
NO_DEVICE = "no OAK device found by dai.Device.getAllAvailableDevices()"
