"""What each GPU product should look like: the operator sizes and times its challenges by
it and checks the identity a node reports against it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

UUID_RE: Final = re.compile(r"^GPU-[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass(frozen=True)
class Sku:
    """A product: NVML memory total, compute capability, and the dense bf16
    (fp32-accumulate) matmul throughput a healthy card reaches, in TFLOP/s."""

    fragment: str
    memory_mib: int
    compute_capability: str
    tflops: tuple[float, float]

    @property
    def tf32_floor(self) -> float:
        """The least TF32 throughput a healthy card reaches, in FLOP/s: these parts run
        TF32 at half their bf16 rate."""
        return self.tflops[0] / 2 * 1e12


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
MEMORY_TOLERANCE: Final = 0.02


def sku_for(model: str) -> Sku | None:
    return next((s for s in SKUS if s.fragment in model), None)
