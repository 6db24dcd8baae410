"""GPUNode: one supplier node as the mesh sees it (offer in spec, observations in status).

Cluster-scoped and named after its Kubernetes node. The supplier sets the spec (through
the supplier chart); the node agent writes the status; the operator reads both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import Field, StringConstraints, field_validator

from gpumesh.api.base import (
    API_VERSION,
    ApiModel,
    Conditions,
    DnsLabel,
    ObjectMeta,
    Price,
    StatusModel,
    list_map,
)

ENDPOINT_PATTERN = r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$"
HEX_ID_PATTERN = r"^[0-9a-f]{16,64}$"
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
MAX_SAMPLES = 4096
"""Entries a challenge may open: at most 64 GPUs x 64 samples."""
WG_KEY_PATTERN = r"^[A-Za-z0-9+/]{42}[AEIMQUYcgkosw048]=$"

NODE_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$"
MAX_RTT_PEERS = 1024
"""Bound of ``status.mesh.rttMs``: every GPUNode write reaches every watcher of GPUNodes."""

Endpoint = Annotated[str, StringConstraints(max_length=262, pattern=ENDPOINT_PATTERN)]
NodeName = Annotated[str, StringConstraints(max_length=253, pattern=NODE_NAME_PATTERN)]

GPUHealth = Literal["Healthy", "Degraded", "NeedsReset", "Unhealthy", "Lost", "Unknown"]
"""Per-GPU health. Unhealthy, Lost and Unknown GPUs get no work; Degraded ranks lower."""
ACCEPTING_HEALTH: frozenset[str] = frozenset({"Healthy", "Degraded"})
"""Health that may receive new work (Degraded ranks lower in placement)."""


class GPUNodeSpec(ApiModel):
    """The supplier's offer."""

    supplier: DnsLabel = Field(description="Supplier owning the node.")
    region: DnsLabel = Field(description="Region the node sits in, as 'eu-west'.")
    price_per_gpu_hour: Price = Field(description='Asking price per GPU-hour, as "2.10".')
    head_capable: bool = Field(
        default=False, description="May host Ray heads (trusted data-centre nodes)."
    )
    cordoned: bool = Field(default=False, description="Take no new work; running work stays.")
    public_endpoint: Endpoint | None = Field(
        default=None,
        description="host:port where the node's WireGuard listens publicly; unset behind NAT.",
    )
    mesh_relay: bool = Field(
        default=True,
        description=(
            "May relay WireGuard traffic for NAT'd nodes (only with a publicEndpoint); "
            "false opts the node out of relaying."
        ),
    )


class GPUInfo(StatusModel):
    """Identity and health of one GPU."""

    index: int = Field(ge=0, le=63, description="NVML index.")
    uuid: str = Field(description="GPU UUID.")
    model: str = Field(description="Product name, as 'NVIDIA H100 80GB HBM3'.")
    memory_mib: int = Field(ge=0, description="Total memory in MiB.")
    compute_capability: str | None = Field(default=None, description="major.minor.")
    pci_bus_id: str | None = Field(default=None, description="PCI bus id.")
    health: GPUHealth = Field(default="Unknown", description="Current health.")
    reasons: Annotated[list[str], Field(max_length=16)] = Field(
        default_factory=list, description="Why health is not Healthy, newest first."
    )
    temperature_c: int | None = Field(default=None, description="Core temperature, Celsius.")
    power_w: float | None = Field(default=None, description="Power draw, watts.")


class PeerEndpoint(StatusModel):
    """A peer's endpoint as this node saw it after a handshake (the peer's NAT mapping)."""

    node: NodeName = Field(description="The peer's GPUNode name.")
    endpoint: Endpoint = Field(description="host:port the peer's packets came from.")


class MeshStatus(StatusModel):
    """The node's place in the WireGuard mesh. Never holds a private key."""

    public_key: Annotated[str, StringConstraints(pattern=WG_KEY_PATTERN)] | None = Field(
        default=None, description="WireGuard public key (base64)."
    )
    endpoints: Annotated[list[str], Field(max_length=16)] = Field(
        default_factory=list, description="Endpoint candidates, best first."
    )
    observed_endpoint: str | None = Field(
        default=None, description="Endpoint peers saw after a handshake (NAT mapping)."
    )
    overlay_ip: str | None = Field(default=None, description="Overlay address, by the operator.")
    pod_cidr: str | None = Field(default=None, description="Pod range routed over the mesh.")
    relay: str | None = Field(default=None, description="Relay node used when not reachable.")
    peer_endpoints: Annotated[
        list[PeerEndpoint], Field(max_length=5000, json_schema_extra=list_map("node"))
    ] = Field(
        default_factory=list,
        description=(
            "NAT mappings this node (as a relay) observed for the peers it relays, by the "
            "agent; the operator copies each into that peer's observedEndpoint."
        ),
    )
    rtt_ms: Annotated[dict[str, float], Field(max_length=MAX_RTT_PEERS)] = Field(
        default_factory=dict,
        description=(
            "Round-trip time over the mesh to the nearest peer nodes, in ms, by the agent "
            "(bounded: nodes not listed are unknown, not unreachable)."
        ),
    )

    rtt_floor_ms: float | None = Field(
        default=None,
        ge=0,
        description=(
            "Every peer the agent measured but left out of rttMs is at least this far, in "
            "ms; unset while rttMs lists every peer it measured."
        ),
    )

    @field_validator("rtt_ms", mode="before")
    @classmethod
    def _numeric_rtts(cls, value: Any) -> Any:
        """Skip unreadable entries rather than reject the status (placement reads the rest)."""
        if not isinstance(value, dict):
            return value
        return {
            k: v for k, v in value.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }


HexId = Annotated[str, StringConstraints(pattern=HEX_ID_PATTERN)]
Digest = Annotated[str, StringConstraints(pattern=DIGEST_PATTERN)]


class ChallengeGpu(StatusModel):
    """One GPU's part of a challenge: the product it must compute."""

    uuid: str = Field(description="The GPU, by the UUID its node reported.")
    rows: int = Field(ge=1, le=1 << 20, description="Rows of A and of the product.")
    inner: int = Field(ge=1, le=(1 << 22) - 1, description="Columns of A, rows of B.")
    cols: int = Field(ge=16, le=1 << 20, description="Columns of B and of the product.")


class Sample(StatusModel):
    """An entry of one GPU's product the agent must open."""

    gpu: int = Field(ge=0, le=63, description="Position in the challenge's gpus.")
    row: int = Field(ge=0, description="Row of the product.")
    col: int = Field(ge=0, description="Column of the product.")


class Challenge(StatusModel):
    """A proof-of-GPU challenge, by the operator (docs/security.md: what it proves)."""

    id: HexId = Field(description="Names the challenge; an answer must name it.")
    seed: Digest = Field(description="Fresh random seed the matrices derive from.")
    issued_time: datetime = Field(description="When the operator issued it (its clock).")
    deadline_seconds: float = Field(
        gt=0, description="The roots must reach the operator this long after issuedTime."
    )
    gpus: Annotated[list[ChallengeGpu], Field(max_length=64)] = Field(
        default_factory=list, description="Each GPU's product."
    )
    committed_time: datetime | None = Field(
        default=None, description="When the operator saw the roots (its clock)."
    )
    samples: Annotated[list[Sample], Field(max_length=MAX_SAMPLES)] = Field(
        default_factory=list,
        description="Entries to open, drawn by the operator after it saw the roots.",
    )


class Opening(StatusModel):
    """One sampled entry's leaf and the path from it to its GPU's root."""

    gpu: int = Field(ge=0, le=63, description="Position in the challenge's gpus.")
    row: int = Field(ge=0, description="Row of the product.")
    col: int = Field(ge=0, description="Column of the product.")
    leaf: Annotated[list[int], Field(max_length=16)] = Field(
        description="The 16 entries of the leaf holding (row, col)."
    )
    path: Annotated[str, StringConstraints(max_length=2048)] = Field(
        description="Sibling digests from the leaf up, base64."
    )


class Proof(StatusModel):
    """The agent's answer to the current challenge: a claim the operator checks."""

    challenge_id: str = Field(description="The challenge answered.")
    roots: Annotated[list[Digest], Field(max_length=64)] = Field(
        default_factory=list, description="Merkle root of each GPU's product, in challenge order."
    )
    openings: Annotated[list[Opening], Field(max_length=MAX_SAMPLES)] = Field(
        default_factory=list, description="The sampled entries, once the operator named them."
    )
    seconds: float | None = Field(
        default=None, description="The agent's own time to the roots (for people)."
    )
    engine: str | None = Field(default=None, description="What computed it: cupy or numpy.")


VerdictReason = Literal[
    "Verified",
    "Checking",
    "GPUsChanged",
    "NoGPUs",
    "UnknownGPU",
    "WrongAnswer",
    "Late",
    "Unanswered",
    "Replay",
]


class Verdict(StatusModel):
    """The operator's verdict on a node's GPUs."""

    result: Literal["Pending", "Passed", "Failed"] = Field(description="Passed counts.")
    reason: VerdictReason = Field(description="Why, in one word.")
    message: str | None = Field(default=None, description="Details for people.")
    challenge_id: str | None = Field(default=None, description="The challenge judged.")
    checked_time: datetime | None = Field(default=None, description="When it was judged.")
    gpus: str | None = Field(
        default=None, description="Fingerprint of the GPUs proven (their UUIDs, models, memory)."
    )
    seconds: float | None = Field(
        default=None, description="Issue to roots on the operator's clock."
    )
    roots: Annotated[list[Digest], Field(max_length=64)] = Field(
        default_factory=list, description="The roots judged: a later answer with them is a replay."
    )


class Track(StatusModel):
    """What the operator has seen of a node, for its reputation: time up and down and its
    faults, each decayed with a half-life (a rolling window that needs no history)."""

    updated_time: datetime = Field(description="The time this record is counted up to.")
    up: bool = Field(description="Whether the node was up at updatedTime.")
    up_seconds: float = Field(default=0.0, ge=0, description="Decayed seconds up.")
    down_seconds: float = Field(default=0.0, ge=0, description="Decayed seconds down.")
    faults: float = Field(default=0.0, ge=0, description="Decayed count of GPU failures.")
    failed_challenges: float = Field(
        default=0.0, ge=0, description="Decayed count of failed proofs of GPU."
    )
    health: str | None = Field(default=None, description="Health last seen.")
    judged_challenge: str | None = Field(
        default=None, description="The last failed challenge counted (each counts once)."
    )


class GPUNodeStatus(StatusModel):
    """What the node agent observed."""

    health: GPUHealth = Field(default="Unknown", description="Worst health of its GPUs.")
    gpu_count: int = Field(default=0, ge=0, description="GPUs found.")
    gpu_model: str | None = Field(default=None, description="Model of its GPUs.")
    gpus: Annotated[list[GPUInfo], Field(max_length=64, json_schema_extra=list_map("index"))] = (
        Field(default_factory=list, description="Each GPU's identity and health.")
    )
    driver_version: str | None = Field(default=None, description="NVIDIA driver version.")
    cuda_version: str | None = Field(default=None, description="CUDA driver API version.")
    heartbeat_time: datetime | None = Field(default=None, description="Last agent report.")
    mesh: MeshStatus | None = Field(default=None, description="WireGuard mesh membership.")
    challenge: Challenge | None = Field(
        default=None, description="The proof-of-GPU challenge in progress, by the operator."
    )
    proof: Proof | None = Field(
        default=None,
        description=(
            "The agent's answer to the last challenge: a claim, checked by the operator "
            "before anything counts on it."
        ),
    )
    verification: Verdict | None = Field(
        default=None, description="The operator's verdict on the proof of GPU."
    )
    reputation: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description="Track record from 0 to 1, by the operator (docs/security.md: the formula).",
    )
    track: Track | None = Field(
        default=None, description="What the operator has seen of the node (for reputation)."
    )
    observed_generation: int | None = Field(
        default=None, description="The metadata.generation this status describes."
    )
    conditions: Conditions = Field(default_factory=list, description="Ready, Verified, ...")


class GPUNode(ApiModel):
    """A supplier node in the mesh."""

    api_version: Literal["gpumesh.io/v1alpha1"] = Field(default=API_VERSION, alias="apiVersion")
    kind: Literal["GPUNode"] = "GPUNode"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: GPUNodeSpec
    status: GPUNodeStatus | None = None
