"""Building blocks shared by every gpumesh API kind.

The pydantic models in this package are the single source of truth for the CRDs: the
generator in :mod:`gpumesh.crdgen` turns them into structural schemas, so a constraint
written here holds both in Python and at the API server.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    StringConstraints,
    WithJsonSchema,
    field_validator,
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
    """Base of every API object part: camelCase on the wire, unknown fields rejected,
    types parsed strictly.

    ``kubectl apply`` validates strictly by default and the API server converts no types
    (``suspend: "yes"`` is not a boolean, ``replicas: "2"`` not an integer), so parsing the
    same way gives a renter the same answer in Python as from the API server.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_enum_values=True,
        validate_default=True,
        strict=True,
    )

    def to_api(self) -> dict[str, Any]:
        """The wire form: camelCase keys, unset optional fields left out."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(ApiModel):
    """Status parts tolerate fields written by newer versions of gpumesh, and read
    timestamps from their wire form (strings)."""

    model_config = ConfigDict(extra="ignore", strict=False)


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


def price_text(amount: Decimal) -> str:
    """Dollars as people read them: at least cents (``1.00``, ``2.20``), exact beyond."""
    normal = amount.normalize()
    exponent = normal.as_tuple().exponent
    if isinstance(exponent, int) and exponent > -2:
        return format(amount.quantize(Decimal("0.01")), "f")
    return format(normal, "f")


Price = Annotated[
    Decimal,
    BeforeValidator(_price_from_text),
    Field(ge=0, max_digits=10, decimal_places=4),
    PlainSerializer(price_text, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "pattern": PRICE_PATTERN, "maxLength": 11}),
]
"""US dollars as a decimal string (``"2.10"``); a string so no float rounding creeps in."""

# The image reference grammar of the OCI distribution spec (docker/distribution's
# reference package): [domain[:port]/]path[/path...][:tag][@digest]. RE2 and Python read it
# alike, so the API server's CEL rule and the models agree; it holds no backslash, which a
# CEL string literal would take as an escape.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = rf"{_DOMAIN_COMPONENT}(?:[.]{_DOMAIN_COMPONENT})*(?::[0-9]+)?"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_PATTERN = (
    rf"^(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*(?::{_TAG})?(?:@{_DIGEST})?$"
)
IMAGE_MESSAGE = (
    "must be an image reference, [registry[:port]/]name[:tag][@digest], such as "
    "rayproject/ray:2.52.0-gpu or registry.example.com:5000/team/ray@sha256:<hex>"
)
_IMAGE_RE = re.compile(IMAGE_PATTERN)


def _image_reference(value: str) -> str:
    if not _IMAGE_RE.match(value):
        raise ValueError(IMAGE_MESSAGE)
    return value


ImageReference = Annotated[
    str,
    StringConstraints(min_length=1, max_length=512),
    AfterValidator(_image_reference),
    Field(json_schema_extra={CEL_KEY: [cel(f"self.matches('{IMAGE_PATTERN}')", IMAGE_MESSAGE)]}),
]
"""A container image reference, checked against the distribution grammar."""

_SIZED_BY_PLACEMENT = "gpumesh sets it from the GPUs, CPUs and memory it places"
_WIRED_BY_KUBERAY = "KubeRay and gpumesh set it: the head's address and the ports its Service uses"
MANAGED_RAY_START_PARAMS: Final[Mapping[str, str]] = {
    "num-gpus": _SIZED_BY_PLACEMENT,
    "num-cpus": _SIZED_BY_PLACEMENT,
    "memory": _SIZED_BY_PLACEMENT,
    "resources": _SIZED_BY_PLACEMENT,
    "address": _WIRED_BY_KUBERAY,
    "node-ip-address": _WIRED_BY_KUBERAY,
    "port": _WIRED_BY_KUBERAY,
    "block": _WIRED_BY_KUBERAY,
    "dashboard-host": _WIRED_BY_KUBERAY,
    "dashboard-port": _WIRED_BY_KUBERAY,
    "ray-client-server-port": _WIRED_BY_KUBERAY,
}
"""`ray start` options a renter may not set, and why (`ray start` takes either spelling,
``num-gpus`` or ``num_gpus``)."""


def _spellings(option: str) -> tuple[str, ...]:
    underscored = option.replace("-", "_")
    return (option,) if underscored == option else (option, underscored)


def _managed_message(option: str) -> str:
    return f"may not set {' or '.join(_spellings(option))}: {MANAGED_RAY_START_PARAMS[option]}"


def _unmanaged_start_params(value: dict[str, str]) -> dict[str, str]:
    taken = [o for o in MANAGED_RAY_START_PARAMS if any(k in value for k in _spellings(o))]
    if taken:
        raise ValueError("; ".join(_managed_message(o) for o in taken))
    return value


# One rule per option, each a map lookup: a rule walking the renter's keys, or a message
# built from them, costs more than the API server's CEL budget allows (keys are unbounded).
RayStartParams = Annotated[
    dict[str, Annotated[str, StringConstraints(max_length=256)]],
    Field(
        max_length=32,
        json_schema_extra={
            CEL_KEY: [
                cel(
                    " && ".join(f"!('{k}' in self)" for k in _spellings(option)),
                    _managed_message(option),
                )
                for option in MANAGED_RAY_START_PARAMS
            ]
        },
    ),
    AfterValidator(_unmanaged_start_params),
]
"""Extra `ray start` options; what gpumesh manages is refused with the key named."""


@dataclass(frozen=True)
class NameLimit:
    """What an object's name must be, because gpumesh names other objects after it.

    The API server enforces it (CEL rules at the root of the CRD schema, the only place
    that sees ``metadata.name``) and :func:`check` gives the same answer in Python.
    """

    max_length: int
    why: str
    dns1035: bool = False
    """Also a DNS-1035 label: starts with a letter (KubeRay names Services after it)."""

    def problems(self, name: str) -> list[str]:
        found = []
        if len(name) > self.max_length:
            found.append(f"{self.length_message()} (it has {len(name)})")
        if self.dns1035 and not _DNS1035_RE.match(name):
            found.append(DNS1035_MESSAGE)
        return found

    def length_message(self) -> str:
        return f"must be at most {self.max_length} characters: {self.why}"

    def cel_rules(self) -> list[JsonDict]:
        rules = [
            cel(
                f"self.metadata.name.size() <= {self.max_length}",
                self.length_message(),
                ".metadata.name",
            )
        ]
        if self.dns1035:
            rules.append(
                cel(
                    f"self.metadata.name.matches('{DNS1035_PATTERN}')",
                    DNS1035_MESSAGE,
                    ".metadata.name",
                )
            )
        return rules


DNS1035_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS1035_MESSAGE = (
    "must be a DNS-1035 label: lower-case letters, digits and '-', starting with a letter"
)
_DNS1035_RE = re.compile(DNS1035_PATTERN)

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

    name_limit: ClassVar[NameLimit | None] = None
    """Set by kinds whose name other objects are named after."""

    name: Annotated[str, StringConstraints(min_length=1, max_length=253)] | None = None
    generate_name: str | None = None
    namespace: DnsLabel | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    uid: str | None = None

    @field_validator("name")
    @classmethod
    def _name_fits(cls, name: str | None) -> str | None:
        if name is not None and cls.name_limit is not None:
            problems = cls.name_limit.problems(name)
            if problems:
                raise ValueError("; ".join(problems))
        return name


_NAME_RE = re.compile(DNS_LABEL_PATTERN)


def is_dns_label(text: str) -> bool:
    """True when ``text`` may name a Kubernetes object that must be a DNS label."""
    return len(text) <= 63 and bool(_NAME_RE.match(text))
