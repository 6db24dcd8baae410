"""Proof of GPU: identity consistency plus a nonce-seeded memory and compute challenge.

Names and UUIDs are self-reported and prove nothing, so the operator sets a fresh
``spec.verificationNonce`` and the agent answers it:

1. Identity: UUIDs and PCI ids well-formed and unique, memory total and compute
   capability as the catalogue says for that product name, the GPU count as the node
   claims, and the same UUID/PCI/memory per index as the last published status (a GPU
   swapped under the same offer is flagged).
2. Memory: the claimed VRAM (less a small reserve for the driver) is filled with a pattern
   derived from the nonce and the GPU's UUID, all chunks held at once, then recomputed and
   compared; the digest of the read-back goes into the message.
3. Compute: bf16 matrix multiplications for a fixed time budget; the throughput must fall
   inside the product's range (a too-high figure is as suspect as a too-low one).

Steps 2 and 3 need CuPy or PyTorch (optional; ``pip install cupy-cuda12x`` or ``torch``)
and run in a child process per GPU, so the agent never holds a CUDA context (GPU memory a
renter could use). Without either library the result is IdentityOnly. The fake NVML
scripts Passed or Failed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, Protocol

from gpumesh.api.gpunode import VerificationStatus
from gpumesh.node_agent.clock import Clock
from gpumesh.node_agent.nvml.types import MIB, DeviceIdentity, NvmlBackend

log = logging.getLogger(__name__)

UUID_RE: Final = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
MEMORY_TOLERANCE: Final = 0.02
VRAM_RESERVE_MIB: Final = 1536
"""Left to the driver, CUDA context and one comparison chunk."""
CHUNK_MIB: Final = 256
MATMUL_N: Final = 8192
MATMUL_BUDGET_S: Final = 2.0


@dataclass(frozen=True)
class Sku:
    """What a product should look like: NVML memory total, compute capability, and the
    dense bf16 (fp32-accumulate) matmul throughput a healthy card reaches, in TFLOP/s."""

    fragment: str
    memory_mib: int
    compute_capability: str
    tflops: tuple[float, float]


# First match wins, so specific names come before general ones. Ranges run from about a
# third of the datasheet peak (a hot or shared card still passes) to 10 % above it.
SKUS: Final[tuple[Sku, ...]] = (
    Sku("H200", 143771, "9.0", (330.0, 1090.0)),
    Sku("H100 PCIe", 81559, "9.0", (250.0, 830.0)),
    Sku("H100 NVL", 95830, "9.0", (280.0, 920.0)),
    Sku("H100", 81559, "9.0", (330.0, 1090.0)),
    Sku("A100-SXM4-80GB", 81920, "8.0", (100.0, 345.0)),
    Sku("A100 80GB PCIe", 81920, "8.0", (100.0, 345.0)),
    Sku("A100", 40960, "8.0", (100.0, 345.0)),
    Sku("L40S", 46068, "8.9", (120.0, 400.0)),
    Sku("RTX 4090", 24564, "8.9", (55.0, 182.0)),
    Sku("RTX 3090", 24576, "8.6", (24.0, 79.0)),
)


def sku_for(model: str) -> Sku | None:
    return next((s for s in SKUS if s.fragment in model), None)


@dataclass(frozen=True)
class PriorGpu:
    uuid: str
    pci_bus_id: str | None
    memory_mib: int


@dataclass(frozen=True)
class Claim:
    """What the node was offered or last reported as."""

    count: int | None = None
    """GPUs the Node advertises (``nvidia.com/gpu`` capacity)."""
    previous: Mapping[int, PriorGpu] = field(default_factory=dict)
    """The last published status, by index."""


def identity_problems(identities: Sequence[DeviceIdentity], claim: Claim) -> list[str]:
    """Everything about the GPUs' identity that does not add up (empty when consistent)."""
    problems: list[str] = []
    if claim.count is not None and claim.count != len(identities):
        problems.append(f"node offers {claim.count} GPUs but {len(identities)} answer")
    uuids = [i.uuid for i in identities]
    pcis = [i.pci_bus_id for i in identities if i.pci_bus_id]
    if len(set(uuids)) != len(uuids):
        problems.append("two GPUs report the same UUID")
    if len(set(pcis)) != len(pcis):
        problems.append("two GPUs report the same PCI bus id")
    for ident in identities:
        where = f"GPU {ident.index}"
        if not UUID_RE.match(ident.uuid):
            problems.append(f"{where}: malformed UUID {ident.uuid!r}")
        sku = sku_for(ident.name)
        if sku is not None:
            if abs(ident.memory_total_mib - sku.memory_mib) > sku.memory_mib * MEMORY_TOLERANCE:
                problems.append(
                    f"{where}: {ident.name} has {sku.memory_mib} MiB, "
                    f"not the {ident.memory_total_mib} MiB reported"
                )
            if ident.compute_capability and ident.compute_capability != sku.compute_capability:
                problems.append(
                    f"{where}: {ident.name} is compute {sku.compute_capability}, "
                    f"not {ident.compute_capability}"
                )
        prior = claim.previous.get(ident.index)
        if prior is not None:
            if prior.uuid != ident.uuid:
                problems.append(f"{where}: UUID changed from {prior.uuid} to {ident.uuid}")
            elif prior.pci_bus_id and ident.pci_bus_id and prior.pci_bus_id != ident.pci_bus_id:
                problems.append(f"{where}: moved from PCI {prior.pci_bus_id} to {ident.pci_bus_id}")
            if prior.memory_mib != ident.memory_total_mib:
                problems.append(
                    f"{where}: memory changed from {prior.memory_mib} "
                    f"to {ident.memory_total_mib} MiB"
                )
    return problems


# --- the challenge -------------------------------------------------------------------------


@dataclass(frozen=True)
class ChallengeResult:
    """One GPU's answer."""

    vram_verified_mib: int
    vram_ok: bool
    tflops: float | None
    digest: str
    detail: str = ""


class ChallengeEngine(Protocol):
    """Runs the memory and compute challenge on one GPU."""

    name: str

    def run(self, nonce: str, identity: DeviceIdentity) -> ChallengeResult: ...


def pattern_seed(nonce: str, uuid: str) -> int:
    """The 63-bit seed of a GPU's memory pattern: the verifier can recompute it."""
    return int.from_bytes(hashlib.sha256(f"{nonce}/{uuid}".encode()).digest()[:8], "little") >> 1


M64: Final = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """The pattern word at position ``x - seed``, in plain Python (the CPU spot check)."""
    x &= M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


class TorchEngine:
    """The challenge on PyTorch (int64 arithmetic wraps like uint64 on CUDA)."""

    name = "torch"

    def __init__(self, torch: Any) -> None:
        self.torch = torch

    def _pattern(self, seed: int, start: int, n: int, device: Any) -> Any:
        t = self.torch
        x = t.arange(start, start + n, dtype=t.int64, device=device) + seed

        def shr(v: Any, k: int) -> Any:  # logical shift on int64
            return (v >> k) & ((1 << (64 - k)) - 1)

        x = (x ^ shr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
        x = (x ^ shr(x, 27)) * _signed(0x94D049BB133111EB)
        return x ^ shr(x, 31)

    def run(self, nonce: str, identity: DeviceIdentity) -> ChallengeResult:
        t = self.torch
        device = t.device(f"cuda:{identity.index}")
        seed = pattern_seed(nonce, identity.uuid)
        free, _total = t.cuda.mem_get_info(device)
        target = min(free // MIB, identity.memory_total_mib) - VRAM_RESERVE_MIB
        words = CHUNK_MIB * MIB // 8
        chunks: list[Any] = []
        try:
            while (len(chunks) + 1) * CHUNK_MIB <= target:
                chunks.append(self._pattern(seed, len(chunks) * words, words, device))
        except t.cuda.OutOfMemoryError:
            pass
        digest = hashlib.sha256(nonce.encode())
        ok = True
        for i, chunk in enumerate(chunks):
            if not bool(t.equal(chunk, self._pattern(seed, i * words, words, device))):
                ok = False
                break
            digest.update(int(chunk.sum().item()).to_bytes(8, "little", signed=True))
        if ok and chunks:  # the GPU's arithmetic agrees with the CPU's
            probe = len(chunks) // 2
            ok = _signed(splitmix64(seed + probe * words + 7)) == int(chunks[probe][7].item())
        verified = len(chunks) * CHUNK_MIB if ok else 0
        del chunks
        t.cuda.empty_cache()
        gen = t.Generator(device=device).manual_seed(seed)
        a = t.randn(MATMUL_N, MATMUL_N, device=device, dtype=t.bfloat16, generator=gen)
        b = t.randn(MATMUL_N, MATMUL_N, device=device, dtype=t.bfloat16, generator=gen)
        c = a @ b
        t.cuda.synchronize(device)
        runs, started = 0, time.perf_counter()
        while time.perf_counter() - started < MATMUL_BUDGET_S:
            for _ in range(10):
                c = a @ b
            t.cuda.synchronize(device)
            runs += 10
        elapsed = time.perf_counter() - started
        del a, b, c
        t.cuda.empty_cache()
        return ChallengeResult(
            vram_verified_mib=verified,
            vram_ok=ok,
            tflops=2 * MATMUL_N**3 * runs / elapsed / 1e12,
            digest=digest.hexdigest()[:16],
        )


class CupyEngine:
    """The challenge on CuPy (native uint64)."""

    name = "cupy"

    def __init__(self, cp: Any) -> None:
        self.cp = cp

    def _pattern(self, seed: int, start: int, n: int) -> Any:
        cp = self.cp
        x = cp.arange(start, start + n, dtype=cp.uint64) + cp.uint64(seed)
        x = (x ^ (x >> cp.uint64(30))) * cp.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> cp.uint64(27))) * cp.uint64(0x94D049BB133111EB)
        return x ^ (x >> cp.uint64(31))

    def run(self, nonce: str, identity: DeviceIdentity) -> ChallengeResult:
        cp = self.cp
        seed = pattern_seed(nonce, identity.uuid)
        with cp.cuda.Device(identity.index):
            free, _total = cp.cuda.runtime.memGetInfo()
            target = min(free // MIB, identity.memory_total_mib) - VRAM_RESERVE_MIB
            words = CHUNK_MIB * MIB // 8
            chunks: list[Any] = []
            try:
                while (len(chunks) + 1) * CHUNK_MIB <= target:
                    chunks.append(self._pattern(seed, len(chunks) * words, words))
            except cp.cuda.memory.OutOfMemoryError:
                pass
            digest = hashlib.sha256(nonce.encode())
            ok = True
            for i, chunk in enumerate(chunks):
                if not bool(cp.array_equal(chunk, self._pattern(seed, i * words, words))):
                    ok = False
                    break
                digest.update(int(chunk.sum()).to_bytes(8, "little"))
            if ok and chunks:
                probe = len(chunks) // 2
                ok = splitmix64(seed + probe * words + 7) == int(chunks[probe][7])
            verified = len(chunks) * CHUNK_MIB if ok else 0
            del chunks
            cp.get_default_memory_pool().free_all_blocks()
            rng = cp.random.default_rng(seed)
            a = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=cp.float32).astype(cp.float16)
            b = rng.standard_normal((MATMUL_N, MATMUL_N), dtype=cp.float32).astype(cp.float16)
            c = a @ b
            cp.cuda.Device().synchronize()
            runs, started = 0, time.perf_counter()
            while time.perf_counter() - started < MATMUL_BUDGET_S:
                for _ in range(10):
                    c = a @ b
                cp.cuda.Device().synchronize()
                runs += 10
            elapsed = time.perf_counter() - started
            del a, b, c
            cp.get_default_memory_pool().free_all_blocks()
        return ChallengeResult(
            vram_verified_mib=verified,
            vram_ok=ok,
            tflops=2 * MATMUL_N**3 * runs / elapsed / 1e12,
            digest=digest.hexdigest()[:16],
        )


class ScriptedEngine:
    """The fake NVML's engine: answers as scripted, with plausible figures."""

    name = "scripted"

    def __init__(self, outcome: Callable[[], str]) -> None:
        self._outcome = outcome

    def run(self, nonce: str, identity: DeviceIdentity) -> ChallengeResult:
        sku = sku_for(identity.name)
        tflops = sum(sku.tflops) / 2 if sku else 100.0
        usable = identity.memory_total_mib - VRAM_RESERVE_MIB
        digest = hashlib.sha256(f"{nonce}/{identity.uuid}".encode()).hexdigest()[:16]
        if self._outcome() == "fail":
            return ChallengeResult(
                vram_verified_mib=usable // 3,
                vram_ok=False,
                tflops=tflops / 10,
                digest=digest,
                detail="read-back differs after a third of the memory (scripted failure)",
            )
        return ChallengeResult(usable, True, tflops, digest)


ENGINES: Final[dict[str, Callable[[Any], ChallengeEngine]]] = {
    "cupy": CupyEngine,
    "torch": TorchEngine,
}
"""The compute libraries the challenge runs on, in order of preference."""
CHALLENGE_TIMEOUT_S: Final = 600.0
"""One GPU's challenge in its child process: fill ~140 GiB, compare, 2 s of matmuls."""


class ChallengeUnavailableError(RuntimeError):
    """No candidate library imports and sees a CUDA device."""


def _sees_a_gpu(module: str, lib: Any) -> bool:
    if module == "cupy":
        return bool(lib.cuda.runtime.getDeviceCount() > 0)
    return bool(lib.cuda.is_available())


def challenge_here(
    candidates: Sequence[str], nonce: str, identity: DeviceIdentity
) -> tuple[str, ChallengeResult]:
    """The challenge in this process, on the first candidate library that imports and sees
    a CUDA device: (that library, the result)."""
    reasons: list[str] = []
    for module in candidates:
        try:
            lib = importlib.import_module(module)
            usable = _sees_a_gpu(module, lib)
        except Exception as err:
            reasons.append(f"{module}: {err}")
            continue
        if not usable:
            reasons.append(f"{module}: no CUDA device")
            continue
        return module, ENGINES[module](lib).run(nonce, identity)
    raise ChallengeUnavailableError("; ".join(reasons) or "no compute library")


class ChildProcessEngine:
    """The challenge in a child process, one per GPU.

    CUDA's libraries, its context and the memory the challenge fills then belong to the
    child and are gone when it exits. Run in the agent itself, they would stay: a CUDA
    context holds GPU memory renters could use for as long as its process lives, and
    loading CuPy took the agent from 100 to 278 MiB RSS on an H100.
    """

    def __init__(self, candidates: Sequence[str]) -> None:
        self.candidates = tuple(candidates)
        self.name = self.candidates[0]

    def run(self, nonce: str, identity: DeviceIdentity) -> ChallengeResult:
        request = {
            "candidates": list(self.candidates),
            "nonce": nonce,
            "identity": dataclasses.asdict(identity),
        }
        done = subprocess.run(
            # -P: the working directory does not shadow installed modules in the child.
            [sys.executable, "-P", "-m", "gpumesh.node_agent.verify"],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            errors="replace",
            timeout=CHALLENGE_TIMEOUT_S,
            check=False,
            # CUDA numbers GPUs fastest first unless told otherwise; NVML, whose index
            # the identity carries, numbers them by PCI bus.
            env={**os.environ, "CUDA_DEVICE_ORDER": "PCI_BUS_ID"},
        )
        lines = done.stdout.strip().splitlines()
        try:
            answer = json.loads(lines[-1]) if done.returncode == 0 and lines else None
        except json.JSONDecodeError:
            answer = None
        if not isinstance(answer, dict):
            raise RuntimeError(
                f"the challenge process exited {done.returncode} without an answer: "
                f"{(done.stderr.strip() or done.stdout.strip())[-500:]}"
            )
        if "error" in answer:
            raise ChallengeUnavailableError(str(answer["error"]))
        self.name = str(answer["engine"])
        return ChallengeResult(**answer["result"])


def select_engine(backend: NvmlBackend) -> ChallengeEngine | None:
    """The scripted engine for the fake NVML; else a child-process engine over the compute
    libraries installed here (CuPy first, then PyTorch), imported only in the child; else
    None (identity only)."""
    outcome = getattr(backend, "verification", None)
    if isinstance(outcome, str):
        return ScriptedEngine(lambda: str(getattr(backend, "verification", "pass")))
    installed = [m for m in ENGINES if importlib.util.find_spec(m) is not None]
    return ChildProcessEngine(installed) if installed else None


def _child_main() -> int:
    """``python -m gpumesh.node_agent.verify``: one challenge, request on stdin (JSON), the
    answer as the last line of stdout."""
    # The answer goes to the original stdout; whatever CUDA or the libraries print goes
    # to stderr, so nothing can trail the answer line.
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    request = json.loads(sys.stdin.read())
    identity = DeviceIdentity(**request["identity"])
    try:
        engine, result = challenge_here(request["candidates"], request["nonce"], identity)
    except ChallengeUnavailableError as err:
        reply: dict[str, Any] = {"error": str(err)}
    else:
        reply = {"engine": engine, "result": dataclasses.asdict(result)}
    with answer:
        answer.write(json.dumps(reply) + "\n")
    return 0


def verify(
    identities: Sequence[DeviceIdentity],
    claim: Claim,
    nonce: str,
    engine: ChallengeEngine | None,
    now: Callable[[], datetime],
) -> VerificationStatus:
    """Run the whole proof; never raises (a broken engine reads as IdentityOnly)."""
    problems = identity_problems(identities, claim)
    if not identities:
        problems.append("no GPU answered")
    if problems:
        return VerificationStatus(
            nonce=nonce, result="Failed", checked_time=now(), message="; ".join(problems)[:1024]
        )
    if engine is None:
        return VerificationStatus(
            nonce=nonce,
            result="IdentityOnly",
            checked_time=now(),
            message="identity consistent; no CuPy or PyTorch for the compute challenge",
        )
    failures: list[str] = []
    total_mib = 0
    rates: list[float] = []
    digests: list[str] = []
    for ident in identities:
        try:
            res = engine.run(nonce, ident)
        except Exception as err:
            if isinstance(err, ChallengeUnavailableError):  # no library here: expected
                log.info("no compute library for the challenge on GPU %d: %s", ident.index, err)
            else:
                log.exception("challenge on GPU %d failed to run", ident.index)
            return VerificationStatus(
                nonce=nonce,
                result="IdentityOnly",
                checked_time=now(),
                message=f"identity consistent; {engine.name} challenge could not run: {err}"[:1024],
            )
        total_mib += res.vram_verified_mib
        digests.append(res.digest)
        wanted_mib = ident.memory_total_mib - VRAM_RESERVE_MIB - CHUNK_MIB
        if not res.vram_ok or res.vram_verified_mib < wanted_mib * (1 - MEMORY_TOLERANCE):
            failures.append(
                f"GPU {ident.index}: {res.vram_verified_mib} of {ident.memory_total_mib} MiB "
                f"proven{': ' + res.detail if res.detail else ''}"
            )
        if res.tflops is not None:
            rates.append(res.tflops)
            sku = sku_for(ident.name)
            if sku is not None and not sku.tflops[0] <= res.tflops <= sku.tflops[1]:
                failures.append(
                    f"GPU {ident.index}: {res.tflops:.0f} TFLOP/s is outside "
                    f"{sku.tflops[0]:.0f}-{sku.tflops[1]:.0f} for {ident.name}"
                )
    passed = not failures
    message = (
        f"{engine.name}: {len(identities)} GPUs, {total_mib} MiB filled and read back, "
        f"digest {hashlib.sha256(''.join(digests).encode()).hexdigest()[:16]}"
        if passed
        else "; ".join(failures)
    )
    return VerificationStatus(
        nonce=nonce,
        result="Passed" if passed else "Failed",
        checked_time=now(),
        message=message[:1024],
        vram_verified_mib=total_mib,
        matmul_tflops=round(min(rates), 1) if rates else None,
    )


class VerificationRunner:
    """Runs one proof at a time on its own thread; the reporter polls for the result."""

    def __init__(self, engine: ChallengeEngine | None, clock: Clock) -> None:
        self.engine = engine
        self._clock = clock
        self._lock = threading.Lock()
        self._running: str | None = None
        self._result: VerificationStatus | None = None
        self.on_done: Callable[[], None] | None = None

    @property
    def busy_with(self) -> str | None:
        with self._lock:
            return self._running

    def result(self) -> VerificationStatus | None:
        with self._lock:
            return self._result

    def request(self, nonce: str, identities: Sequence[DeviceIdentity], claim: Claim) -> bool:
        """Start answering ``nonce`` unless it is answered or being answered."""
        with self._lock:
            if self._running is not None or (self._result and self._result.nonce == nonce):
                return False
            self._running = nonce
        thread = threading.Thread(
            target=self._run, args=(nonce, list(identities), claim), name="verify", daemon=True
        )
        thread.start()
        return True

    def run_now(
        self, nonce: str, identities: Sequence[DeviceIdentity], claim: Claim
    ) -> VerificationStatus:
        """The proof on the calling thread (tests, and the CLI's one-shot use)."""
        result = verify(identities, claim, nonce, self.engine, self._clock.now)
        with self._lock:
            self._result = result
        return result

    def _run(self, nonce: str, identities: list[DeviceIdentity], claim: Claim) -> None:
        try:
            result = verify(identities, claim, nonce, self.engine, self._clock.now)
        except Exception as err:  # a bug here must not leave the nonce "running" forever
            log.exception("verification crashed")
            result = VerificationStatus(
                nonce=nonce, result="Failed", checked_time=self._clock.now(), message=str(err)
            )
        log.info("verification of nonce %s: %s (%s)", nonce, result.result, result.message)
        with self._lock:
            self._running = None
            self._result = result
        if self.on_done is not None:
            self.on_done()


if __name__ == "__main__":
    sys.exit(_child_main())
