"""An in-memory API server for the reporter's tests (and a check that it behaves).

It knows the few resources the agent touches (GPUNodes and their status, Nodes and their
status, Leases) with the semantics the agent relies on: merge patch, strategic merge of
Node conditions by type, resourceVersion preconditions (409) and missing objects (404).
"""

from __future__ import annotations

import contextlib
import copy
import queue
import re
import time
from collections.abc import Iterator
from typing import Any

import pytest

from gpumesh.api.patch import apply_merge_patch
from gpumesh.node_agent.kube import JSON, MERGE_PATCH, STRATEGIC_MERGE_PATCH, KubeError

GPUNODES = "/apis/gpumesh.io/v1alpha1/gpunodes"
LEASES = re.compile(r"^/apis/coordination\.k8s\.io/v1/namespaces/([^/]+)/leases(?:/([^/]+))?$")


class FakeKube:
    """Objects by path; every write bumps resourceVersion."""

    def __init__(self) -> None:
        self.objects: dict[str, dict[str, Any]] = {}
        self.watchers: list[tuple[str, queue.Queue[dict[str, Any]]]] = []
        self.watch_timeout_s = 0.5
        self.namespaces = {"gpumesh-system"}
        self.writes: list[tuple[str, str]] = []
        self.down = False
        self._rv = 0

    # --- test helpers ------------------------------------------------------------------

    def add_node(self, name: str, **extra: Any) -> dict[str, Any]:
        node = {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": {}}}
        node = apply_merge_patch(node, extra)
        return self._store(f"/api/v1/nodes/{name}", node)

    def add_gpunode(self, name: str, **spec: Any) -> dict[str, Any]:
        body = {
            "apiVersion": "gpumesh.io/v1alpha1",
            "kind": "GPUNode",
            "metadata": {"name": name, "generation": 1},
            "spec": {"supplier": "acme", "region": "eu-west", "pricePerGpuHour": "2.10", **spec},
        }
        return self._store(f"{GPUNODES}/{name}", body)

    def node(self, name: str) -> dict[str, Any]:
        return self.objects[f"/api/v1/nodes/{name}"]

    def gpunode(self, name: str) -> dict[str, Any]:
        return self.objects[f"{GPUNODES}/{name}"]

    def clear_writes(self) -> None:
        self.writes.clear()

    # --- KubeApi -------------------------------------------------------------------------

    def _store(self, path: str, obj: dict[str, Any]) -> dict[str, Any]:
        self._rv += 1
        obj = copy.deepcopy(obj)
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self._rv)
        old = self.objects.get(path)
        if old is None:
            meta.setdefault("generation", 1)
        elif old.get("spec") != obj.get("spec"):
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self.objects[path] = obj
        for target, events in self.watchers:
            if target == path:
                events.put({"type": "MODIFIED" if old else "ADDED", "object": copy.deepcopy(obj)})
        return copy.deepcopy(obj)

    def watch(
        self, path: str, *, field_selector: str, timeout_s: int = 300
    ) -> Iterator[dict[str, Any]]:
        if self.down:
            raise KubeError("WATCH", path, None, "connection refused")
        target = f"{path}/{field_selector.split('=', 1)[1]}"
        events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.watchers.append((target, events))
        try:
            if target in self.objects:
                yield {"type": "ADDED", "object": copy.deepcopy(self.objects[target])}
            deadline = time.monotonic() + min(timeout_s, self.watch_timeout_s)
            while time.monotonic() < deadline:
                with contextlib.suppress(queue.Empty):
                    yield events.get(timeout=0.02)
        finally:
            self.watchers.remove((target, events))

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = JSON
    ) -> dict[str, Any]:
        if self.down:
            raise KubeError(method, path, None, "connection refused")
        if method == "GET":
            if path not in self.objects:
                raise KubeError(method, path, 404, "not found")
            return copy.deepcopy(self.objects[path])
        self.writes.append((method, path))
        lease = LEASES.match(path)
        if lease and lease.group(1) not in self.namespaces:
            raise KubeError(method, path, 404, f'namespaces "{lease.group(1)}" not found')
        if method == "POST":
            target = f"{path}/{body['metadata']['name']}"
            if target in self.objects:
                raise KubeError(method, path, 409, "already exists")
            return self._store(target, body)
        if method == "PUT":
            current = self.objects.get(path)
            if current is None:
                raise KubeError(method, path, 404, "not found")
            if body["metadata"].get("resourceVersion") != current["metadata"]["resourceVersion"]:
                raise KubeError(method, path, 409, "conflict")
            return self._store(path, body)
        assert method == "PATCH", method
        sub = path.endswith("/status")
        base = path.removesuffix("/status")
        current = self.objects.get(base)
        if current is None:
            raise KubeError(method, path, 404, "not found")
        wanted_rv = (body.get("metadata") or {}).get("resourceVersion")
        if wanted_rv is not None and wanted_rv != current["metadata"]["resourceVersion"]:
            raise KubeError(method, path, 409, "the object has been modified")
        if sub:
            if content_type == STRATEGIC_MERGE_PATCH:
                updated = copy.deepcopy(current)
                conditions = updated.setdefault("status", {}).setdefault("conditions", [])
                for cond in body["status"]["conditions"]:
                    conditions[:] = [c for c in conditions if c["type"] != cond["type"]]
                    conditions.append(cond)
            else:
                assert content_type == MERGE_PATCH
                updated = copy.deepcopy(current)
                updated["status"] = apply_merge_patch(current.get("status"), body["status"])
        else:
            assert content_type == MERGE_PATCH
            updated = apply_merge_patch(current, body)
        return self._store(base, updated)


def test_the_fake_honours_preconditions_and_merge_semantics() -> None:
    kube = FakeKube()
    node = kube.add_node("n1", spec={"taints": [{"key": "a", "effect": "NoSchedule"}]})
    with pytest.raises(KubeError) as info:
        kube.request(
            "PATCH",
            "/api/v1/nodes/n1",
            {"metadata": {"resourceVersion": "0"}},
            content_type=MERGE_PATCH,
        )
    assert info.value.status == 409
    patched = kube.request(
        "PATCH",
        "/api/v1/nodes/n1",
        {
            "metadata": {
                "resourceVersion": node["metadata"]["resourceVersion"],
                "labels": {"x": "1"},
            }
        },
        content_type=MERGE_PATCH,
    )
    assert patched["metadata"]["labels"] == {"x": "1"}
    assert patched["spec"]["taints"] == [{"key": "a", "effect": "NoSchedule"}]
    assert kube.get("/api/v1/nodes/nope") is None
    kube.down = True
    with pytest.raises(KubeError) as down:
        kube.get("/api/v1/nodes/n1")
    assert down.value.transient
