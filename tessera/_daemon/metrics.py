"""The ``/metrics`` HTTP listener shared by tessera-server and tessera-agent.

Only the two daemons serve metrics, and it pulls in prometheus-client, which the ``agent`` and ``server`` extras
install and a workload's plain ``pip install tessera`` does not: so it lives here, not in the public SDK.
"""

from __future__ import annotations

import logging
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class MetricsListener:
    """The ``/metrics`` HTTP endpoint on its own thread (prometheus-client's WSGI server)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def start(self, host: str, port: int) -> int:
        """Binds and serves; returns the bound port (``port`` 0 asks the kernel for one). Raises OSError."""
        server, thread = start_http_server(port, addr=host, registry=self._registry)
        self._server, self._thread = server, thread
        bound: int = server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", bound)
        return bound

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
