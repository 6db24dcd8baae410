"""The agent admission policies are generated from the one list of who writes what."""

from __future__ import annotations

import yaml

from corpus import ROOT
from gpumesh import policy
from gpumesh.api.nodes import MESH_OPERATOR_LABELS, SUPPLIER_TAINT, agent_may_set

CHECKED_IN = ROOT / "charts" / "gpumesh-operator" / "templates" / "agent-policy.yaml"


def test_the_chart_ships_the_policies_as_generated() -> None:
    assert CHECKED_IN.read_text() == policy.render(), "run `make crds`"


def test_every_policy_has_a_binding_that_denies() -> None:
    docs = list(yaml.safe_load_all(CHECKED_IN.read_text()))
    policies = {d["metadata"]["name"] for d in docs if d["kind"] == "ValidatingAdmissionPolicy"}
    bindings = {
        d["spec"]["policyName"]: d["spec"]["validationActions"]
        for d in docs
        if d["kind"] == "ValidatingAdmissionPolicyBinding"
    }
    assert policies == {"gpumesh-agent-gpunodes", "gpumesh-agent-nodes", "gpumesh-agent-leases"}
    assert bindings == {name: ["Deny"] for name in policies}


def test_the_mesh_operators_keys_are_never_an_agents() -> None:
    assert not any(agent_may_set(k) for k in (*MESH_OPERATOR_LABELS, SUPPLIER_TAINT))
    assert not agent_may_set("kubernetes.io/hostname")
    assert not agent_may_set("node-role.kubernetes.io/control-plane")
    assert agent_may_set("nvidia.com/gpu.product")
    assert agent_may_set("gpumesh.io/gpu-unhealthy")
    rendered = policy.render()
    assert all(f"'{key}'" in rendered for key in MESH_OPERATOR_LABELS)
