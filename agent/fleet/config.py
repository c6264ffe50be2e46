"""controller.toml: the broker connection (the agent's `[mqtt]` keys) and nothing else yet."""

from __future__ import annotations

from pathlib import Path

import msgspec

from agent.config import ConfigError, MqttSection, with_located_files

__all__ = ["ControllerConfig", "load_controller_config"]


class ControllerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    # the same keys as the agent's [mqtt]: host, port, prefix, protocol, TLS, credentials
    mqtt: MqttSection = MqttSection()


def load_controller_config(path: Path) -> ControllerConfig:
    """Read and validate controller.toml; unknown keys are errors that name the key."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    try:
        config = msgspec.toml.decode(raw, type=ControllerConfig)
    except msgspec.ValidationError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    mqtt = config.mqtt
    if mqtt.password is not None and mqtt.password_file is not None:
        raise ConfigError("mqtt: set password or password_file, not both")
    return ControllerConfig(mqtt=with_located_files(mqtt, Path(path).parent))
