"""The node's WireGuard key pair: made on the node, private half never leaves it.

The private key lives in ``<key_dir>/private.key`` (mode 0600, directory 0700, written
atomically) and in memory inside :class:`PrivateKey`, whose ``repr``/``str`` show only the
public key and which refuses to be pickled, so it cannot slip into a log line, an
exception or an API object by accident. Only the public key is published.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os
import stat
from pathlib import Path
from typing import Final, NoReturn

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

log = logging.getLogger(__name__)

KEY_LEN: Final = 32
PRIVATE_FILE: Final = "private.key"
PUBLIC_FILE: Final = "public.key"


class KeyFileError(ValueError):
    """A key file or key text is unusable."""


def _clamp(raw: bytes) -> bytes:
    """Curve25519 clamping, as ``wg genkey`` does, so the stored key is canonical."""
    b = bytearray(raw)
    b[0] &= 248
    b[31] = (b[31] & 127) | 64
    return bytes(b)


class PrivateKey:
    """A Curve25519 private key that does not print itself."""

    __slots__ = ("_public", "_raw")

    def __init__(self, raw: bytes) -> None:
        if len(raw) != KEY_LEN:
            raise KeyFileError(f"a WireGuard key has {KEY_LEN} bytes, not {len(raw)}")
        self._raw = raw
        pub = X25519PrivateKey.from_private_bytes(raw).public_key()
        self._public = base64.b64encode(pub.public_bytes(Encoding.Raw, PublicFormat.Raw)).decode()

    @classmethod
    def generate(cls) -> PrivateKey:
        return cls(_clamp(os.urandom(KEY_LEN)))

    @classmethod
    def from_base64(cls, text: str) -> PrivateKey:
        try:
            raw = base64.b64decode(text.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise KeyFileError("private key is not base64") from None
        return cls(raw)

    @property
    def public_key(self) -> str:
        """The base64 public key (safe to publish)."""
        return self._public

    def reveal_base64(self) -> str:
        """The secret, for the key file and netlink only."""
        return base64.b64encode(self._raw).decode()

    def reveal_hex(self) -> str:
        """The secret, for the UAPI socket only."""
        return self._raw.hex()

    def __repr__(self) -> str:
        return f"PrivateKey(public_key={self._public!r})"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PrivateKey) and hmac.compare_digest(self._raw, other._raw)

    def __hash__(self) -> int:
        return hash(self._public)

    def __reduce__(self) -> NoReturn:
        raise TypeError("a PrivateKey is never serialised")


def public_key_of_hex(hex_private: str) -> str:
    """Public key (base64) of a hex private key, e.g. from a UAPI ``get``; keeps nothing."""
    return PrivateKey(bytes.fromhex(hex_private)).public_key


class KeyStore:
    """The key directory on the node's host path."""

    def __init__(self, key_dir: Path | str) -> None:
        self.dir = Path(key_dir)

    @property
    def private_path(self) -> Path:
        return self.dir / PRIVATE_FILE

    @property
    def public_path(self) -> Path:
        return self.dir / PUBLIC_FILE

    def load_or_create(self) -> PrivateKey:
        """The stored key, or a new one written first. Tightens loose file modes."""
        self._ensure_dir()
        if self.private_path.exists():
            return self._load()
        key = PrivateKey.generate()
        self._write(key)
        log.info("generated WireGuard key pair, public key %s", key.public_key)
        return key

    def rotate(self) -> PrivateKey:
        """A new key pair replaces the old one on disk (atomically)."""
        self._ensure_dir()
        key = PrivateKey.generate()
        self._write(key)
        log.info("rotated WireGuard key pair, new public key %s", key.public_key)
        return key

    def _ensure_dir(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        mode = stat.S_IMODE(self.dir.stat().st_mode)
        if mode & 0o077:
            os.chmod(self.dir, mode & 0o700)

    def _load(self) -> PrivateKey:
        path = self.private_path
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("%s was readable by others (mode %o): setting 0600", path, mode)
            os.chmod(path, 0o600)
        key = PrivateKey.from_base64(path.read_text())
        if not self.public_path.exists() or self.public_path.read_text().strip() != key.public_key:
            self._write_public(key)
        return key

    def _write(self, key: PrivateKey) -> None:
        tmp = self.dir / f".{PRIVATE_FILE}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (key.reveal_base64() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.private_path)
        self._write_public(key)

    def _write_public(self, key: PrivateKey) -> None:
        tmp = self.dir / f".{PUBLIC_FILE}.{os.getpid()}.tmp"
        tmp.write_text(key.public_key + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, self.public_path)
