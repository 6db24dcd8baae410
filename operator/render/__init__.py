"""Pure builders: gpumesh specs plus placement in, KubeRay manifests out."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any


def digest(manifest: Mapping[str, Any]) -> str:
    """A short hash of a rendering: equal manifests, equal digests (applied only on change)."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]
