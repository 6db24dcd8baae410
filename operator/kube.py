"""The operator's one Kubernetes client wrapper: apply, patch status, delete.

kopf watches and posts events; everything the reconcilers write goes through here so
that field manager, content types and error handling are decided once.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Mapping
from typing import Any, cast

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from gpumesh.operator.leader import LeaseConflictError
from gpumesh.operator.rejection import Rejected, is_permanent
from gpumesh.operator.render.labels import FIELD_MANAGER

APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"
METADATA_ONLY = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


class Kube:
    """Thin, typed access to the few API calls the operator makes."""

    def __init__(self, api_client: client.ApiClient) -> None:
        self.custom = client.CustomObjectsApi(api_client)
        self.core = client.CoreV1Api(api_client)
        self.coordination = client.CoordinationV1Api(api_client)

    def apply_custom(
        self, group: str, version: str, plural: str, manifest: Mapping[str, Any]
    ) -> dict[str, Any]:
        """Server-side apply a namespaced custom object as gpumesh-operator, forcing.

        Returns the object as the API server answered, also when the apply created it
        (the client only decodes a 200 answer, and a creation answers 201). A refusal that
        retrying cannot fix raises :class:`Rejected` with the API server's message.
        """
        meta = manifest["metadata"]
        try:
            response: Any = self.custom.patch_namespaced_custom_object(
                group,
                version,
                meta["namespace"],
                plural,
                meta["name"],
                dict(manifest),
                field_manager=FIELD_MANAGER,
                force=True,
                _content_type=APPLY,
                _preload_content=False,
            )
        except ApiException as err:
            if err.status is not None and is_permanent(int(err.status)):
                raise rejected(err) from err
            raise
        try:
            return cast(dict[str, Any], json.loads(response.data))
        finally:
            response.release_conn()

    def patch_status(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str,
        name: str,
        status: Mapping[str, Any],
    ) -> str | None:
        """Merge-patch ``status``; keys set to None are removed. A vanished object is fine.

        Returns the object's new resourceVersion, so the writer can recognise the echo of
        its own write when the watch delivers it (None if the object is gone).
        """
        try:
            result = self.custom.patch_namespaced_custom_object_status(
                group,
                version,
                namespace,
                plural,
                name,
                {"status": dict(status)},
                field_manager=FIELD_MANAGER,
                _content_type=MERGE,
            )
        except ApiException as err:
            if err.status != 404:
                raise
            return None
        return resource_version(result)

    def delete_custom(
        self, group: str, version: str, plural: str, namespace: str, name: str
    ) -> None:
        try:
            self.custom.delete_namespaced_custom_object(group, version, namespace, plural, name)
        except ApiException as err:
            if err.status != 404:
                raise

    def patch_cluster_status(
        self, group: str, version: str, plural: str, name: str, patch: Mapping[str, Any]
    ) -> bool:
        """Merge-patch a cluster-scoped object's status subresource with ``patch`` (the
        whole ``{"status": ...}`` document). False when the object is gone."""
        try:
            self.custom.patch_cluster_custom_object_status(
                group,
                version,
                plural,
                name,
                dict(patch),
                field_manager=FIELD_MANAGER,
                _content_type=MERGE,
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise
        return True

    def list_cluster_custom(self, group: str, version: str, plural: str) -> list[dict[str, Any]]:
        found = cast(dict[str, Any], self.custom.list_cluster_custom_object(group, version, plural))
        return cast(list[dict[str, Any]], found.get("items", []))

    def list_nodes(self) -> list[dict[str, Any]]:
        """Every Node, as plain JSON."""
        response: Any = self.core.list_node(_preload_content=False)
        try:
            return cast(list[dict[str, Any]], json.loads(response.data).get("items") or [])
        finally:
            response.release_conn()

    def list_pods(self, namespace: str, label_selector: str) -> list[dict[str, Any]]:
        """Pods of one namespace matching ``label_selector``, as plain JSON."""
        response: Any = self.core.list_namespaced_pod(
            namespace, label_selector=label_selector, _preload_content=False
        )
        try:
            return cast(list[dict[str, Any]], json.loads(response.data).get("items") or [])
        finally:
            response.release_conn()

    def list_leases(self, namespace: str) -> list[dict[str, Any]]:
        """Leases of one namespace, as plain JSON (camelCase keys, like a watch delivers)."""
        found = self.coordination.list_namespaced_lease(namespace)
        return cast(list[dict[str, Any]], self.plain(found).get("items", []))

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Lease as plain JSON, or None when it does not exist."""
        try:
            found = self.coordination.read_namespaced_lease(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return self.plain(found)

    def get_configmap(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A ConfigMap as plain JSON, or None when it does not exist."""
        try:
            found = self.core.read_namespaced_config_map(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return self.plain(found)

    def plain(self, model: Any) -> dict[str, Any]:
        return cast(dict[str, Any], self.core.api_client.sanitize_for_serialization(model))

    def apply_configmap(self, manifest: Mapping[str, Any]) -> str | None:
        """Server-side apply a ConfigMap as gpumesh-operator, forcing; its resourceVersion."""
        meta = manifest["metadata"]
        written = self.core.patch_namespaced_config_map(
            meta["name"],
            meta["namespace"],
            dict(manifest),
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type=APPLY,
        )
        return resource_version(self.plain(written))

    def configmap_version(self, namespace: str, name: str) -> str | None:
        """A ConfigMap's resourceVersion, reading its metadata only (the catalogue can be
        hundreds of kilobytes); None when it does not exist."""
        try:
            response: Any = self.core.read_namespaced_config_map(
                name, namespace, _preload_content=False, _headers={"Accept": METADATA_ONLY}
            )
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        try:
            return resource_version(json.loads(response.data))
        finally:
            response.release_conn()


_lock = threading.Lock()
_shared: Kube | None = None


class LeaseStore:
    """One Lease read and written whole, with resourceVersion preconditions: what leader
    election needs (:class:`gpumesh.operator.leader.LeaseStore`)."""

    def __init__(self, kube: Kube, namespace: str, name: str) -> None:
        self._kube, self._namespace, self._name = kube, namespace, name

    def read(self) -> dict[str, Any] | None:
        return self._kube.get_lease(self._namespace, self._name)

    def create(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._write(self._kube.coordination.create_namespaced_lease, body)

    def replace(self, body: Mapping[str, Any]) -> dict[str, Any]:
        return self._write(self._kube.coordination.replace_namespaced_lease, body, self._name)

    def _write(self, call: Any, body: Mapping[str, Any], *name: str) -> dict[str, Any]:
        try:
            written = call(*name, self._namespace, dict(body), field_manager=FIELD_MANAGER)
        except ApiException as err:
            if err.status == 409:
                raise LeaseConflictError(str(err.reason)) from err
            raise
        return self._kube.plain(written)


def shared() -> Kube:
    """The process's client, from the in-cluster account or KUBECONFIG."""
    global _shared
    with _lock:
        if _shared is None:
            try:
                config.load_incluster_config()  # type: ignore[no-untyped-call]
            except config.ConfigException:
                config.load_kube_config()  # type: ignore[no-untyped-call]
            configuration = client.Configuration.get_default_copy()
            configuration.connection_pool_maxsize = 32
            _shared = Kube(client.ApiClient(configuration))
        return _shared


def resource_version(obj: Any) -> str | None:
    version = ((obj or {}).get("metadata") or {}).get("resourceVersion")
    return str(version) if version is not None else None


def rejected(err: ApiException) -> Rejected:
    """The API server's refusal, with its own message (from the Status it answered)."""
    status = int(err.status or 0)
    try:
        body = json.loads(err.body or "{}")
    except (TypeError, ValueError):
        body = {}
    if not isinstance(body, dict):
        body = {}
    reason = str(body.get("reason") or err.reason or "")
    message = str(body.get("message") or err.body or err.reason or "")
    return Rejected(status, reason, message)
