"""Signing key files for senders: `oak-agent keygen` writes them, `--sign-key` reads them.

The private key is PKCS#8 PEM (what `openssl genpkey -algorithm ed25519` writes too), created
0600 whatever the umask; the public key is one line of standard base64, the raw 32 bytes
`[[security.keys]] public_key` takes. Files are named after the key id (`ID.key`, `ID.pub`),
so `--sign-key DIR/ID.key` knows its id without `--key-id`.
"""

from __future__ import annotations

import contextlib
import os
from typing import TYPE_CHECKING, Final

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.signing import KEY_ID_RE, public_key_text

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["KeyPair", "config_snippet", "key_id_of", "read_signing_key", "write_key_pair"]

_PRIVATE: Final = 0o600
_PUBLIC: Final = 0o644
_FOLDER: Final = 0o700
_MAX_KEY_FILE: Final = 64 * 1024


class KeyPair:
    """Where `write_key_pair` put a new key pair, and its public key as configured."""

    def __init__(self, key_id: str, private: Path, public: Path, public_key: str) -> None:
        self.key_id = key_id
        self.private = private
        self.public = public
        self.public_key = public_key


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with exactly `mode` (umask-independent); never replace one."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.fchmod(fd, mode)  # the umask narrowed the mode given to open
        with os.fdopen(fd, "wb", closefd=False) as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            path.unlink()
        raise
    os.close(fd)


def write_key_pair(folder: Path, key_id: str) -> KeyPair:
    """A new Ed25519 key pair in `folder` as `KEY_ID.key` (0600) and `KEY_ID.pub`.

    Raises ValueError for a bad key id, FileExistsError when either file exists (an
    existing key is never overwritten), OSError when the folder cannot be written.
    """
    if not KEY_ID_RE.fullmatch(key_id):
        raise ValueError(f"key id {key_id!r} must be 1-64 characters of [A-Za-z0-9._-]")
    folder.mkdir(mode=_FOLDER, parents=True, exist_ok=True)
    private, public = folder / f"{key_id}.key", folder / f"{key_id}.pub"
    for path in (private, public):
        if path.exists() or path.is_symlink():
            raise FileExistsError(f"{path} exists; keygen never overwrites a key")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    text = public_key_text(key.public_key())
    _create(private, pem, _PRIVATE)
    _create(public, f"{text}\n".encode(), _PUBLIC)
    return KeyPair(key_id, private, public, text)


def read_signing_key(path: Path) -> Ed25519PrivateKey:
    """The Ed25519 private key in a PEM file; ValueError (or OSError) saying what is wrong."""
    with path.open("rb") as f:
        data = f.read(_MAX_KEY_FILE + 1)
    if len(data) > _MAX_KEY_FILE:
        raise ValueError(f"{path} is not a key file (over {_MAX_KEY_FILE} bytes)")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: encrypted with a passphrase
        raise ValueError(
            f"{path} is not an unencrypted PEM private key ({exc}); make one with "
            "`oak-agent keygen` or `openssl genpkey -algorithm ed25519`"
        ) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(  # noqa: TRY004  # one error type for every unusable key file
            f"{path} holds a {type(key).__name__}, not an Ed25519 private key"
        )
    return key


def key_id_of(path: Path) -> str:
    """The key id a key file is named after (`ID.key`); ValueError when it is not one."""
    if not KEY_ID_RE.fullmatch(path.stem):
        raise ValueError(f"{path.name} does not name a key id ([A-Za-z0-9._-]); give --key-id")
    return path.stem


def config_snippet(pair: KeyPair) -> str:
    """The lines to add to the agent's config to trust `pair`."""
    return (
        "[security]\n"
        "require_signed = true\n"
        "\n"
        "[[security.keys]]\n"
        f'id = "{pair.key_id}"\n'
        f'public_key = "{pair.public_key}"\n'
        'cameras = ["*"]\n'
    )
