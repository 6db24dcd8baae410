"""The GPUQuota kind: wire form, validation, and a structural, described CRD schema."""

from __future__ import annotations

from decimal import Decimal

import pytest
from pydantic import ValidationError
from test_crdgen import structural_problems, undescribed

from gpumesh import crdgen
from gpumesh.api.gpuquota import GPUQuota
from gpumesh.api.kinds import GPUQUOTA


def test_round_trips_in_camel_case() -> None:
    quota = GPUQuota.model_validate(
        {
            "apiVersion": "gpumesh.io/v1alpha1",
            "kind": "GPUQuota",
            "metadata": {"name": "team-a", "namespace": "team-a"},
            "spec": {"hard": {"gpus": 64, "pricePerHour": "150.00"}},
        }
    )
    assert quota.spec.hard.gpus == 64
    assert quota.spec.hard.price_per_hour == Decimal("150.00")
    assert quota.to_api()["spec"] == {"hard": {"gpus": 64, "pricePerHour": "150.00"}}


def test_no_limits_is_valid_and_unlimited() -> None:
    quota = GPUQuota.model_validate({"metadata": {"name": "q"}})
    assert quota.spec.hard.gpus is None and quota.spec.hard.price_per_hour is None


@pytest.mark.parametrize(
    ("hard", "message"),
    [
        ({"gpus": -1}, "greater than or equal to 0"),
        ({"pricePerHour": 10.5}, "decimal string"),
        ({"cpus": 4}, "Extra inputs are not permitted"),
    ],
)
def test_rejects_bad_limits(hard: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        GPUQuota.model_validate({"metadata": {"name": "q"}, "spec": {"hard": hard}})


def test_crd_schema_is_structural_and_described() -> None:
    schema = crdgen.crd(GPUQUOTA)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    assert structural_problems(schema) == []
    assert undescribed(schema["properties"]["spec"], "spec") == []
    assert undescribed(schema["properties"]["status"], "status") == []
    hard = schema["properties"]["spec"]["properties"]["hard"]["properties"]
    assert hard["pricePerHour"]["type"] == "string"
    assert hard["gpus"]["minimum"] == 0
