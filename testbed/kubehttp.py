"""A tiny, dependency-free client for the few API calls the harness itself makes.

The harness needs server-side apply (the KubeRay CRDs are too big for client-side
apply), GETs and health probes while components start. Raw HTTPS with the admin client
certificate does that in a few lines, with no client-library quirks around apply-patch
content types and no global configuration; tests use the real ``kubernetes`` client.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Final, cast

APPLY_CONTENT_TYPE: Final = "application/apply-patch+yaml"
FIELD_MANAGER: Final = "gpumesh-devcluster"


class KubeApiError(RuntimeError):
    """A non-2xx answer from the API server, with its status and body."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.status = status
        self.body = body


class KubeClient:
    """Authenticated JSON requests to one API server with a client certificate."""

    def __init__(
        self, server: str, *, ca: Path, cert: Path, key: Path, timeout: float = 15.0
    ) -> None:
        self.server = server.rstrip("/")
        self.timeout = timeout
        self._ctx = ssl.create_default_context(cafile=str(ca))
        self._ctx.load_cert_chain(str(cert), str(key))

    def raw(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> bytes:
        """Send one request and return the body; raises KubeApiError for non-2xx."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(
                req, context=self._ctx, timeout=timeout or self.timeout
            ) as resp:
                return bytes(resp.read())
        except urllib.error.HTTPError as exc:
            body_text = exc.read().decode(errors="replace")
            raise KubeApiError(method, path, exc.code, body_text) from None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """A JSON request; the decoded object (empty for an empty body)."""
        raw = self.raw(method, path, body, content_type=content_type, timeout=timeout)
        if not raw:
            return {}
        parsed = json.loads(raw)
        return cast(dict[str, Any], parsed) if isinstance(parsed, dict) else {"items": parsed}

    def get(self, path: str) -> dict[str, Any] | None:
        """GET that maps 404 to None, since "not there yet" is what callers poll for."""
        try:
            return self.request("GET", path)
        except KubeApiError as exc:
            if exc.status == 404:
                return None
            raise

    def apply(
        self, path: str, obj: dict[str, Any], *, field_manager: str = FIELD_MANAGER
    ) -> dict[str, Any]:
        """Server-side apply ``obj`` at ``path`` (the object's URL), taking ownership."""
        query = f"?fieldManager={field_manager}&force=true"
        return self.request("PATCH", path + query, obj, content_type=APPLY_CONTENT_TYPE, timeout=60)

    def delete(self, path: str) -> None:
        """DELETE that treats an already-gone object as success."""
        try:
            self.request("DELETE", path)
        except KubeApiError as exc:
            if exc.status != 404:
                raise

    def ok(self, path: str) -> bool:
        """True when ``path`` (e.g. /readyz) answers 2xx; any failure is just "not yet"."""
        try:
            self.raw("GET", path, timeout=3)
        except (KubeApiError, OSError):
            return False
        return True


def probe(url: str, *, timeout: float = 2.0) -> bool:
    """Anonymous health probe (self-signed serving certs are fine: it is loopback only)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    try:
        with urllib.request.urlopen(url, context=ctx, timeout=timeout) as resp:
            return 200 <= int(resp.status) < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False
