"""Signed commands: what is signed, how a signature travels, and checking it. Pure, no I/O.

A command is signed with Ed25519 over `b"oak-cmd-v1\\n" + topic + b"\\n" + payload` (the exact
topic it is published to, UTF-8, and the exact payload bytes), so a signature made for one
camera's topic does not verify on another's. It travels either as MQTT 5 user properties
(`oak-key-id`, and `oak-signature`: standard base64 of the 64-byte signature) or, where
there are no user properties (MQTT 3.1.1), in an envelope: a MessagePack map with exactly
the keys `signed` (bin: the command's payload), `key_id` (str) and `signature` (bin, 64
bytes). No command is such a map (a deploy needs `nn_config`), so an envelope is never
taken for a command, nor a command for an envelope.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent.errors import BadSignature, InvalidPayload, Unauthorized, echo
from agent.limits import msgpack_problem

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence

__all__ = [
    "ANY_CAMERA",
    "CONTEXT",
    "KEY_ID_PROPERTY",
    "KEY_ID_RE",
    "SIGNATURE_PROPERTY",
    "UNSIGNED",
    "Authenticity",
    "Policy",
    "Signature",
    "TrustedKey",
    "envelope",
    "find_signature",
    "public_key_text",
    "read_public_key",
    "sign",
    "signed_bytes",
    "verify",
]

CONTEXT: Final = b"oak-cmd-v1\n"
KEY_ID_PROPERTY: Final = "oak-key-id"
SIGNATURE_PROPERTY: Final = "oak-signature"
KEY_ID_RE: Final = re.compile(r"[A-Za-z0-9._-]{1,64}")
ANY_CAMERA: Final = "*"
_SIGNATURE_BYTES: Final = 64
_SIGNATURE_B64_CHARS: Final = 88  # base64 of 64 bytes, with its padding
_KEY_BYTES: Final = 32
_KEY_B64_CHARS: Final = 44

# Ed25519 points of small order (1, 2, 4, 8) by their y coordinate: a public key among them
# verifies signatures that no private key made. The same list as libsodium's
# `has_small_order` (which also refuses the non-canonical encodings, as `read_public_key`
# does before it looks here).
_P: Final = 2**255 - 19
_D: Final = -121665 * pow(121666, -1, _P) % _P
_SMALL_ORDER_Y: Final = frozenset(
    {
        0,  # order 4
        1,  # the identity
        _P - 1,  # order 2
        int.from_bytes(
            bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
            "little",
        ),  # order 8
        int.from_bytes(
            bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
            "little",
        ),  # order 8
    }
)


@dataclass(frozen=True, slots=True)
class Authenticity:
    """What the command boundary learnt about who sent a command (for the audit log)."""

    signed: bool
    key_id: str | None = None


UNSIGNED: Final = Authenticity(signed=False)


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """A key from `[[security.keys]]`: who may sign, and for which cameras."""

    id: str
    public_key: Ed25519PublicKey
    cameras: frozenset[str] = frozenset({ANY_CAMERA})

    def allows(self, camera: str) -> bool:
        return ANY_CAMERA in self.cameras or camera in self.cameras


@dataclass(frozen=True, slots=True)
class Signature:
    """A signature as it came with a command, and the command's payload it covers."""

    key_id: str
    signature: bytes  # 64 bytes
    payload: bytes  # the payload inside an envelope; the message's own payload otherwise
    carrier: str  # "user properties" or "envelope", for messages


class _Envelope(msgspec.Struct, forbid_unknown_fields=True):
    # Raw: the keys decide whether it is an envelope at all; the values are checked after
    signed: msgspec.Raw
    key_id: msgspec.Raw
    signature: msgspec.Raw


_envelope_decoder: Final = msgspec.msgpack.Decoder(_Envelope)
_envelope_encoder: Final = msgspec.msgpack.Encoder()
# a three-entry MessagePack map: fixmap, map 16, map 32
_THREE_ENTRY_MAPS: Final = (b"\x83", b"\xde\x00\x03", b"\xdf\x00\x00\x00\x03")


def signed_bytes(topic: str, payload: bytes) -> bytes:
    """What the signature covers."""
    return CONTEXT + topic.encode() + b"\n" + payload


def sign(private_key: Ed25519PrivateKey, topic: str, payload: bytes) -> bytes:
    """The 64-byte signature of a command (for senders and tests)."""
    return private_key.sign(signed_bytes(topic, payload))


def envelope(payload: bytes, key_id: str, signature: bytes) -> bytes:
    """The MQTT 3.1.1 envelope carrying a signed payload."""
    return _envelope_encoder.encode({"signed": payload, "key_id": key_id, "signature": signature})


def public_key_text(key: Ed25519PublicKey) -> str:
    """The raw public key in standard base64, as `[[security.keys]] public_key` takes it."""
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def read_public_key(text: str) -> Ed25519PublicKey:
    """A raw Ed25519 public key from standard base64; ValueError saying what is wrong.

    Refused: not base64, not 32 bytes, not a canonical encoding of a curve point, or a point
    of small order (such a key accepts signatures nobody made with a private key).
    """
    if len(text) != _KEY_B64_CHARS:
        raise ValueError(
            f"is {len(text)} characters; a raw Ed25519 public key is 32 bytes, "
            f"{_KEY_B64_CHARS} characters of standard base64"
        )
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError(f"is not standard base64 ({exc})") from None
    if len(raw) != _KEY_BYTES:  # 44 characters with two padding characters: 31 bytes
        raise ValueError(f"decodes to {len(raw)} bytes; a raw Ed25519 public key is 32 bytes")
    encoded = int.from_bytes(raw, "little")
    y, x_odd = encoded & ((1 << 255) - 1), encoded >> 255
    if y >= _P:
        raise ValueError("is not a canonical Ed25519 point encoding")
    if y in _SMALL_ORDER_Y:
        raise ValueError("is a weak key (a point of small order): generate a real key pair")
    # x² = (y² - 1) / (d·y² + 1) must have a square root (Euler's criterion)
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    if x2 and pow(x2, (_P - 1) // 2, _P) != 1:
        raise ValueError("is not a point on the Ed25519 curve")
    if not x2 and x_odd:
        raise ValueError("is not a canonical Ed25519 point encoding")
    return Ed25519PublicKey.from_public_bytes(raw)


def _from_properties(properties: Sequence[tuple[str, str]]) -> tuple[str, str] | None:
    """The key id and the base64 signature among MQTT 5 user properties; None if neither."""
    found: dict[str, list[str]] = {KEY_ID_PROPERTY: [], SIGNATURE_PROPERTY: []}
    for name, value in properties:
        if name in found:
            found[name].append(value)
    key_ids, signatures = found[KEY_ID_PROPERTY], found[SIGNATURE_PROPERTY]
    if not key_ids and not signatures:
        return None
    for name, values in found.items():
        if len(values) != 1:
            what = "missing" if not values else f"given {len(values)} times"
            raise BadSignature(f"user property {name} is {what}; send it exactly once")
    return key_ids[0], signatures[0]


def _signature_bytes(text: str) -> bytes:
    if len(text) != _SIGNATURE_B64_CHARS:
        raise BadSignature(
            f"user property {SIGNATURE_PROPERTY} is {len(text)} characters; "
            f"a signature is {_SIGNATURE_B64_CHARS} characters of standard base64"
        )
    try:
        signature = base64.b64decode(text, validate=True)
    except binascii.Error:
        signature = b""
    if len(signature) != _SIGNATURE_BYTES:
        raise BadSignature(
            f"user property {SIGNATURE_PROPERTY} is not the standard base64 of 64 bytes"
        )
    return signature


def _from_envelope(payload: bytes) -> Signature | None:
    """The signature in an envelope; None when the payload is not one."""
    if not payload.startswith(_THREE_ENTRY_MAPS) or msgpack_problem(payload) is not None:
        return None  # a payload too deep or too large is the command decoder's to refuse
    try:
        raw = _envelope_decoder.decode(payload)
    except (msgspec.MsgspecError, UnicodeDecodeError, RecursionError):
        return None  # other keys: a command (or junk, for the command decoder to answer)
    try:
        signed = msgspec.msgpack.decode(raw.signed, type=bytes)
        key_id = msgspec.msgpack.decode(raw.key_id, type=str)
        signature = msgspec.msgpack.decode(raw.signature, type=bytes)
    except (msgspec.MsgspecError, UnicodeDecodeError) as exc:
        raise BadSignature(
            "envelope: `signed` and `signature` must be MessagePack bin and `key_id` a string"
        ) from exc
    if len(signature) != _SIGNATURE_BYTES:
        raise BadSignature(f"envelope: `signature` is {len(signature)} bytes; it must be 64")
    return Signature(key_id, signature, signed, "envelope")


def find_signature(payload: bytes, properties: Sequence[tuple[str, str]]) -> Signature | None:
    """The signature a command came with, from its user properties or its envelope; None
    when unsigned. Raises BadSignature for one that is malformed (never anything else)."""
    found = _from_properties(properties)
    if found is not None:
        key_id, text = found
        return Signature(key_id, _signature_bytes(text), payload, "user properties")
    return _from_envelope(payload)


def verify(
    keys: Mapping[str, TrustedKey], topic: str, camera: str | None, signature: Signature
) -> Authenticity:
    """Check a signature for a command to `camera` on `topic`; `camera` None for a message
    that is for no one camera (an upload manifest: its model may run on any of them), which
    only a key with `cameras = ["*"]` may sign.

    Raises Unauthorized for a key id this agent does not trust or a key not allowed for
    `camera`, BadSignature for a signature that does not verify (checked first: a forged
    command learns nothing about which cameras a key may command).
    """
    key = _verified_key(keys, topic, signature)
    if camera is None:
        if ANY_CAMERA not in key.cameras:
            raise Unauthorized(
                f"key {key.id} may command only some cameras; an upload manifest must be "
                'signed by a key with cameras = ["*"]'
            )
    elif not key.allows(camera):
        raise Unauthorized(f"key {key.id} may not command camera {echo(camera)}")
    return Authenticity(signed=True, key_id=key.id)


def _verified_key(keys: Mapping[str, TrustedKey], topic: str, signature: Signature) -> TrustedKey:
    """The trusted key that made `signature` over `topic` and its payload."""
    key = keys.get(signature.key_id)
    if key is None:
        raise Unauthorized(
            f"key id {echo(signature.key_id)} ({signature.carrier}) is not one of this "
            "agent's [[security.keys]]"
        )
    try:
        key.public_key.verify(signature.signature, signed_bytes(topic, signature.payload))
    except InvalidSignature:
        raise BadSignature(
            f"the signature ({signature.carrier}) does not verify with key {key.id} for this "
            "topic and payload"
        ) from None
    return key


@dataclass(frozen=True, slots=True)
class Policy:
    """`[security]` as the command boundary applies it."""

    keys: Mapping[str, TrustedKey] = field(default_factory=dict)
    require_signed: bool = False
    max_command_age: float = 300.0

    def check(
        self, topic: str, camera: str | None, signature: Signature | None, *, what: str = "command"
    ) -> Authenticity:
        """Who sent it: a signature, when there is one, must verify whatever the policy;
        none is Unauthorized when signatures are required. `camera` None: see `verify`."""
        if signature is not None:
            return verify(self.keys, topic, camera, signature)
        if self.require_signed:
            raise Unauthorized(
                f"unsigned {what}: this agent takes only {what}s signed by one of its "
                "[[security.keys]] ([security] require_signed)"
            )
        return UNSIGNED

    def check_group(self, topic: str, signature: Signature | None) -> Authenticity:
        """`check` for a group command, before its cameras are known: the signature (or its
        absence) only; each camera is then checked with `check_camera`."""
        if signature is not None:
            key = _verified_key(self.keys, topic, signature)
            return Authenticity(signed=True, key_id=key.id)
        return self.check(topic, ANY_CAMERA, None)

    def check_camera(self, authenticity: Authenticity, camera: str) -> None:
        """Unauthorized when the key that signed a group command may not command `camera`."""
        key = self.keys.get(authenticity.key_id or "")
        if authenticity.signed and (key is None or not key.allows(camera)):
            raise Unauthorized(f"key {authenticity.key_id} may not command camera {echo(camera)}")

    def check_fresh(self, request_id: str | None, expires_at: float | None, now: float) -> None:
        """A signed command names itself and its end, within `max_command_age`, so that it
        can be kept against replays until it expires; InvalidPayload naming the field."""
        if request_id is None:
            raise InvalidPayload(
                "a signed command needs a request_id (kept against replays until expires_at)",
                path="$.request_id",
            )
        if expires_at is None:
            raise InvalidPayload(
                f"a signed command needs expires_at (unix seconds, at most "
                f"{self.max_command_age:g} s ahead)",
                path="$.expires_at",
            )
        if expires_at > now + self.max_command_age:
            raise InvalidPayload(
                f"expires_at is {expires_at - now:.0f} s ahead; a signed command may be valid "
                f"for at most {self.max_command_age:g} s ([security] max_command_age)",
                path="$.expires_at",
            )

    def check_expiry(self, expires_at: float | None, now: float, *, what: str) -> None:
        """A signed `what` (an upload manifest) names its end, within `max_command_age`;
        InvalidPayload naming `$.expires_at`. (No request_id: a manifest replayed while
        valid only announces the same content-addressed upload again.)"""
        if expires_at is None:
            raise InvalidPayload(
                f"a signed {what} needs expires_at (unix seconds, at most "
                f"{self.max_command_age:g} s ahead)",
                path="$.expires_at",
            )
        if expires_at > now + self.max_command_age:
            raise InvalidPayload(
                f"expires_at is {expires_at - now:.0f} s ahead; a signed {what} may be valid "
                f"for at most {self.max_command_age:g} s ([security] max_command_age)",
                path="$.expires_at",
            )
