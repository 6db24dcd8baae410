"""Kubernetes resource quantities ("500m", "16Gi", "1e9") as integers.

Placement compares CPU in millicores and memory in bytes; rounding up keeps a request from
looking smaller than what the kubelet will reserve for it.
"""

from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache

_QUANTITY = re.compile(r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))([eE][+-]?[0-9]+|[a-zA-Z]*)$")

_SUFFIX_FACTORS: dict[str, Decimal] = {
    "": Decimal(1),
    "n": Decimal("1e-9"),
    "u": Decimal("1e-6"),
    "m": Decimal("1e-3"),
    "k": Decimal("1e3"),
    "M": Decimal("1e6"),
    "G": Decimal("1e9"),
    "T": Decimal("1e12"),
    "P": Decimal("1e15"),
    "E": Decimal("1e18"),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
    "Ei": Decimal(2**60),
}


def parse_quantity(value: str | int | float) -> Decimal:
    """The exact value of a quantity; ValueError names the text that is not one."""
    if isinstance(value, int | float):
        return Decimal(str(value))
    match = _QUANTITY.match(value.strip())
    if not match:
        raise ValueError(f"not a Kubernetes quantity: {value!r}")
    number, suffix = match.groups()
    try:
        if suffix[:1] in ("e", "E") and len(suffix) > 1:
            return Decimal(number + suffix)
        return Decimal(number) * _SUFFIX_FACTORS[suffix]
    except (KeyError, InvalidOperation):
        raise ValueError(f"not a Kubernetes quantity: {value!r}") from None


# Pods repeat a handful of quantities ("4", "16Gi"); caching makes inventories cheap.
@lru_cache(maxsize=4096)
def cpu_millicores(value: str | int | float) -> int:
    """CPU in millicores, rounded up as the kubelet does."""
    return math.ceil(parse_quantity(value) * 1000)


@lru_cache(maxsize=4096)
def memory_bytes(value: str | int | float) -> int:
    """Memory (or any countable resource) in whole units, rounded up."""
    return math.ceil(parse_quantity(value))
