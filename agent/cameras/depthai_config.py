"""The `[depthai]` config section: which real cameras to drive and how patiently."""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

__all__ = ["DepthaiSection"]

Seconds = Annotated[float, Meta(gt=0.0, le=3600.0)]
Mxid = Annotated[str, Meta(min_length=1, max_length=64, pattern=r"^[A-Z0-9]+$")]


class DepthaiSection(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    enabled: bool = True
    # mxids to drive; empty drives every camera found
    allow: tuple[Mxid, ...] = ()
    # mxid -> display name
    names: dict[Mxid, str] = {}
    # PoE cameras outside the broadcast domain, probed by address
    poe_addresses: tuple[str, ...] = ()
    # one attempt to open the device with the pipeline
    boot_timeout: Seconds = 30.0
    # after booting, every NN must produce one output within this
    first_output_timeout: Seconds = 20.0
    boot_retries: Annotated[int, Meta(ge=1, le=20)] = 3
    # seconds between discovery scans (each costs a ~0.5 s subprocess)
    discovery_interval: Annotated[float, Meta(ge=1.0, le=3600.0)] = 5.0
