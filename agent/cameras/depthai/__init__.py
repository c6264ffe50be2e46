"""Real OAK cameras (RVC2) through depthai 2.x: discovery, apply and reading NN outputs.

Threads and the event loop:
- Discovery runs in a long-lived child process (`python -m agent.cameras.discover --every`),
  because depthai's device search holds the GIL for ~0.5 s. It does not list devices that
  are open, so a camera we have open is never counted missing; its reader notices the loss.
- Every blocking depthai call runs in a worker thread under the camera's CapacityLimiter(1).
- One reader thread per open device waits on `getQueueEvents`, converts a batch of messages
  to `Output`s (numpy, off the loop) and hands the batch to the loop with one
  `from_thread.run_sync` call; the loop puts them in a bounded stream, dropping and counting
  when it is full. One loop hop per batch is cheaper than a polled queue and adds no latency.

Features (sensors, stereo pairs) need an open device: a camera is opened once when first
seen, its features read, and closed again; only then is it adopted, with its streams known.

Modules: `discovery` (the parent side of the discovery child), `device` (probing, opening
and closing a device in worker threads), `outputs` (device messages as `Output`s),
`camera` (one device) and `backend` (every device).
"""

from __future__ import annotations

from agent.cameras.depthai.backend import DepthaiBackend
from agent.cameras.depthai.camera import DepthaiCamera
from agent.cameras.depthai.outputs import read_layers

__all__ = ["DepthaiBackend", "DepthaiCamera", "read_layers"]
