"""JSON merge patches (RFC 7386): how gpumesh writes a status whole, and how its test
fakes apply a patch as the API server does.

A merge patch merges objects key by key at every depth and replaces everything else
(lists included); ``null`` removes a key. So a patch that writes a status whole must null
every key that is gone, nested ones too: a ``head.serviceName`` missing from the new
status but left out of the patch would stay on the server.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """The merge patch that turns ``old`` into ``new``: all of ``new``, and a null for every
    key of ``old`` that ``new`` lacks, at any depth."""
    patch: dict[str, Any] = {}
    for key, value in new.items():
        before = old.get(key)
        if isinstance(value, Mapping) and isinstance(before, Mapping):
            patch[key] = merge_patch(before, value)
        else:
            patch[key] = copy.deepcopy(value)
    for gone in old.keys() - new.keys():
        patch[gone] = None
    return patch


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """``target`` with ``patch`` applied (RFC 7386); neither is changed."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = apply_merge_patch(out.get(key), value)
    return out
