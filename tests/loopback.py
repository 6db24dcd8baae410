"""HTTP on 127.0.0.1 for tests that scrape a process they started."""

from __future__ import annotations

import http.client


def http_get(port: int, path: str) -> tuple[int, str]:
    """Status and body of one GET on loopback (a fresh connection each time)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, resp.read().decode()
    finally:
        conn.close()
