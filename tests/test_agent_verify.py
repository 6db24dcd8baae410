"""Proof of GPU: identity checks, the challenge verdicts, and engine selection."""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest

from gpumesh.node_agent.clock import ManualClock
from gpumesh.node_agent.nvml.fake import FakeGpu, FakeNvml
from gpumesh.node_agent.nvml.types import DeviceIdentity
from gpumesh.node_agent.verify import (
    ChallengeResult,
    ChallengeUnavailableError,
    ChildProcessEngine,
    Claim,
    PriorGpu,
    ScriptedEngine,
    VerificationRunner,
    identity_problems,
    pattern_seed,
    select_engine,
    sku_for,
    splitmix64,
    verify,
)

NONCE = "00112233445566778899aabbccddeeff"
NOW = datetime(2026, 5, 1, tzinfo=UTC)


def h100(index: int, **changes: object) -> DeviceIdentity:
    ident = DeviceIdentity(
        index=index,
        uuid=f"GPU-{index:08x}-1111-2222-3333-444444444444",
        name="NVIDIA H100 80GB HBM3",
        memory_total_mib=81559,
        pci_bus_id=f"00000000:{0x18 + index:02X}:00.0",
        compute_capability="9.0",
    )
    return replace(ident, **changes)  # type: ignore[arg-type]


class Fixed:
    """An engine that answers one result."""

    name = "fixed"

    def __init__(self, result: ChallengeResult) -> None:
        self.result = result

    def run(self, nonce: str, identity: DeviceIdentity) -> ChallengeResult:
        return self.result


def test_consistent_identity_has_no_problems() -> None:
    gpus = [h100(0), h100(1)]
    prior = {g.index: PriorGpu(g.uuid, g.pci_bus_id, g.memory_total_mib) for g in gpus}
    assert identity_problems(gpus, Claim(count=2, previous=prior)) == []


@pytest.mark.parametrize(
    ("gpus", "claim", "problem"),
    [
        ([h100(0)], Claim(count=8), "offers 8 GPUs but 1 answer"),
        ([h100(0), h100(1, uuid=h100(0).uuid)], Claim(), "same UUID"),
        ([h100(0), h100(1, pci_bus_id=h100(0).pci_bus_id)], Claim(), "same PCI bus id"),
        ([h100(0, uuid="GPU-fake")], Claim(), "malformed UUID"),
        ([h100(0, memory_total_mib=24564)], Claim(), "has 81559 MiB, not the 24564 MiB"),
        ([h100(0, compute_capability="8.9")], Claim(), "compute 9.0, not 8.9"),
        (
            [h100(0)],
            Claim(previous={0: PriorGpu("GPU-0000000f-1111-2222-3333-444444444444", None, 81559)}),
            "UUID changed",
        ),
        (
            [h100(0)],
            Claim(previous={0: PriorGpu(h100(0).uuid, "00000000:99:00.0", 81559)}),
            "moved from PCI",
        ),
    ],
)
def test_identity_problems_are_named(
    gpus: list[DeviceIdentity], claim: Claim, problem: str
) -> None:
    problems = identity_problems(gpus, claim)
    assert any(problem in p for p in problems), problems


def test_sku_catalogue_matches_fleet_models() -> None:
    assert sku_for("NVIDIA H100 80GB HBM3") is not None
    a100 = sku_for("NVIDIA A100-SXM4-80GB")
    assert a100 is not None
    assert a100.memory_mib == 81920
    a100_40 = sku_for("NVIDIA A100-PCIE-40GB")
    assert a100_40 is not None
    assert a100_40.memory_mib == 40960
    rtx = sku_for("NVIDIA GeForce RTX 4090")
    assert rtx is not None
    assert rtx.memory_mib == 24564
    assert sku_for("Tesla K80") is None


def test_pattern_is_the_reference_splitmix64() -> None:
    # First outputs of SplitMix64 seeded with 0 (x advanced by the golden gamma).
    assert splitmix64(0x9E3779B97F4A7C15) == 0xE220A8397B1DCDAF
    assert pattern_seed(NONCE, "GPU-a") != pattern_seed(NONCE, "GPU-b")
    assert pattern_seed(NONCE, "GPU-a") < 2**63


def test_identity_failure_fails_before_any_challenge() -> None:
    status = verify([h100(0, memory_total_mib=1000)], Claim(), NONCE, None, lambda: NOW)
    assert status.result == "Failed"
    assert status.nonce == NONCE
    assert status.checked_time == NOW


def test_without_an_engine_only_identity_is_proven() -> None:
    status = verify([h100(0)], Claim(), NONCE, None, lambda: NOW)
    assert status.result == "IdentityOnly"
    assert "no CuPy or PyTorch" in (status.message or "")


def test_a_full_answer_passes() -> None:
    engine = Fixed(ChallengeResult(80023, True, 700.0, "d1"))
    status = verify([h100(0), h100(1)], Claim(count=2), NONCE, engine, lambda: NOW)
    assert status.result == "Passed"
    assert status.vram_verified_mib == 2 * 80023
    assert status.matmul_tflops == 700.0


@pytest.mark.parametrize(
    ("result", "why"),
    [
        (ChallengeResult(20000, True, 700.0, "d"), "20000 of 81559 MiB proven"),
        (ChallengeResult(80023, False, 700.0, "d", "mismatch"), "mismatch"),
        (ChallengeResult(80023, True, 80.0, "d"), "80 TFLOP/s is outside"),
        (ChallengeResult(80023, True, 5000.0, "d"), "5000 TFLOP/s is outside"),
    ],
)
def test_short_memory_or_implausible_throughput_fails(result: ChallengeResult, why: str) -> None:
    status = verify([h100(0)], Claim(), NONCE, Fixed(result), lambda: NOW)
    assert status.result == "Failed"
    assert why in (status.message or "")


def test_an_engine_that_breaks_degrades_to_identity_only() -> None:
    class Broken:
        name = "broken"

        def run(self, nonce: str, identity: DeviceIdentity) -> ChallengeResult:
            raise RuntimeError("CUDA driver too old")

    status = verify([h100(0)], Claim(), NONCE, Broken(), lambda: NOW)
    assert status.result == "IdentityOnly"
    assert "CUDA driver too old" in (status.message or "")


def test_the_fake_nvml_scripts_both_outcomes() -> None:
    nvml = FakeNvml([FakeGpu()], clock=ManualClock())
    engine = select_engine(nvml)
    assert isinstance(engine, ScriptedEngine)
    nvml.init()
    ident = [nvml.identity(0)]
    assert verify(ident, Claim(), NONCE, engine, lambda: NOW).result == "Passed"
    nvml.verification = "fail"
    assert verify(ident, Claim(), NONCE, engine, lambda: NOW).result == "Failed"


def test_real_backend_without_a_compute_library_gets_no_engine() -> None:
    import importlib.util

    from gpumesh.node_agent.nvml.real import PynvmlBackend

    if importlib.util.find_spec("torch") or importlib.util.find_spec("cupy"):
        pytest.skip("a compute library is installed here")
    assert select_engine(PynvmlBackend()) is None


def test_a_challenge_process_without_a_usable_library_reads_as_identity_only() -> None:
    """A real child process (``python -m gpumesh.node_agent.verify``), asked for libraries
    that are not installed here: it says why, and the proof falls back to identity."""
    engine = ChildProcessEngine(["cupy_missing_here", "torch_missing_here"])
    with pytest.raises(ChallengeUnavailableError, match="No module named 'cupy_missing_here'"):
        engine.run(NONCE, h100(0))
    status = verify([h100(0)], Claim(), NONCE, engine, lambda: NOW)
    assert status.result == "IdentityOnly"
    assert "torch_missing_here" in (status.message or "")


def test_what_a_library_prints_cannot_spoil_the_childs_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A library that writes to stdout (through Python and straight to fd 1) on import and
    at exit: the child's answer still arrives, here saying the library sees no GPU."""
    (tmp_path / "noisy_gpu_lib.py").write_text(
        "import atexit, os\n"
        "print('banner from the library')\n"
        "os.write(1, b'raw fd 1 output\\n')\n"
        "atexit.register(print, 'goodbye from the library, after the answer')\n"
    )
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    )
    with pytest.raises(ChallengeUnavailableError, match="noisy_gpu_lib"):
        ChildProcessEngine(["noisy_gpu_lib"]).run(NONCE, h100(0))


def test_runner_answers_each_nonce_once() -> None:
    runner = VerificationRunner(None, ManualClock())
    first = runner.run_now(NONCE, [h100(0)], Claim())
    assert first.result == "IdentityOnly"
    assert not runner.request(NONCE, [h100(0)], Claim())  # already answered
    assert runner.request("ff" * 8, [h100(0)], Claim())
