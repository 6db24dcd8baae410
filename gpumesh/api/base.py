"""Building blocks shared by every gpumesh API kind.

The pydantic models in this package are the single source of truth for the CRDs: the
generator in :mod:`gpumesh.crdgen` turns them into structural schemas, so a constraint
written here holds both in Python and at the API server.
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Final, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
)
from pydantic.alias_generators import to_camel

GROUP = "gpumesh.io"
VERSION = "v1alpha1"
API_VERSION: Final = "gpumesh.io/v1alpha1"

JsonDict = dict[str, Any]
"""A fragment of JSON schema added to what pydantic writes."""

#: Schema extension keys understood by :mod:`gpumesh.crdgen`.
CEL_KEY = "x-kubernetes-validations"
LIST_TYPE_KEY = "x-kubernetes-list-type"
LIST_MAP_KEYS_KEY = "x-kubernetes-list-map-keys"


class ApiModel(BaseModel):
    """Base of every API object part: camelCase on the wire, unknown fields rejected.

    ``kubectl apply`` validates strictly by default, so rejecting unknown fields here
    gives a renter the same answer in Python as from the API server.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Status parts tolerate fields written by newer versions of gpumesh."""

    model_config = ConfigDict(extra="ignore")


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One CEL rule for ``x-kubernetes-validations``; the message is what a user reads."""
    entry: JsonDict = {"rule": rule, "message": message}
    if field_path is not None:
        entry["fieldPath"] = field_path
    return entry


def list_map(*keys: str) -> JsonDict:
    """Schema extras for a list of objects merged by key under server-side apply."""
    return {LIST_TYPE_KEY: "map", LIST_MAP_KEYS_KEY: list(keys)}


LIST_SET: JsonDict = {LIST_TYPE_KEY: "set"}
LIST_ATOMIC: JsonDict = {LIST_TYPE_KEY: "atomic"}

# --- scalar types --------------------------------------------------------------------

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DnsLabel = Annotated[str, StringConstraints(min_length=1, max_length=63, pattern=DNS_LABEL_PATTERN)]
"""An RFC 1123 label: lower-case letters, digits and '-'."""

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY_PATTERN)]
"""A Kubernetes resource quantity such as ``500m``, ``2`` or ``16Gi``."""

PRICE_PATTERN = r"^[0-9]{1,6}(\.[0-9]{1,4})?$"


def _price_from_text(value: Any) -> Any:
    """Accept decimal strings only, as the API server does: floats would round."""
    if isinstance(value, Decimal):
        return value
    if isinstance(value, str) and re.fullmatch(PRICE_PATTERN, value):
        return Decimal(value)
    raise ValueError('should be a decimal string of US dollars such as "2.10"')


Price = Annotated[
    Decimal,
    BeforeValidator(_price_from_text),
    Field(ge=0, max_digits=10, decimal_places=4),
    PlainSerializer(lambda d: format(d.normalize(), "f"), return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": PRICE_PATTERN, "maxLength": 11}),
]
"""US dollars as a decimal string (``"2.10"``); a string so no float rounding creeps in."""

COMPUTE_CAPABILITY_PATTERN = r"^[0-9]{1,2}\.[0-9]$"
ComputeCapability = Annotated[str, StringConstraints(pattern=COMPUTE_CAPABILITY_PATTERN)]
"""CUDA compute capability, ``major.minor`` (``8.0`` for A100, ``9.0`` for H100)."""

Priority = Annotated[int, Field(ge=-1000, le=1000)]

Labels = Annotated[
    dict[str, Annotated[str, StringConstraints(max_length=253)]],
    Field(max_length=64),
]


def parse_compute_capability(text: str) -> tuple[int, int]:
    """``"8.6"`` -> ``(8, 6)``; callers pass validated text."""
    major, _, minor = text.partition(".")
    return int(major), int(minor)


# --- conditions ----------------------------------------------------------------------

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """A kstatus-compatible condition, as ``kubectl wait --for=condition=Ready`` reads it."""

    type: Annotated[str, StringConstraints(max_length=64)] = Field(
        description="Condition type: Ready, Reconciling, Stalled, Degraded or a kind-specific one."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: Annotated[str, StringConstraints(max_length=128)] = Field(
        default="", description="One CamelCase word a program can switch on."
    )
    message: Annotated[str, StringConstraints(max_length=4096)] = Field(
        default="", description="What happened and what to do about it, for a human."
    )
    last_transition_time: datetime | None = Field(
        default=None, description="When status last changed."
    )
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this condition was computed for."
    )


Conditions = Annotated[
    list[Condition],
    Field(max_length=16, json_schema_extra=list_map("type")),
]


class UnhealthyNode(StatusModel):
    """A node under a workload that has been unhealthy since ``since``.

    Failover's grace period counts from here. It lives in status, not in the operator's
    memory, so an operator restarted mid-grace neither starts the grace over nor forgets it.
    """

    node: Annotated[str, StringConstraints(max_length=253)] = Field(description="Node name.")
    since: datetime = Field(description="When the operator first saw it unhealthy.")


UnhealthyNodes = Annotated[
    list[UnhealthyNode],
    Field(max_length=1000, json_schema_extra=list_map("node")),
]


# --- object metadata -----------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The parts of metadata that manifests carry; the API server owns the rest."""

    model_config = ConfigDict(extra="allow", populate_by_name=True, alias_generator=to_camel)

    name: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    generate_name: str | None = None
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None


_NAME_RE = re.compile(DNS_LABEL_PATTERN)


def is_dns_label(text: str) -> bool:
    """True when ``text`` may name a Kubernetes object that must be a DNS label."""
    return len(text) <= 63 and bool(_NAME_RE.match(text))
