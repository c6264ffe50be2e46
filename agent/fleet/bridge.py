"""The `topic` lines of a site mosquitto's bridge to the central broker (README: "Bridging a
site broker to a central one"; the fleet demo and the tests use these very lines).

Everything the site's agents say goes out; only what a controller sends them comes in:
commands, model uploads (manifest and chunks) and the simulator's knobs. The controller's own
retained topics (`{prefix}/rollouts/...`) stay central: a site copy of them would be pushed
back, stale, whenever the bridge reconnects (mosquitto sends its retained messages on connect).
"""

from __future__ import annotations

__all__ = ["bridge_topics"]


def bridge_topics(prefix: str) -> tuple[str, ...]:
    """mosquitto `topic` lines for a site bridge at QoS 1."""
    return (
        f"topic {prefix}/# out 1",
        f"topic {prefix}/+/cameras/+/streams/+/nn/deploy in 1",
        f"topic {prefix}/+/cameras/+/streams/+/nn/delete in 1",
        f"topic {prefix}/groups/# in 1",
        f"topic {prefix}/+/models/+/upload in 1",
        f"topic {prefix}/+/models/+/chunks/+ in 1",
        f"topic {prefix}/+/simulator/# in 1",
    )
