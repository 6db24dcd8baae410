"""Keys: made on the node, stored 0600, never printed, and the same public key as ``wg``."""

from __future__ import annotations

import logging
import os
import pickle
import stat
import subprocess
from pathlib import Path

import pytest

from gpumesh.api.mesh import valid_public_key
from gpumesh.node_agent.wg.keys import KeyFileError, KeyStore, PrivateKey, public_key_of_hex


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_key_is_created_0600_in_a_0700_dir_and_reloaded(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "wg")
    key = store.load_or_create()
    assert mode(store.private_path) == 0o600
    assert mode(store.dir) == 0o700
    assert store.public_path.read_text().strip() == key.public_key
    assert valid_public_key(key.public_key)
    assert KeyStore(tmp_path / "wg").load_or_create() == key


def test_loose_modes_are_tightened(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store = KeyStore(tmp_path / "wg")
    store.load_or_create()
    os.chmod(store.private_path, 0o644)
    os.chmod(store.dir, 0o755)
    with caplog.at_level(logging.WARNING):
        store.load_or_create()
    assert mode(store.private_path) == 0o600 and mode(store.dir) == 0o700
    assert "readable by others" in caplog.text


def test_rotation_replaces_the_pair(tmp_path: Path) -> None:
    store = KeyStore(tmp_path)
    old = store.load_or_create()
    new = store.rotate()
    assert new != old and store.load_or_create() == new
    assert store.public_path.read_text().strip() == new.public_key
    assert not list(tmp_path.glob(".*.tmp"))


def test_private_key_never_shows_itself(caplog: pytest.LogCaptureFixture) -> None:
    key = PrivateKey.generate()
    secret_b64, secret_hex = key.reveal_base64(), key.reveal_hex()
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("test").info("key %s %r %s", key, key, [key])
    text = f"{key} {key!r} {[key]} {caplog.text}"
    assert secret_b64 not in text and secret_hex not in text
    assert key.public_key in repr(key)
    with pytest.raises(TypeError, match="never serialised"):
        pickle.dumps(key)


def test_keys_are_clamped_and_parsed_strictly() -> None:
    raw = bytes.fromhex(PrivateKey.generate().reveal_hex())
    assert raw[0] & 7 == 0 and raw[31] & 0x80 == 0 and raw[31] & 0x40
    with pytest.raises(KeyFileError, match="32 bytes"):
        PrivateKey(b"short")
    with pytest.raises(KeyFileError, match="base64"):
        PrivateKey.from_base64("not base64!!")
    key = PrivateKey.generate()
    assert public_key_of_hex(key.reveal_hex()) == key.public_key


def test_public_key_matches_wg_pubkey() -> None:
    key = PrivateKey.generate()
    out = subprocess.run(
        ["wg", "pubkey"], input=key.reveal_base64(), capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == key.public_key
