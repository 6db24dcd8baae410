"""wireguard-go's UAPI protocol: message building and parsing (pure), and a small client.

The protocol (https://www.wireguard.com/xplatform/) is lines of ``key=value`` over the
Unix socket ``/var/run/wireguard/<interface>.sock``: ``get=1`` answers the device and its
peers; ``set=1`` applies the lines that follow, in order, up to an empty line. Keys are
hex there, base64 everywhere else.

Why not the PyPI ``wireguard-tools`` package: its set always sends ``replace_peers=true``
(dropping every session), fails on peers with no endpoint and on IPv6 endpoints, and
leaves partial state on error. Here a set names only the peers that change.

The ``get`` answer carries the device's private key: the parser turns it into the public
key at once and keeps nothing else of it, and no message is ever logged.
"""

from __future__ import annotations

import base64
import binascii
import errno as errno_codes
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from gpumesh.node_agent.wg.diff import ObservedDevice, ObservedPeer, PeerChanges, PeerUpdate
from gpumesh.node_agent.wg.keys import PrivateKey, public_key_of_hex

RUN_DIR: Final = Path("/var/run/wireguard")
GET: Final = b"get=1\n\n"


class UapiError(RuntimeError):
    """The device refused a request or could not be reached. Never holds the message."""

    def __init__(self, interface: str, what: str, errno: int | None = None) -> None:
        super().__init__(f"{interface}: {what}" + (f" (errno {errno})" if errno else ""))
        self.errno = errno


def b64_to_hex(key: str) -> str:
    return binascii.a2b_base64(key).hex()


def hex_to_b64(key: str) -> str:
    return base64.b64encode(bytes.fromhex(key)).decode()


_UNSAFE: Final = re.compile("[\n\r=\0]")
"""Characters that would end a UAPI line early or start a new key."""


def _safe(value: str, what: str) -> str:
    """A value that cannot break out of its line (the catalogue is validated too)."""
    if not value or _UNSAFE.search(value):
        raise ValueError(f"{what} {value!r} cannot go into a UAPI line")
    return value


def _safe_all(values: Sequence[str], what: str) -> None:
    """:func:`_safe` for many values in one C-level scan (a relay's peer has thousands)."""
    if _UNSAFE.search("".join(values)) or not all(values):
        for value in values:
            _safe(value, what)


def _peer_lines(update: PeerUpdate, lines: list[str]) -> None:
    lines.append("public_key=" + b64_to_hex(update.public_key))
    if update.endpoint is not None:
        lines.append("endpoint=" + _safe(update.endpoint, "endpoint"))
    if update.keepalive_s is not None:
        lines.append(f"persistent_keepalive_interval={int(update.keepalive_s)}")
    if update.allowed_ips is not None:
        lines.append("replace_allowed_ips=true")
        if update.allowed_ips:
            _safe_all(update.allowed_ips, "allowed IP")
            lines.append("allowed_ip=" + "\nallowed_ip=".join(update.allowed_ips))


def build_set(
    changes: PeerChanges,
    private_key: PrivateKey | None = None,
    *,
    replace_peers: bool = False,
) -> bytes:
    """The ``set=1`` request for ``changes`` (``private_key`` when it is to be installed).

    One buffer, sent with one ``sendall``: wireguard-go reads the request through a
    buffered scanner, so splitting it into writes only adds system calls.
    ``replace_peers`` exists only so the benchmark can measure the baseline that drops
    every session; the agent never sets it.
    """
    lines = ["set=1"]
    if changes.set_private_key:
        if private_key is None:
            raise ValueError("changes install the private key but none was given")
        lines.append(f"private_key={private_key.reveal_hex()}")
    if changes.listen_port is not None:
        lines.append(f"listen_port={int(changes.listen_port)}")
    if replace_peers:
        lines.append("replace_peers=true")
    for key in changes.removals:
        lines += [f"public_key={b64_to_hex(key)}", "remove=true"]
    # Peers that turn persistent keepalive on go last: wireguard-go (Debian's 0.0.20220316,
    # measured) handles every peer after the first such one about three times slower, so
    # 1,000 new peers take ~300 ms with one keepalive peer first and ~90 ms with it last.
    for update in sorted(changes.updates, key=_keepalive_last):
        _peer_lines(update, lines)
    lines.append("\n")
    return "\n".join(lines).encode()


def _keepalive_last(update: PeerUpdate) -> bool:
    return bool(update.keepalive_s)


@dataclass
class _PeerBuilder:
    public_key: str
    endpoint: str | None = None
    allowed_ips: list[str] = field(default_factory=list)
    keepalive_s: int = 0
    handshake_sec: int = 0
    handshake_nsec: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0

    def build(self) -> ObservedPeer:
        handshake = self.handshake_sec + self.handshake_nsec / 1e9 if self.handshake_sec else None
        return ObservedPeer(
            public_key=self.public_key,
            endpoint=self.endpoint,
            allowed_ips=tuple(sorted(self.allowed_ips)),
            keepalive_s=self.keepalive_s,
            last_handshake=handshake,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
        )


def parse_errno(text: str) -> int:
    for line in reversed(text.splitlines()):
        if line.startswith("errno="):
            return int(line[6:])
    raise ValueError("UAPI answer has no errno line")


def parse_get(text: str) -> ObservedDevice:
    """The device in a ``get=1`` answer. Raises ValueError on a malformed answer."""
    public_key: str | None = None
    listen_port: int | None = None
    peers: dict[str, ObservedPeer] = {}
    peer: _PeerBuilder | None = None
    for line in text.split("\n"):
        if not line:
            continue
        key, sep, value = line.partition("=")
        if not sep:
            raise ValueError(f"UAPI line without '=': {key[:20]!r}")
        if key == "errno":
            if int(value) != 0:
                raise ValueError(f"get failed with errno {value}")
        elif key == "public_key":
            if peer is not None:
                peers[peer.public_key] = peer.build()
            peer = _PeerBuilder(hex_to_b64(value))
        elif peer is None:
            if key == "private_key":
                public_key = public_key_of_hex(value)
            elif key == "listen_port":
                listen_port = int(value)
        elif key == "endpoint":
            peer.endpoint = value
        elif key == "allowed_ip":
            peer.allowed_ips.append(value)
        elif key == "persistent_keepalive_interval":
            peer.keepalive_s = int(value)
        elif key == "last_handshake_time_sec":
            peer.handshake_sec = int(value)
        elif key == "last_handshake_time_nsec":
            peer.handshake_nsec = int(value)
        elif key == "rx_bytes":
            peer.rx_bytes = int(value)
        elif key == "tx_bytes":
            peer.tx_bytes = int(value)
    if peer is not None:
        peers[peer.public_key] = peer.build()
    return ObservedDevice(public_key=public_key, listen_port=listen_port, peers=peers)


class UapiClient:
    """Requests to one wireguard-go interface's UAPI socket (one connection each)."""

    def __init__(self, interface: str, *, run_dir: Path = RUN_DIR, timeout_s: float = 5.0) -> None:
        self.interface = interface
        self.path = run_dir / f"{interface}.sock"
        self.timeout_s = timeout_s

    def exists(self) -> bool:
        return self.path.is_socket()

    def _exchange(self, request: bytes) -> str:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout_s)
        try:
            try:
                sock.connect(str(self.path))
                sock.sendall(request)
                return _read_answer(sock)
            except OSError as err:
                what = errno_codes.errorcode.get(err.errno or 0, type(err).__name__)
                raise UapiError(self.interface, f"UAPI socket {self.path}: {what}") from None
        finally:
            sock.close()

    def get(self) -> ObservedDevice:
        answer = self._exchange(GET)
        try:
            return parse_get(answer)
        except ValueError as err:
            raise UapiError(self.interface, f"unreadable get answer: {err}") from None

    def set(self, request: bytes) -> None:
        """Send a ``set=1`` request (from :func:`build_set`); raises UapiError on refusal."""
        answer = self._exchange(request)
        try:
            code = parse_errno(answer)
        except ValueError:
            raise UapiError(self.interface, "set answer has no errno") from None
        if code != 0:
            raise UapiError(self.interface, "set refused", code)

    def apply(self, changes: PeerChanges, private_key: PrivateKey | None = None) -> None:
        if changes:
            self.set(build_set(changes, private_key))


def _read_answer(sock: socket.socket) -> str:
    """Read up to the empty line that ends every answer.

    Only the end of what arrived is checked (an answer holds no other empty line), so a
    large ``get`` is not copied and rescanned chunk by chunk.
    """
    chunks: list[bytes] = []
    last = b""
    while True:
        chunk = sock.recv(1 << 18)
        if not chunk:
            break
        chunks.append(chunk)
        last = (last + chunk)[-2:] if len(chunk) < 2 else chunk[-2:]
        if last == b"\n\n":
            break
    return b"".join(chunks).decode()


def lines_of(request: bytes) -> Iterable[str]:
    """The lines of a request with secrets masked: for tests and debugging only."""
    for line in request.decode().split("\n"):
        yield "private_key=(hidden)" if line.startswith("private_key=") else line
