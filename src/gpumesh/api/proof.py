"""Proof of GPU: the arithmetic the agent performs and the operator checks.

The operator issues a seed. For each GPU the agent multiplies two matrices derived from
that seed, the node and the GPU's UUID (entries in -2..2, so every partial sum is an
integer below 2**24 and fp32 or TF32 arithmetic is exact on any GPU, in any order), and
commits to the product with a Merkle root over 64-byte leaves. Only after the operator has
seen the roots does it name random entries; the agent opens their leaves, and the operator
recomputes each named entry itself (one dot product of length ``inner``).

Array code takes an array module ``xp``: NumPy on the CPU (the operator, the tests, the
dev fleet's fake engine) and CuPy on a GPU run the same lines.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np

from gpumesh.api.gpunode import Challenge, Opening, Sample

LEAF_ENTRIES: Final = 16
"""Entries per Merkle leaf: 16 big-endian int32, one SHA-256 block."""
HASH_BYTES: Final = 32
VALUE_SPAN: Final = 5
"""Matrix entries are in ``-2..2``."""
MAX_INNER: Final = (1 << 24) // 4 - 1
"""Keeps every sum of products (each at most 4) exact in fp32's 24-bit mantissa."""


@dataclass(frozen=True)
class Shape:
    """One GPU's product: (rows x inner) times (inner x cols)."""

    rows: int
    inner: int
    cols: int

    def __post_init__(self) -> None:
        leaves = self.rows * self.cols // LEAF_ENTRIES
        if self.rows < 1 or self.cols < LEAF_ENTRIES or self.cols % LEAF_ENTRIES:
            raise ValueError(f"cols must be a multiple of {LEAF_ENTRIES}, got {self.cols}")
        if leaves & (leaves - 1):
            raise ValueError(f"rows x cols / {LEAF_ENTRIES} must be a power of two")
        if not 1 <= self.inner <= MAX_INNER:
            raise ValueError(f"inner must be in 1..{MAX_INNER}, got {self.inner}")

    @property
    def leaves(self) -> int:
        return self.rows * self.cols // LEAF_ENTRIES

    @property
    def depth(self) -> int:
        return self.leaves.bit_length() - 1

    @property
    def flops(self) -> int:
        return 2 * self.rows * self.inner * self.cols


@dataclass(frozen=True)
class Keys:
    """The two 64-bit keys of one GPU's matrices."""

    a: int
    b: int

    @classmethod
    def of(cls, seed: str, node: str, uuid: str) -> Keys:
        """Bound to the challenge, the node and the GPU: no answer serves another."""
        digest = hashlib.sha256(f"{seed}/{node}/{uuid}".encode()).digest()
        return cls(int.from_bytes(digest[:8], "big"), int.from_bytes(digest[8:16], "big"))


def _splitmix(xp: Any, x: Any) -> Any:
    x = (x ^ (x >> xp.uint64(30))) * xp.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> xp.uint64(27))) * xp.uint64(0x94D049BB133111EB)
    return x ^ (x >> xp.uint64(31))


def entries(xp: Any, key: int, index: Any) -> Any:
    """The matrix entries at flat positions ``index`` (uint64 array), as int8 in -2..2."""
    x = _splitmix(xp, index.astype(xp.uint64) + xp.uint64(key))
    return ((x >> xp.uint64(32)) % xp.uint64(VALUE_SPAN)).astype(xp.int8) - xp.int8(2)


def matrix_a(xp: Any, keys: Keys, shape: Shape, row0: int, row1: int) -> Any:
    """Rows ``row0:row1`` of A, as float32."""
    rows = xp.arange(row0, row1, dtype=xp.uint64)[:, None] * xp.uint64(shape.inner)
    return entries(xp, keys.a, rows + xp.arange(shape.inner, dtype=xp.uint64)[None, :]).astype(
        xp.float32
    )


def matrix_b(xp: Any, keys: Keys, shape: Shape) -> Any:
    """All of B, as float32."""
    rows = xp.arange(shape.inner, dtype=xp.uint64)[:, None] * xp.uint64(shape.cols)
    return entries(xp, keys.b, rows + xp.arange(shape.cols, dtype=xp.uint64)[None, :]).astype(
        xp.float32
    )


def product(xp: Any, keys: Keys, shape: Shape, block_rows: int | None = None) -> Any:
    """C = A B as int32, computed ``block_rows`` rows of A at a time."""
    b = matrix_b(xp, keys, shape)
    step = block_rows or shape.rows
    out = xp.empty((shape.rows, shape.cols), dtype=xp.int32)
    for row0 in range(0, shape.rows, step):
        row1 = min(row0 + step, shape.rows)
        out[row0:row1] = xp.rint(matrix_a(xp, keys, shape, row0, row1) @ b).astype(xp.int32)
    return out


def entry(keys: Keys, shape: Shape, row: int, col: int) -> int:
    """One entry of C, exactly, on the CPU: what the operator recomputes."""
    a = entries(np, keys.a, np.arange(shape.inner, dtype=np.uint64) + np.uint64(row * shape.inner))
    at = np.arange(shape.inner, dtype=np.uint64) * np.uint64(shape.cols) + np.uint64(col)
    b = entries(np, keys.b, at)
    return int(np.dot(a.astype(np.int64), b.astype(np.int64)))


# --- SHA-256 over many 64-byte messages at once ----------------------------------------------

_K: Final = (
    0x428A2F98, 0x71374491, 0xB5C0FBCF, 0xE9B5DBA5, 0x3956C25B, 0x59F111F1, 0x923F82A4,
    0xAB1C5ED5, 0xD807AA98, 0x12835B01, 0x243185BE, 0x550C7DC3, 0x72BE5D74, 0x80DEB1FE,
    0x9BDC06A7, 0xC19BF174, 0xE49B69C1, 0xEFBE4786, 0x0FC19DC6, 0x240CA1CC, 0x2DE92C6F,
    0x4A7484AA, 0x5CB0A9DC, 0x76F988DA, 0x983E5152, 0xA831C66D, 0xB00327C8, 0xBF597FC7,
    0xC6E00BF3, 0xD5A79147, 0x06CA6351, 0x14292967, 0x27B70A85, 0x2E1B2138, 0x4D2C6DFC,
    0x53380D13, 0x650A7354, 0x766A0ABB, 0x81C2C92E, 0x92722C85, 0xA2BFE8A1, 0xA81A664B,
    0xC24B8B70, 0xC76C51A3, 0xD192E819, 0xD6990624, 0xF40E3585, 0x106AA070, 0x19A4C116,
    0x1E376C08, 0x2748774C, 0x34B0BCB5, 0x391C0CB3, 0x4ED8AA4A, 0x5B9CCA4F, 0x682E6FF3,
    0x748F82EE, 0x78A5636F, 0x84C87814, 0x8CC70208, 0x90BEFFFA, 0xA4506CEB, 0xBEF9A3F7,
    0xC67178F2,
)  # fmt: skip
_H0: Final = (
    0x6A09E667, 0xBB67AE85, 0x3C6EF372, 0xA54FF53A,
    0x510E527F, 0x9B05688C, 0x1F83D9AB, 0x5BE0CD19,
)  # fmt: skip
_PAD_64: Final = (0x80000000, *([0] * 14), 512)
"""The second block of every 64-byte message: the end marker and the length in bits."""


def _rotr(xp: Any, x: Any, n: int) -> Any:
    return (x >> xp.uint32(n)) | (x << xp.uint32(32 - n))


def _compress(xp: Any, state: list[Any], block: list[Any]) -> list[Any]:
    w = list(block)
    for t in range(16, 64):
        s0 = _rotr(xp, w[t - 15], 7) ^ _rotr(xp, w[t - 15], 18) ^ (w[t - 15] >> xp.uint32(3))
        s1 = _rotr(xp, w[t - 2], 17) ^ _rotr(xp, w[t - 2], 19) ^ (w[t - 2] >> xp.uint32(10))
        w.append(w[t - 16] + s0 + w[t - 7] + s1)
    a, b, c, d, e, f, g, h = state
    for t in range(64):
        s1 = _rotr(xp, e, 6) ^ _rotr(xp, e, 11) ^ _rotr(xp, e, 25)
        t1 = h + s1 + ((e & f) ^ (~e & g)) + xp.uint32(_K[t]) + w[t]
        s0 = _rotr(xp, a, 2) ^ _rotr(xp, a, 13) ^ _rotr(xp, a, 22)
        t2 = s0 + ((a & b) ^ (a & c) ^ (b & c))
        a, b, c, d, e, f, g, h = t1 + t2, a, b, c, d + t1, e, f, g
    return [s + v for s, v in zip(state, (a, b, c, d, e, f, g, h), strict=True)]


def sha256_64(xp: Any, words: Any) -> Any:
    """SHA-256 of each row of ``words`` (n x 16 uint32, a 64-byte big-endian message):
    n x 8 uint32, the digests' big-endian words. Equals :func:`hashlib.sha256` row by row."""
    n = words.shape[0]
    state = [xp.full(n, h, dtype=xp.uint32) for h in _H0]
    state = _compress(xp, state, [words[:, i] for i in range(16)])
    state = _compress(xp, state, [xp.full(n, p, dtype=xp.uint32) for p in _PAD_64])
    return xp.stack(state, axis=1)


# --- the Merkle tree -------------------------------------------------------------------------


def leaf_words(xp: Any, product_: Any) -> Any:
    """The leaves of a product: 16 consecutive entries (row-major) each, as SHA-256 words
    (big-endian int32 bytes are the int32 bit patterns read as uint32)."""
    return product_.reshape(-1, LEAF_ENTRIES).view(xp.uint32)


def tree(xp: Any, product_: Any, chunk: int = 1 << 20) -> list[Any]:
    """Every level of the Merkle tree over ``product_``, leaf digests first, root last
    (each level n x 8 uint32). Hashes ``chunk`` messages at a time to bound memory."""
    level = _hash_rows(xp, leaf_words(xp, product_), chunk)
    levels = [level]
    while level.shape[0] > 1:
        pairs = level.reshape(-1, 16)  # left digest then right digest: one 64-byte block
        level = _hash_rows(xp, pairs, chunk)
        levels.append(level)
    return levels


def _hash_rows(xp: Any, words: Any, chunk: int) -> Any:
    if words.shape[0] <= chunk:
        return sha256_64(xp, words)
    return xp.concatenate(
        [sha256_64(xp, words[i : i + chunk]) for i in range(0, words.shape[0], chunk)]
    )


def digest_hex(words: Any) -> str:
    """A digest (8 uint32 words, on any device) as hex."""
    return struct.pack(">8I", *(int(w) for w in words)).hex()


def leaf_index(shape: Shape, row: int, col: int) -> int:
    return (row * shape.cols + col) // LEAF_ENTRIES


@dataclass(frozen=True)
class LeafOpening:
    """A leaf of one product and the sibling digests from it up to the root."""

    leaf: tuple[int, ...]
    path: bytes
    """``depth`` digests of 32 bytes, the leaf's sibling first."""

    @property
    def path_b64(self) -> str:
        return base64.b64encode(self.path).decode()


def open_leaf(
    levels: Sequence[Any], product_: Any, shape: Shape, row: int, col: int
) -> LeafOpening:
    """The opening of the leaf holding entry (row, col)."""
    index = leaf_index(shape, row, col)
    flat = product_.reshape(-1)
    leaf = tuple(int(v) for v in flat[index * LEAF_ENTRIES : (index + 1) * LEAF_ENTRIES])
    path = b"".join(
        struct.pack(">8I", *(int(w) for w in levels[depth][(index >> depth) ^ 1]))
        for depth in range(len(levels) - 1)
    )
    return LeafOpening(leaf, path)


def root_of_opening(shape: Shape, row: int, col: int, leaf: Sequence[int], path: bytes) -> str:
    """The root an opening leads to (hex); raises ValueError for a malformed opening."""
    if len(leaf) != LEAF_ENTRIES:
        raise ValueError(f"a leaf has {LEAF_ENTRIES} entries, not {len(leaf)}")
    if len(path) != shape.depth * HASH_BYTES:
        raise ValueError(f"the path must hold {shape.depth} digests, not {len(path) / 32:g}")
    try:
        digest = hashlib.sha256(struct.pack(f">{LEAF_ENTRIES}i", *leaf)).digest()
    except struct.error as err:
        raise ValueError(f"a leaf entry is not an int32: {err}") from None
    index = leaf_index(shape, row, col)
    for depth in range(shape.depth):
        sibling = path[depth * HASH_BYTES : (depth + 1) * HASH_BYTES]
        pair = sibling + digest if (index >> depth) & 1 else digest + sibling
        digest = hashlib.sha256(pair).digest()
    return digest.hex()


def check_opening(
    keys: Keys, shape: Shape, root: str, row: int, col: int, leaf: Sequence[int], path: bytes
) -> str | None:
    """Why an opened entry is not the product's (None when it is): the opening must lead to
    the committed root and the entry must equal A[row] . B[:, col], recomputed here."""
    if not (0 <= row < shape.rows and 0 <= col < shape.cols):
        return f"entry ({row}, {col}) is outside the {shape.rows} x {shape.cols} product"
    try:
        reached = root_of_opening(shape, row, col, leaf, path)
    except ValueError as err:
        return str(err)
    if reached != root:
        return f"the opening of entry ({row}, {col}) does not lead to the committed root"
    got, want = leaf[(row * shape.cols + col) % LEAF_ENTRIES], entry(keys, shape, row, col)
    if got != want:
        return f"entry ({row}, {col}) is {got}, not {want}"
    return None


def decode_path(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise ValueError("the path is not base64") from None


def draw_samples(
    challenge: Challenge, per_gpu: int, randbelow: Callable[[int], int]
) -> list[Sample]:
    """``per_gpu`` uniform entries of each GPU's product (drawn after the roots are in)."""
    return [
        Sample(gpu=i, row=randbelow(g.rows), col=randbelow(g.cols))
        for i, g in enumerate(challenge.gpus)
        for _ in range(per_gpu)
    ]


def opening_problem(challenge: Challenge, node: str, root: str, opening: Opening) -> str | None:
    """Why an opened entry is not right for its GPU of ``challenge`` on ``node``, naming the
    GPU (None when it is)."""
    gpu = challenge.gpus[opening.gpu]
    try:
        problem = check_opening(
            Keys.of(challenge.seed, node, gpu.uuid),
            Shape(gpu.rows, gpu.inner, gpu.cols),
            root,
            opening.row,
            opening.col,
            opening.leaf,
            decode_path(opening.path),
        )
    except ValueError as err:
        problem = str(err)
    return None if problem is None else f"GPU {gpu.uuid}: {problem}"


def gpus_fingerprint(gpus: Sequence[tuple[str, str, int]]) -> str:
    """What a verdict is about: the (uuid, model, memory MiB) of each GPU, in any order."""
    text = "\n".join(f"{u}|{m}|{mem}" for u, m, mem in sorted(gpus))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
