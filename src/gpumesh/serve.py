"""The one small HTTP server of gpumesh processes: /metrics and health probes.

Operator and agents both serve Prometheus metrics and a /healthz for the kubelet from a
threaded server of their own, beside their event loops rather than on them: a scrape or a
probe is answered even while a loop is busy, and the answer reports that loop's liveness.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

Answer = tuple[int, bytes, str]
"""HTTP status, body and content type."""
Route = Callable[[], Answer]
HealthCheck = Callable[[], tuple[bool, str]]
"""Healthy or not, and a line that says why."""


def health_route(check: HealthCheck) -> Route:
    """200 with the check's line when healthy, else 503: what a kubelet probe reads."""

    def answer() -> Answer:
        ok, text = check()
        return (200 if ok else 503), (text + "\n").encode(), "text/plain; charset=utf-8"

    return answer


def registry_route(registry: CollectorRegistry) -> Route:
    """A Prometheus registry in the text exposition format."""
    return lambda: (200, generate_latest(registry), CONTENT_TYPE_LATEST)


class HttpServer:
    """Answers GET for each path in ``routes`` (the query string ignored), 404 otherwise."""

    def __init__(self, host: str, port: int, routes: Mapping[str, Route]) -> None:
        self._routes = dict(routes)
        self._server = ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def route(self, path: str, answer: Route) -> None:
        """Add or replace a path's answer while serving (a process that changes role)."""
        self._routes[path] = answer

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        routes = self._routes

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as Prometheus scrapes
            # Headers and body go out in two writes; with Nagle on, a keep-alive client's
            # delayed ACK would add 40 ms to every scrape.
            disable_nagle_algorithm = True

            def do_GET(self) -> None:
                answer = routes.get(self.path.split("?", 1)[0])
                if answer is None:
                    known = " or ".join(sorted(routes))
                    self._send(404, f"not found: try {known}\n".encode(), "text/plain")
                    return
                self._send(*answer())

            def _send(self, code: int, body: bytes, content_type: str) -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                log.debug("http: " + format, *args)

        return Handler

    def start(self, name: str = "http") -> HttpServer:
        self._thread = threading.Thread(target=self._server.serve_forever, name=name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)
