"""The agent's one Kubernetes client: raw JSON requests over the official client's plumbing.

The ``kubernetes`` package supplies configuration (kubeconfig or in-cluster service
account, token refresh, TLS); requests go through its ``ApiClient`` with plain dicts in
and out. That skips model (de)serialisation, which would cost more CPU than everything
else the agent does, and lets each patch name its content type (merge patch for the
GPUNode status and Node metadata, strategic merge for Node conditions). All calls are
synchronous and bounded by timeouts; the reporter runs them on a worker thread.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any, Final, Protocol
from urllib.parse import urlencode

from kubernetes.client import ApiClient, Configuration
from kubernetes.client.exceptions import ApiException
from kubernetes.config import load_incluster_config, load_kube_config

MERGE_PATCH: Final = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH: Final = "application/strategic-merge-patch+json"
JSON: Final = "application/json"


class KubeError(Exception):
    """An API call failed: ``status`` is the HTTP status, None when nothing answered."""

    def __init__(self, method: str, path: str, status: int | None, detail: str) -> None:
        where = f"{method} {path}"
        super().__init__(f"{where} -> {status or 'no answer'}: {detail[:500]}")
        self.status = status
        self.detail = detail

    @property
    def transient(self) -> bool:
        """Worth retrying with backoff: no answer, overload, or a server error."""
        return self.status is None or self.status == 429 or self.status >= 500


class KubeApi(Protocol):
    """What the reporter needs from a client (tests pass an in-memory fake)."""

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = JSON
    ) -> dict[str, Any]: ...

    def get(self, path: str) -> dict[str, Any] | None: ...

    def watch(
        self, path: str, *, field_selector: str, timeout_s: int = 300
    ) -> Iterator[dict[str, Any]]:
        """Watch events (``{"type", "object"}``) of a collection until the server ends it."""
        ...


class RestKubeApi:
    """:class:`KubeApi` over ``kubernetes.client.ApiClient``."""

    def __init__(self, client: ApiClient, *, timeout: tuple[float, float] = (3.05, 10.0)) -> None:
        self._client = client
        self._timeout = timeout

    @classmethod
    def connect(cls, kubeconfig: str | None) -> RestKubeApi | None:
        """From a kubeconfig file, else the in-cluster service account, else None."""
        cfg = Configuration()
        if kubeconfig:
            load_kube_config(config_file=kubeconfig, client_configuration=cfg)  # type: ignore[no-untyped-call]
        elif os.environ.get("KUBERNETES_SERVICE_HOST"):
            load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        else:
            return None
        # One quick retry at most: the reporter has its own backoff, and a long urllib3
        # retry chain would hide an outage from it.
        cfg.retries = 1
        return cls(ApiClient(configuration=cfg))

    def request(
        self, method: str, path: str, body: Any = None, *, content_type: str = JSON
    ) -> dict[str, Any]:
        headers = {"Accept": JSON}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            _, url, header_params, payload, _ = self._client.param_serialize(
                method=method,
                resource_path=path,
                header_params=headers,
                body=body,
                auth_settings=["BearerToken"],
            )
            response = self._client.call_api(
                method,
                url,
                header_params=header_params,
                body=payload,
                _request_timeout=self._timeout,
            )
            data = response.read()  # type: ignore[no-untyped-call]
        except ApiException as err:
            raise KubeError(method, path, err.status or None, str(err.reason)) from None
        except Exception as err:  # urllib3 connection, timeout and protocol errors
            raise KubeError(method, path, None, f"{type(err).__name__}: {err}") from None
        text = data.decode(errors="replace") if isinstance(data, bytes) else str(data or "")
        if not 200 <= response.status < 300:
            raise KubeError(method, path, response.status, text)
        if not text:
            return {}
        parsed = json.loads(text)
        return parsed if isinstance(parsed, dict) else {"items": parsed}

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", path)
        except KubeError as err:
            if err.status == 404:
                return None
            raise

    def watch(
        self, path: str, *, field_selector: str, timeout_s: int = 300
    ) -> Iterator[dict[str, Any]]:
        query = urlencode(
            {"watch": "1", "fieldSelector": field_selector, "timeoutSeconds": str(timeout_s)}
        )
        try:
            _, url, header_params, _, _ = self._client.param_serialize(
                method="GET",
                resource_path=f"{path}?{query}",
                header_params={"Accept": JSON},
                auth_settings=["BearerToken"],
            )
            response = self._client.call_api(
                "GET",
                url,
                header_params=header_params,
                _request_timeout=(self._timeout[0], timeout_s + 15.0),
            )
        except ApiException as err:
            raise KubeError("WATCH", path, err.status or None, str(err.reason)) from None
        except Exception as err:
            raise KubeError("WATCH", path, None, f"{type(err).__name__}: {err}") from None
        raw: Any = response.response  # urllib3's response, not read yet: it streams
        try:
            if not 200 <= response.status < 300:
                raise KubeError("WATCH", path, response.status, raw.read().decode(errors="replace"))
            for line in raw:
                if not line.strip():
                    continue
                event = json.loads(line)
                if event.get("type") == "ERROR":
                    status = event.get("object") or {}
                    raise KubeError("WATCH", path, status.get("code"), str(status.get("message")))
                yield event
        except KubeError:
            raise
        except Exception as err:  # the connection broke mid-stream
            raise KubeError("WATCH", path, None, f"{type(err).__name__}: {err}") from None
        finally:
            raw.release_conn()

    def close(self) -> None:
        self._client.close()  # type: ignore[no-untyped-call]
