"""Status written whole with a merge patch: what the server ends up holding is exactly
the new status, nested keys that went away included."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from gpumesh.api.patch import apply_merge_patch, merge_patch

leaf = st.one_of(st.integers(0, 9), st.booleans(), st.lists(st.integers(0, 9), max_size=2))
keys = st.sampled_from(["a", "b", "c"])
"""Few keys, so old and new documents share nested objects whose keys differ."""
docs = st.recursive(
    st.dictionaries(keys, leaf, max_size=3),
    lambda children: st.dictionaries(keys, st.one_of(leaf, children), max_size=3),
    max_leaves=8,
)


@given(docs, docs)
def test_the_patch_turns_the_old_document_into_the_new_one(old: Any, new: Any) -> None:
    assert apply_merge_patch(old, merge_patch(old, new)) == new


def test_a_nested_field_that_went_away_is_nulled_not_left_on_the_server() -> None:
    old = {"phase": "Ready", "head": {"node": "dc-0", "serviceName": "c-head-svc"}}
    new = {"phase": "Degraded", "head": {"node": "dc-1"}}
    patch = merge_patch(old, new)
    assert patch == {"phase": "Degraded", "head": {"node": "dc-1", "serviceName": None}}
    assert apply_merge_patch(old, patch) == new


def test_lists_are_replaced_whole() -> None:
    old = {"placements": [{"node": "a"}, {"node": "b"}]}
    assert apply_merge_patch(old, merge_patch(old, {"placements": [{"node": "b"}]})) == {
        "placements": [{"node": "b"}]
    }
