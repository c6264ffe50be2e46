"""The pure parts of signed commands: keys, signatures, envelopes, key files, the record.

The agent end to end (mosquitto, amqtt, the client as a subprocess) is in
tests/test_signed_commands.py.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import time
from typing import TYPE_CHECKING, Any

import msgspec
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import ConfigError, load_config
from agent.errors import AgentError, BadSignature, InvalidPayload, Unauthorized
from agent.keyfiles import key_id_of, read_signing_key, write_key_pair
from agent.messages import Event
from agent.mqtt import user_properties
from agent.requests import Phase, Request, RequestLog
from agent.signing import (
    _SMALL_ORDER_Y,
    KEY_ID_PROPERTY,
    SIGNATURE_PROPERTY,
    Authenticity,
    Policy,
    Signature,
    TrustedKey,
    envelope,
    find_signature,
    public_key_text,
    read_public_key,
    sign,
    signed_bytes,
    verify,
)

if TYPE_CHECKING:
    from pathlib import Path

TOPIC = "oak/a1/cameras/14442C10D13EABCE00/streams/CAM_A/nn/deploy"
OTHER = "oak/a1/cameras/18443010C1E1D31200/streams/CAM_A/nn/deploy"
CAM = "14442C10D13EABCE00"
PRIVATE = Ed25519PrivateKey.generate()
KEYS = {"ops": TrustedKey("ops", PRIVATE.public_key())}


def _props(signature: bytes, key_id: str = "ops") -> list[tuple[str, str]]:
    return [(KEY_ID_PROPERTY, key_id), (SIGNATURE_PROPERTY, base64.b64encode(signature).decode())]


# --- Ed25519 arithmetic, written here to check the agent's small-order list independently ---

_P = 2**255 - 19
_D = -121665 * pow(121666, -1, _P) % _P
Point = tuple[int, int]


def _add(a: Point, b: Point) -> Point:
    (x1, y1), (x2, y2) = a, b
    t = _D * x1 * x2 * y1 * y2
    return (x1 * y2 + x2 * y1) * pow(1 + t, -1, _P) % _P, (y1 * y2 + x1 * x2) * pow(
        1 - t, -1, _P
    ) % _P


def _decode(raw: bytes) -> Point | None:
    n = int.from_bytes(raw, "little")
    y, odd = n & ((1 << 255) - 1), n >> 255
    if y >= _P:
        return None
    x2 = (y * y - 1) * pow(_D * y * y + 1, -1, _P) % _P
    x = pow(x2, (_P + 3) // 8, _P)
    if (x * x - x2) % _P:
        x = x * pow(2, (_P - 1) // 4, _P) % _P
    if (x * x - x2) % _P:
        return None
    if x & 1 != odd:
        x = _P - x
    return x, y


def _encode(point: Point) -> bytes:
    x, y = point
    return (y | (x & 1) << 255).to_bytes(32, "little")


def _torsion() -> list[Point]:
    """The eight points of order dividing 8, from one point of order 8."""
    order8 = _decode(
        bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05")
    )
    assert order8 is not None
    points, point = [], (0, 1)
    for _ in range(8):
        points.append(point)
        point = _add(point, order8)
    assert point == (0, 1), "not of order 8"
    assert len(set(points)) == 8
    return points


def test_the_small_order_list_is_the_eight_torsion_points() -> None:
    assert {y for _, y in _torsion()} == _SMALL_ORDER_Y


def test_every_encoding_of_a_small_order_point_is_refused() -> None:
    encodings = {_encode(p) for p in _torsion()}
    # the other sign bit (x = 0 has no negative: non-canonical) and y + p where it fits
    encodings |= {raw[:31] + bytes([raw[31] ^ 0x80]) for raw in encodings}
    encodings |= {(_P + y).to_bytes(32, "little") for y in (0, 1)}
    for raw in encodings:
        text = base64.b64encode(raw).decode()
        with pytest.raises(ValueError, match=r"weak key|canonical"):
            read_public_key(text)


def test_real_keys_are_read_and_malformed_ones_named() -> None:
    for _ in range(20):
        text = public_key_text(Ed25519PrivateKey.generate().public_key())
        assert public_key_text(read_public_key(text)) == text
    problems = {
        "": "0 characters",
        "A" * 42 + "==": "31 bytes",
        "!" * 44: "not standard base64",
        base64.b64encode(b"\x02" + b"\x00" * 31).decode(): "not a point on the Ed25519 curve",
        base64.b64encode(b"\xff" * 32).decode(): "canonical",
    }
    for text, says in problems.items():
        with pytest.raises(ValueError, match=says):
            read_public_key(text)


@given(
    st.text(max_size=60)
    | st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode())
)
def test_any_text_is_a_key_or_a_value_error(text: str) -> None:
    try:
        key = read_public_key(text)
    except ValueError:
        return
    point = _decode(base64.b64decode(text))
    assert point is not None
    assert _encode(point) == base64.b64decode(text)  # canonical
    eight = point
    for _ in range(3):
        eight = _add(eight, eight)
    assert eight != (0, 1), "small order"
    assert public_key_text(key) == text


# --- signatures ------------------------------------------------------------------------


@given(st.text(max_size=100), st.binary(max_size=300))
def test_a_signature_verifies_for_its_topic_and_payload_only(topic: str, payload: bytes) -> None:
    signature = sign(PRIVATE, topic, payload)
    assert (
        PRIVATE.public_key().verify(signature, b"oak-cmd-v1\n" + topic.encode() + b"\n" + payload)
        is None
    )
    for carried in (
        find_signature(payload, _props(signature)),
        find_signature(envelope(payload, "ops", signature), []),
    ):
        assert carried is not None
        assert carried.payload == payload
        assert verify(KEYS, topic, CAM, carried) == Authenticity(signed=True, key_id="ops")
        for topic2, payload2 in ((topic + "/x", payload), (topic, payload + b"\0")):
            moved = Signature("ops", carried.signature, payload2, carried.carrier)
            with pytest.raises(BadSignature, match="does not verify with key ops"):
                verify(KEYS, topic2, CAM, moved)


def test_another_cameras_topic_or_key_or_camera() -> None:
    payload = b'{"request_id": "r"}'
    good = find_signature(payload, _props(sign(PRIVATE, TOPIC, payload)))
    assert good is not None
    with pytest.raises(BadSignature):
        verify(KEYS, OTHER, "18443010C1E1D31200", good)
    wrong = find_signature(payload, _props(sign(Ed25519PrivateKey.generate(), TOPIC, payload)))
    assert wrong is not None
    with pytest.raises(BadSignature):
        verify(KEYS, TOPIC, CAM, wrong)
    stranger = find_signature(payload, _props(sign(PRIVATE, TOPIC, payload), key_id="who"))
    assert stranger is not None
    with pytest.raises(Unauthorized, match=r"key id 'who' .* is not one of"):
        verify(KEYS, TOPIC, CAM, stranger)
    narrow = {"ops": TrustedKey("ops", PRIVATE.public_key(), frozenset({"18443010C1E1D31200"}))}
    with pytest.raises(Unauthorized, match="may not command camera"):
        verify(narrow, TOPIC, CAM, good)


def test_malformed_properties_are_bad_signatures() -> None:
    signature = base64.b64encode(sign(PRIVATE, TOPIC, b"")).decode()
    cases = {
        (("oak-key-id", "ops"),): "oak-signature is missing",
        (("oak-signature", signature),): "oak-key-id is missing",
        (("oak-key-id", "ops"), ("oak-key-id", "ops"), ("oak-signature", signature)): "2 times",
        (("oak-key-id", "ops"), ("oak-signature", "x" * 100_000)): "100000 characters",
        (("oak-key-id", "ops"), ("oak-signature", "!" * 88)): "not the standard base64",
        (("oak-key-id", "ops"), ("oak-signature", "A" * 86 + "==")): None,  # 64 zero bytes
    }
    for properties, says in cases.items():
        if says is None:
            found = find_signature(b"", properties)
            assert found is not None
            with pytest.raises(BadSignature):
                verify(KEYS, TOPIC, CAM, found)
            continue
        with pytest.raises(BadSignature, match=says):
            find_signature(b"", properties)
    assert find_signature(b"{}", [("other", "x"), ("oak-key", "y")]) is None


def test_an_envelope_is_exactly_three_keys() -> None:
    signature = sign(PRIVATE, TOPIC, b"{}")
    for bad, says in (
        ({"signed": "{}", "key_id": "ops", "signature": signature}, "must be MessagePack bin"),
        ({"signed": b"{}", "key_id": 5, "signature": signature}, "must be MessagePack bin"),
        ({"signed": b"{}", "key_id": "ops", "signature": signature[:63]}, "63 bytes"),
    ):
        with pytest.raises(BadSignature, match=says):
            find_signature(msgspec.msgpack.encode(bad), [])
    others = [
        {"signed": b"{}", "key_id": "ops"},
        {"signed": b"{}", "key_id": "ops", "signature": signature, "nn_config": {}},
        {"signed": b"{}", "key_id": "ops", "sig": signature},
    ]
    for other in others:
        assert find_signature(msgspec.msgpack.encode(other), []) is None
    # JSON is never an envelope
    assert find_signature(b'{"signed": "", "key_id": "ops", "signature": ""}', []) is None


_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=80),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=8,
)
_names = st.sampled_from(["signed", "key_id", "signature", "nn_config", "model", "request_id"])


@given(st.dictionaries(_names | st.text(max_size=8), _values, max_size=5))
def test_any_map_is_an_envelope_a_command_or_a_bad_signature(body: dict[str, Any]) -> None:
    payload = msgspec.msgpack.encode(body)
    try:
        found = find_signature(payload, [])
    except BadSignature:
        assert set(body) == {"signed", "key_id", "signature"}
        return
    if found is None:
        assert set(body) != {"signed", "key_id", "signature"}
        return
    assert set(body) == {"signed", "key_id", "signature"}
    with pytest.raises(AgentError) as caught:
        verify(KEYS, TOPIC, CAM, found)
    assert type(caught.value) in (BadSignature, Unauthorized)


@given(
    st.binary(max_size=400),
    st.lists(
        st.tuples(
            st.sampled_from([KEY_ID_PROPERTY, SIGNATURE_PROPERTY, "x"]) | st.text(max_size=12),
            st.text(max_size=120) | st.sampled_from(["ops", "A" * 88, "A" * 86 + "=="]),
        ),
        max_size=5,
    ),
)
def test_arbitrary_bytes_and_properties_raise_only_our_errors(
    payload: bytes, properties: list[tuple[str, str]]
) -> None:
    try:
        found = find_signature(payload, properties)
        Policy(keys=KEYS, require_signed=True).check(TOPIC, CAM, found)
    except (BadSignature, Unauthorized):
        return
    raise AssertionError("an arbitrary signature verified")


def test_a_deploy_is_never_taken_for_an_envelope() -> None:
    deploy = {"nn_config": {"type": "Generic"}, "model": b"x", "request_id": "r"}
    for extra in ({}, {"signed": b"x"}, {"key_id": "ops", "signature": b"x" * 64}):
        assert find_signature(msgspec.msgpack.encode({**deploy, **extra}), []) is None
    three = {"nn_config": {"type": "Generic"}, "model": b"x", "signature": b"x" * 64}
    assert find_signature(msgspec.msgpack.encode(three), []) is None


def test_signed_bytes() -> None:
    assert signed_bytes("a/b", b"\x00{") == b"oak-cmd-v1\na/b\n\x00{"


def test_policy() -> None:
    now = time.time()
    required = Policy(keys=KEYS, require_signed=True, max_command_age=300)
    with pytest.raises(Unauthorized, match="unsigned command"):
        required.check(TOPIC, CAM, None)
    assert Policy(keys=KEYS).check(TOPIC, CAM, None) == Authenticity(signed=False)
    for request_id, expires_at, path in (
        (None, now + 10, "$.request_id"),
        ("r", None, "$.expires_at"),
        ("r", now + 301, "$.expires_at"),
    ):
        with pytest.raises(InvalidPayload) as caught:
            required.check_fresh(request_id, expires_at, now)
        assert caught.value.path == path
    required.check_fresh("r", now + 299, now)


# --- config --------------------------------------------------------------------------------


def _config(tmp_path: Path, security: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[agent]\nid = "a"\nstate_dir = "state"\n{security}')
    return path


def test_security_config(tmp_path: Path) -> None:
    key = public_key_text(PRIVATE.public_key())
    good = _config(
        tmp_path,
        f'[security]\nrequire_signed = true\n[[security.keys]]\nid = "ops"\npublic_key = "{key}"\n'
        '[[security.keys]]\nid = "line-3.cam"\npublic_key = "'
        + key
        + '"\ncameras = ["14442C10D13EABCE00"]\n',
    )
    security = load_config(good).security
    keys = security.trusted_keys()
    assert keys["ops"].allows("ANY")
    assert not keys["line-3.cam"].allows("ANY")
    assert keys["line-3.cam"].allows("14442C10D13EABCE00")
    assert (security.max_command_age, security.max_signed_requests) == (300.0, 4096)
    weak = base64.b64encode(b"\x01" + b"\x00" * 31).decode()
    bad = {
        f'[[security.keys]]\nid = "ops"\npublic_key = "{weak}"\n': "security.keys[ops].public_key is a weak key",
        '[[security.keys]]\nid = "ops"\npublic_key = "abc"\n': "security.keys[ops].public_key is 3 characters",
        f'[[security.keys]]\nid = "ops"\npublic_key = "{key}"\n' * 2: "duplicate key id",
        '[[security.keys]]\nid = "o/ps"\npublic_key = "x"\n': "$.security.keys[0].id",
        f'[[security.keys]]\nid = "ops"\npublic_key = "{key}"\ncameras = []\n': "$.security.keys[0].cameras",
        f'[[security.keys]]\nid = "ops"\npublic_key = "{key}"\ncameras = ["cam 1"]\n': "cameras[0]",
        "[security]\nrequire_signed = true\n": "needs at least one [[security.keys]]",
        "[security]\nmax_command_age = 0\n": "$.security.max_command_age",
        "[security]\nrequire_sign = true\n": "require_sign",
    }
    for text, says in bad.items():
        with pytest.raises(ConfigError) as caught:
            load_config(_config(tmp_path, text))
        assert says in str(caught.value), (says, str(caught.value))


# --- key files -------------------------------------------------------------------------------


def test_keygen_files(tmp_path: Path) -> None:
    old = os.umask(0)  # umask-independent: the private key is 0600 all the same
    try:
        pair = write_key_pair(tmp_path / "keys", "ops")
    finally:
        os.umask(old)
    assert (pair.private.stat().st_mode & 0o777, pair.public.stat().st_mode & 0o777) == (
        0o600,
        0o644,
    )
    assert pair.private.name == "ops.key"
    assert key_id_of(pair.private) == "ops"
    key = read_signing_key(pair.private)
    public = read_public_key(pair.public.read_text().strip())
    public.verify(sign(key, TOPIC, b"x"), signed_bytes(TOPIC, b"x"))
    with pytest.raises(FileExistsError):
        write_key_pair(tmp_path / "keys", "ops")
    with pytest.raises(ValueError, match="key id"):
        write_key_pair(tmp_path / "keys", "a b")
    ec_key = tmp_path / "ec.key"
    ec_key.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    for path, says in ((ec_key, "not an Ed25519"), (pair.public, "not an unencrypted PEM")):
        with pytest.raises(ValueError, match=says):
            read_signing_key(path)
    with pytest.raises(ValueError, match="give --key-id"):
        key_id_of(tmp_path / "my key.pem")


# --- the record of signed requests -------------------------------------------------------


def _done(request_id: str, keep_until: float | None = None) -> Request:
    event = Event(request_id, "delete", CAM, "CAM_A", "succeeded", 0.0)
    return Request(
        request_id, "delete", CAM, "CAM_A", events=[event], phase=Phase.DONE, keep_until=keep_until
    )


def test_signed_requests_outlive_the_last_256_until_they_expire() -> None:
    log = RequestLog(signed_limit=3)
    now = time.time()
    log.add(_done("signed", now + 100))
    log.add(_done("past", now - 1))
    for i in range(300):
        log.add(_done(f"r{i}"))
    assert log.get("signed", CAM) is not None
    assert log.get("past", CAM) is None
    assert log.get("r0", CAM) is None
    assert log.get("r299", CAM) is not None
    assert next(r.id for r in log) == "signed"  # oldest first, for the state file
    assert log.signed_room(now) is None
    log.add(_done("s2", now + 50))
    log.add(_done("s3", now + 200))
    wait = log.signed_room(now)
    assert wait is not None
    assert 49 < wait <= 50
    log.expire(now + 101)
    assert log.get("signed", CAM) is None


def test_user_properties_from_what_paho_hands_over() -> None:
    properties = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    assert user_properties(None) == ()
    assert user_properties(properties) == ()
    properties.UserProperty = [("a", "1"), ("a", "2"), ("oak-key-id", "\ufeff")]
    assert user_properties(properties) == (("a", "1"), ("a", "2"), ("oak-key-id", "\ufeff"))
    odd: Any = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    object.__setattr__(odd, "UserProperty", [("a", "1"), ("b",), ("c", b"2"), "d", (1, "x")])
    assert user_properties(odd) == (("a", "1"),)
    object.__setattr__(odd, "UserProperty", "not a list")
    assert user_properties(odd) == ()


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
def test_an_openssl_key_and_its_public_key_as_the_readme_says(tmp_path: Path) -> None:
    key = tmp_path / "op.key"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(key)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    printed = subprocess.run(
        ["bash", "-c", f"openssl pkey -in {key} -pubout -outform DER | tail -c 32 | base64"],
        check=True,
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout.strip()
    assert printed == public_key_text(read_signing_key(key).public_key())
    read_public_key(printed)
