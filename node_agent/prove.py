"""The agent's side of proof of GPU: compute each GPU's product, commit to it, open what
the operator names (the arithmetic is in :mod:`gpumesh.api.proof`).

The agent grades nothing: it publishes roots and openings in ``status.proof`` and the
operator judges them. On a real node the products run on CuPy (``pip install
'gpumesh[gpu]'``) in a child process that lives from the commitment to the openings, so
the agent never holds a CUDA context (GPU memory renters could use) and the child's
memory is gone when it exits. The fake NVML's nodes compute the same products with NumPy,
at the small sizes the dev operator asks for.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Protocol

from gpumesh.api.gpunode import Challenge, Opening, Proof, Sample
from gpumesh.api.proof import Keys, Shape, digest_hex, open_leaf, product, tree
from gpumesh.clock import Clock

log = logging.getLogger(__name__)

BLOCK_ROWS: Final = 4096
"""Rows of A multiplied at once (bounds the temporary float32 product)."""
CHILD_TIMEOUT_S: Final = 900.0
"""The longest one request to the child may take (an 80 GiB product and its hashes take
seconds): past it the child is killed and the step fails."""
OPEN_WAIT_S: Final = 120.0
"""How long the products are kept for the operator to name entries: after that the child
(and the GPU memory it holds) goes, and a late request computes them again."""

Tamper = Callable[[Any, Any], Any]
"""What a cheating prover does to a product (array module, product) before committing."""


class Prover(Protocol):
    """Holds one challenge's products from the commitment until they are opened."""

    name: str

    def commit(self, challenge: Challenge, node: str, devices: Mapping[str, int]) -> list[str]:
        """The Merkle root of each GPU's product, in challenge order."""
        ...

    def open(self, samples: Sequence[Sample]) -> list[Opening]: ...

    def close(self) -> None: ...


class ArrayProver:
    """Products on an array module in this process: NumPy, or CuPy in the child."""

    def __init__(self, xp: Any, name: str, tamper: Tamper | None = None) -> None:
        self.xp = xp
        self.name = name
        self.tamper = tamper
        self._held: list[tuple[Shape, Any, list[Any]]] = []

    def _device(self, index: int) -> Any:
        cuda = getattr(self.xp, "cuda", None)
        return cuda.Device(index) if cuda is not None else _NoDevice()

    def commit(self, challenge: Challenge, node: str, devices: Mapping[str, int]) -> list[str]:
        self.close()
        roots = []
        for gpu in challenge.gpus:
            shape = Shape(gpu.rows, gpu.inner, gpu.cols)
            with self._device(devices.get(gpu.uuid, 0)):
                c = product(self.xp, Keys.of(challenge.seed, node, gpu.uuid), shape, BLOCK_ROWS)
                if self.tamper is not None:
                    c = self.tamper(self.xp, c)
                levels = tree(self.xp, c)
            self._held.append((shape, c, levels))
            roots.append(digest_hex(levels[-1][0]))
        return roots

    def open(self, samples: Sequence[Sample]) -> list[Opening]:
        openings = []
        for s in samples:
            shape, c, levels = self._held[s.gpu]
            o = open_leaf(levels, c, shape, s.row, s.col)
            openings.append(
                Opening(gpu=s.gpu, row=s.row, col=s.col, leaf=list(o.leaf), path=o.path_b64)
            )
        return openings

    def close(self) -> None:
        self._held = []


class _NoDevice:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *_: object) -> None:
        return None


CHILD_MODULE_ENV: Final = "GPUMESH_PROOF_MODULE"
"""The array module the child computes with: cupy (NumPy only where tests run the child's
plumbing on a machine without a GPU)."""


class ChildProver:
    """CuPy in a child process, kept for one challenge: roots, then openings, then exit."""

    def __init__(self, module: str = "cupy") -> None:
        self.name = module
        self._child: subprocess.Popen[str] | None = None

    def _ask(self, request: Mapping[str, Any]) -> dict[str, Any]:
        child = self._child
        assert child is not None and child.stdin is not None and child.stdout is not None
        child.stdin.write(json.dumps(request) + "\n")
        child.stdin.flush()
        # A hung driver must not hold the prover (and every later challenge) for good.
        watchdog = threading.Timer(CHILD_TIMEOUT_S, child.kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            line = child.stdout.readline()
        finally:
            watchdog.cancel()
        if not line:
            raise RuntimeError(f"the proof process exited ({child.wait(10)}) without an answer")
        reply: dict[str, Any] = json.loads(line)
        if "error" in reply:
            raise RuntimeError(str(reply["error"]))
        return reply

    def commit(self, challenge: Challenge, node: str, devices: Mapping[str, int]) -> list[str]:
        self.close()
        self._child = subprocess.Popen(
            # -P: the working directory does not shadow installed modules in the child.
            [sys.executable, "-P", "-m", "gpumesh.node_agent.prove"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            # CUDA numbers GPUs fastest first unless told otherwise; NVML, whose index the
            # devices map holds, numbers them by PCI bus.
            env={
                **os.environ,
                "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
                "CUPY_TF32": "1",
                CHILD_MODULE_ENV: self.name,
            },
        )
        reply = self._ask(
            {
                "challenge": challenge.model_dump(mode="json", by_alias=True),
                "node": node,
                "devices": dict(devices),
            }
        )
        return [str(r) for r in reply["roots"]]

    def open(self, samples: Sequence[Sample]) -> list[Opening]:
        reply = self._ask({"samples": [s.model_dump(mode="json") for s in samples]})
        return [Opening.model_validate(o) for o in reply["openings"]]

    def close(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            if child.stdin is not None:
                child.stdin.close()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait(10)
            if child.stdout is not None:
                child.stdout.close()


def select_prover(fake: bool, tamper: Tamper | None = None) -> Prover | None:
    """NumPy for the fake NVML's nodes; CuPy in a child process where it is installed;
    otherwise None: the node answers no challenge and stays unverified."""
    if fake:
        import numpy

        return ArrayProver(numpy, "numpy", tamper)
    if importlib.util.find_spec("cupy") is not None:
        return ChildProver()
    log.warning(
        "CuPy is not installed: this node cannot answer the operator's proof of GPU and "
        "stays unverified (pip install 'gpumesh[gpu]')"
    )
    return None


def _child_main() -> int:
    """``python -m gpumesh.node_agent.prove``: one challenge over stdin/stdout, one JSON
    request and reply per line (whatever CUDA prints goes to stderr)."""
    answer = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    module = os.environ.get(CHILD_MODULE_ENV, "cupy")
    prover = ArrayProver(importlib.import_module(module), module)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if "challenge" in request:
                challenge = Challenge.model_validate(request["challenge"])
                roots = prover.commit(challenge, str(request["node"]), request["devices"])
                reply: dict[str, Any] = {"roots": roots}
            else:
                samples = [Sample.model_validate(s) for s in request["samples"]]
                openings = prover.open(samples)
                reply = {"openings": [o.model_dump(mode="json", by_alias=True) for o in openings]}
        except Exception as err:
            reply = {"error": f"{type(err).__name__}: {err}"}
        answer.write(json.dumps(reply) + "\n")
        answer.flush()
    return 0


class ProofRunner:
    """Answers the operator's challenges in the background, one step at a time.

    ``offer`` is called with the challenge on every read of the GPUNode; it starts the
    commitment for a new challenge and the openings once samples are named. ``result`` is
    what to publish in ``status.proof``.
    """

    def __init__(
        self,
        prover: Prover | None,
        node: str,
        clock: Clock,
        *,
        delay_until: Callable[[Challenge], float | None] | None = None,
        answer_for: Callable[[Challenge], Proof | None] | None = None,
    ) -> None:
        self.prover = prover
        self.node = node
        self._clock = clock
        self._delay_until = delay_until
        self._answer_for = answer_for
        self.on_done: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self._proof: Proof | None = None
        self._working_on: tuple[str, str] | None = None
        self._committed: str | None = None
        self._dropped: str | None = None
        """A committed challenge whose products were let go (computed again if opened)."""

    def result(self) -> Proof | None:
        with self._lock:
            return self._proof

    def offer(self, challenge: Challenge | None, devices: Mapping[str, int]) -> None:
        if challenge is None:
            return
        with self._lock:
            proof = self._proof
            if self._working_on is not None:
                return
            if self._answer_for is not None:
                if self._committed == challenge.id:
                    return
                job = ("answer", challenge.id)
            elif self.prover is None:
                return
            elif self._committed != challenge.id:
                job = ("commit", challenge.id)
            elif challenge.samples and proof is not None and not proof.openings:
                job = ("open", challenge.id)
            else:
                return
            self._working_on = job
        threading.Thread(
            target=self._run, args=(job[0], challenge, dict(devices)), name="proof", daemon=True
        ).start()

    def _run(self, step: str, challenge: Challenge, devices: dict[str, int]) -> None:
        try:
            proof = self._step(step, challenge, devices)
        except Exception:
            log.exception("proof of GPU (%s of challenge %s) failed", step, challenge.id)
            proof = None
        with self._lock:
            self._working_on = None
            if proof is not None:
                self._proof = proof
        if proof is not None and self.on_done is not None:
            self.on_done()

    def _expire(self, challenge_id: str) -> None:
        """Let the products go when the operator never named entries to open."""
        with self._lock:
            proof = self._proof
            if self._working_on is not None or self._committed != challenge_id:
                return
            if self._dropped == challenge_id:
                return
            if proof is not None and proof.challenge_id == challenge_id and proof.openings:
                return
            self._dropped = challenge_id
            if self.prover is not None:
                self.prover.close()
        log.info(
            "challenge %s: no entries named within %.0f s; products dropped",
            challenge_id,
            OPEN_WAIT_S,
        )

    def _step(self, step: str, challenge: Challenge, devices: dict[str, int]) -> Proof | None:
        if step == "answer":
            assert self._answer_for is not None
            with self._lock:
                self._committed = challenge.id
            return self._answer_for(challenge)
        assert self.prover is not None
        if step == "commit":
            started = time.perf_counter()
            roots = self.prover.commit(challenge, self.node, devices)
            seconds = round(time.perf_counter() - started, 3)
            wait_until = self._delay_until(challenge) if self._delay_until else None
            if wait_until is not None:
                self._clock.sleep(max(0.0, wait_until - self._clock.now().timestamp()))
            with self._lock:
                self._committed = challenge.id
            log.info("challenge %s: roots after %.2f s", challenge.id, seconds)
            expiry = threading.Timer(OPEN_WAIT_S, self._expire, args=(challenge.id,))
            expiry.daemon = True
            expiry.start()
            return Proof(
                challenge_id=challenge.id, roots=roots, seconds=seconds, engine=self.prover.name
            )
        with self._lock:
            dropped, self._dropped = self._dropped == challenge.id, None
        if dropped:
            self.prover.commit(challenge, self.node, devices)
        openings = self.prover.open(challenge.samples)
        self.prover.close()
        with self._lock:
            current = self._proof
        if current is None or current.challenge_id != challenge.id:
            return None
        log.info("challenge %s: %d entries opened", challenge.id, len(openings))
        return current.model_copy(update={"openings": openings})


if __name__ == "__main__":
    sys.exit(_child_main())
