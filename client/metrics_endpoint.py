"""The site agent's opt-in HTTP endpoint: `/metrics` (Prometheus text) and `/healthz`, on loopback by default.

A small stdlib server rather than prometheus_client's `start_http_server`: that one serves its registry on every
path and has no health route, and its serving thread cannot be stopped by the agent that started it. This one
binds when it is made (a port in use fails before the agent starts anything), serves on a daemon thread, and
`stop` shuts it and its socket down, so it ends with the agent on every exit path.

It has no token: it is the site operator's own view, on the site's machine, of what `fedtune client status`
already prints there. Expose it beyond loopback only to the site's own monitoring network.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry

Health = Callable[[], tuple[int, dict[str, Any]]]


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _handler(registry: CollectorRegistry, health: Health) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "fedtune-agent"

        def do_GET(self) -> None:
            path = urlsplit(self.path).path
            host = urlsplit("//" + self.headers.get("Host", "")).hostname or ""
            if is_loopback(str(self.server.server_address[0])) and not is_loopback(host):
                # a page on another origin that rebinds its name to 127.0.0.1 would read the site's figures
                self._send(421, b"this endpoint answers requests for localhost only\n", "text/plain; charset=utf-8")
                return
            try:
                if path == "/metrics":
                    encode, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._send(200, encode(registry), content_type)
                elif path == "/healthz":
                    code, body = health()
                    self._send(code, (json.dumps(body, sort_keys=True) + "\n").encode(), "application/json")
                else:
                    self._send(404, b"not found: try /metrics or /healthz\n", "text/plain; charset=utf-8")
            except Exception as exc:  # one scrape's failure must not reach the agent; the scraper sees a 500
                self._send(500, f"{type(exc).__name__}: {exc}\n".encode(), "text/plain; charset=utf-8")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            """Silent: a scrape every few seconds would bury the agent's journal."""

    return Handler


class MetricsEndpoint:
    """`/metrics` and `/healthz` on `host:port` (port 0: any free one, see `port`); `start`, then `stop`."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, health: Health) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        server_class = type("_Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
        self._server: ThreadingHTTPServer = server_class((host, port), _handler(registry, health))
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="fedtune-metrics", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> MetricsEndpoint:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
