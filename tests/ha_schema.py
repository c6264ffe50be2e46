"""The keys Home Assistant accepts in a device-based MQTT discovery config, as msgspec Structs.

Written from HA core 2025.4.4 (homeassistant/components/mqtt: schemas.py, sensor.py,
binary_sensor.py, button.py, abbreviations.py), both each key's full name and its
abbreviation, plus `default_entity_id` (HA 2025.10 and later; 2025.4.4 drops it
silently, as it does any key it does not know inside a component). Unknown keys are errors:
at the top level and in `dev` and `o` HA itself rejects the whole config for one.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

__all__ = ["COMPONENT_ID", "Component", "DeviceConfig", "check_component", "decode_config"]

COMPONENT_ID = re.compile(r"^[A-Za-z0-9_-]+$")
NODE = re.compile(r"^[a-zA-Z0-9_-]+$")  # discovery.py TOPIC_MATCHER
Topic = Annotated[str, Meta(min_length=1, pattern=r"^[^+#]+$")]
EntityCategory = Literal["config", "diagnostic"]
StateClass = Literal["measurement", "total", "total_increasing"]


class Availability(msgspec.Struct, forbid_unknown_fields=True):
    t: Topic | None = None
    topic: Topic | None = None
    pl_avail: str | None = None
    payload_available: str | None = None
    pl_not_avail: str | None = None
    payload_not_available: str | None = None
    val_tpl: str | None = None
    value_template: str | None = None


class Device(msgspec.Struct, forbid_unknown_fields=True):
    ids: str | list[str] | None = None
    identifiers: str | list[str] | None = None
    cns: list[list[str]] | None = None
    connections: list[list[str]] | None = None
    name: str | None = None
    mf: str | None = None
    manufacturer: str | None = None
    mdl: str | None = None
    model: str | None = None
    mdl_id: str | None = None
    model_id: str | None = None
    hw: str | None = None
    hw_version: str | None = None
    sw: str | None = None
    sw_version: str | None = None
    sa: str | None = None
    suggested_area: str | None = None
    sn: str | None = None
    serial_number: str | None = None
    cu: str | None = None
    configuration_url: str | None = None
    via_device: str | None = None


class Origin(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    sw: str | None = None
    sw_version: str | None = None
    url: str | None = None
    support_url: str | None = None


class _Entity(msgspec.Struct, forbid_unknown_fields=True, tag_field="p"):
    """MQTT_ENTITY_COMMON_SCHEMA and the availability options, every platform has them."""

    avty: list[Availability] | None = None
    availability: list[Availability] | None = None
    avty_mode: Literal["all", "any", "latest"] | None = None
    availability_mode: Literal["all", "any", "latest"] | None = None
    avty_t: Topic | None = None
    availability_topic: Topic | None = None
    avty_tpl: str | None = None
    availability_template: str | None = None
    pl_avail: str | None = None
    payload_available: str | None = None
    pl_not_avail: str | None = None
    payload_not_available: str | None = None
    dev: Device | None = None
    device: Device | None = None
    o: Origin | None = None
    origin: Origin | None = None
    ent_pic: str | None = None
    entity_picture: str | None = None
    en: bool | None = None
    enabled_by_default: bool | None = None
    ent_cat: EntityCategory | None = None
    entity_category: EntityCategory | None = None
    ic: str | None = None
    icon: str | None = None
    json_attr_t: Topic | None = None
    json_attributes_topic: Topic | None = None
    json_attr_tpl: str | None = None
    json_attributes_template: str | None = None
    obj_id: str | None = None
    object_id: str | None = None
    default_entity_id: str | None = None  # HA 2025.10+
    uniq_id: str | None = None
    unique_id: str | None = None
    name: str | None = None
    qos: Literal[0, 1, 2] | None = None
    e: str | None = None
    encoding: str | None = None
    dev_cla: str | None = None
    device_class: str | None = None
    # the topic base: "~" at either end of a *_topic value stands for it
    base: str | None = msgspec.field(name="~", default=None)


class _ReadOnly(_Entity):
    stat_t: Topic | None = None
    state_topic: Topic | None = None
    val_tpl: str | None = None
    value_template: str | None = None
    exp_aft: int | None = None
    expire_after: int | None = None
    frc_upd: bool | None = None
    force_update: bool | None = None


class Sensor(_ReadOnly, tag="sensor"):
    lrst_val_tpl: str | None = None
    last_reset_value_template: str | None = None
    ops: list[str] | None = None
    options: list[str] | None = None
    sug_dsp_prc: int | None = None
    suggested_display_precision: int | None = None
    stat_cla: StateClass | None = None
    state_class: StateClass | None = None
    unit_of_meas: str | None = None
    unit_of_measurement: str | None = None


class BinarySensor(_ReadOnly, tag="binary_sensor"):
    off_dly: int | None = None
    off_delay: int | None = None
    pl_on: str | None = None
    payload_on: str | None = None
    pl_off: str | None = None
    payload_off: str | None = None


class Button(_Entity, tag="button"):
    cmd_t: Topic | None = None
    command_topic: Topic | None = None
    cmd_tpl: str | None = None
    command_template: str | None = None
    pl_prs: str | None = None
    payload_press: str | None = None
    ret: bool | None = None
    retain: bool | None = None


Component = Sensor | BinarySensor | Button


class Removal(msgspec.Struct, forbid_unknown_fields=True):
    """A component with only its platform: HA removes the entity it made of it."""

    p: Literal["sensor", "binary_sensor", "button"]


class DeviceConfig(msgspec.Struct, forbid_unknown_fields=True):
    """schemas.py DEVICE_DISCOVERY_SCHEMA (no extra keys allowed)."""

    dev: Device | None = None
    device: Device | None = None
    o: Origin | None = None
    origin: Origin | None = None
    cmps: dict[str, msgspec.Raw] | None = None
    components: dict[str, msgspec.Raw] | None = None
    avty: list[Availability] | None = None
    availability: list[Availability] | None = None
    avty_mode: Literal["all", "any", "latest"] | None = None
    availability_mode: Literal["all", "any", "latest"] | None = None
    avty_t: Topic | None = None
    availability_topic: Topic | None = None
    avty_tpl: str | None = None
    availability_template: str | None = None
    pl_avail: str | None = None
    payload_available: str | None = None
    pl_not_avail: str | None = None
    payload_not_available: str | None = None
    stat_t: Topic | None = None
    state_topic: Topic | None = None
    cmd_t: Topic | None = None
    command_topic: Topic | None = None
    qos: Literal[0, 1, 2] | None = None
    e: str | None = None
    encoding: str | None = None


_component = msgspec.json.Decoder(Component)
_removal = msgspec.json.Decoder(Removal)
_plain = msgspec.json.Decoder(dict[str, Any])


def check_component(config: Component) -> None:
    """The cross-field rules HA checks after the schema (sensor.py and schemas.py)."""
    assert config.uniq_id or config.unique_id, "device-based discovery needs a unique_id"
    if isinstance(config, Sensor | BinarySensor):
        assert config.stat_t or config.state_topic, "state_topic is required"
    if isinstance(config, Button):
        assert config.cmd_t or config.command_topic, "command_topic is required"
    if isinstance(config, Sensor):
        options = config.ops or config.options
        device_class = config.dev_cla or config.device_class
        if options is not None:
            assert options, "an empty options list is not allowed"
            assert config.stat_cla is None, "options with a state_class"
            assert config.state_class is None, "options with a state_class"
            assert config.unit_of_meas is None, "options with a unit"
            assert config.unit_of_measurement is None, "options with a unit"
            assert device_class == "enum", "options need device_class enum"
    default = config.default_entity_id
    if default is not None:
        platform = type(config).__struct_config__.tag
        assert default.startswith(f"{platform}."), "default_entity_id is platform.object_id"


def decode_config(payload: bytes) -> tuple[DeviceConfig, dict[str, Component | Removal]]:
    """Decode a device config and each of its components; raise on anything HA refuses."""
    config = msgspec.json.decode(payload, type=DeviceConfig)
    device, origin = config.dev or config.device, config.o or config.origin
    assert device is not None, "dev is required"
    assert origin is not None, "o is required"
    assert device.ids or device.identifiers or device.cns or device.connections
    cmps = config.cmps if config.cmps is not None else config.components
    assert cmps is not None, "cmps is required"
    decoded: dict[str, Component | Removal] = {}
    for key, raw in cmps.items():
        assert COMPONENT_ID.fullmatch(key), f"component id {key!r}"
        if set(_plain.decode(raw)) == {"p"}:
            decoded[key] = _removal.decode(raw)
            continue
        component = _component.decode(raw)
        check_component(component)
        decoded[key] = component
    return config, decoded
