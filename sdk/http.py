"""HTTP clients and servers over SPIFFE mutual TLS: a ``requests`` transport adapter, ``httpx`` transports and
a stdlib ``http.server``/``socketserver`` mix-in.

``requests`` and ``httpx`` are optional extras (``pip install tessera[requests]`` / ``tessera[httpx]``),
imported only when their helper is called. The server authorizes each client with the context from
:func:`tessera.sdk.tls.server_context`; the clients authorize the server's SPIFFE ID with
:func:`tessera.sdk.tls.client_context` instead of checking a host name.
"""

from __future__ import annotations

import contextlib
import http.server
import logging
import socketserver
import ssl
from typing import TYPE_CHECKING, Any

from tessera.sdk.source import X509SnapshotSource
from tessera.sdk.tls import Authorizer, client_context, peer_spiffe_id, server_context

if TYPE_CHECKING:
    import httpx
    import requests.adapters

log = logging.getLogger(__name__)

__all__ = [
    "SpiffeHTTPServer",
    "TLSServerMixin",
    "httpx_async_transport",
    "httpx_transport",
    "peer_spiffe_id",
    "requests_adapter",
]


# -- server side -----------------------------------------------------------------------------------------


class TLSServerMixin:
    """Mix into a ``socketserver`` TCP server (before the server class) to speak mutual TLS.

    The handshake runs in ``finish_request`` (the per-request thread with ThreadingMixIn), not in
    ``accept``, so a slow or hostile client cannot stall the accept loop. A client whose chain or SPIFFE ID
    is refused is dropped and logged; handlers read the caller's ID with ``peer_spiffe_id(self.request)``.
    """

    ssl_context: ssl.SSLContext
    handshake_timeout: float = 10.0

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.handshake_timeout)
            tls = self.ssl_context.wrap_socket(request, server_side=True, do_handshake_on_connect=False)
        except (OSError, ValueError) as exc:
            log.info("TLS setup with %s failed: %s", client_address, exc)
            return
        try:
            tls.do_handshake()
            tls.settimeout(getattr(self, "request_timeout", None))
        except (OSError, ValueError) as exc:
            log.info("TLS handshake with %s refused: %s", client_address, exc)
            with contextlib.suppress(OSError):
                tls.close()
            return
        try:
            super().finish_request(tls, client_address)  # type: ignore[misc]
        finally:
            with contextlib.suppress(OSError):
                tls.close()

    def shutdown_request(self, request: Any) -> None:
        # The plain socket was detached into the TLS socket (closed above); nothing left to shut down.
        with contextlib.suppress(OSError):
            request.close()


class SpiffeHTTPServer(TLSServerMixin, http.server.ThreadingHTTPServer):
    """A threading ``http.server`` speaking mutual TLS with SPIFFE identities.

    ``SpiffeHTTPServer(("127.0.0.1", 0), Handler, source=x509_source, authorizer=authorize_id(...))``;
    inside the handler, ``peer_spiffe_id(self.request)`` is the authorized caller.
    """

    daemon_threads = True

    def __init__(
        self,
        server_address: tuple[str, int],
        handler: type[socketserver.BaseRequestHandler],
        *,
        source: X509SnapshotSource | None = None,
        authorizer: Authorizer | None = None,
        ssl_context: ssl.SSLContext | None = None,
        bind_and_activate: bool = True,
    ) -> None:
        if ssl_context is None:
            if source is None or authorizer is None:
                raise ValueError("SpiffeHTTPServer needs source= and authorizer= (or a ready ssl_context=)")
            ssl_context = server_context(source, authorizer)
        self.ssl_context = ssl_context
        super().__init__(server_address, handler, bind_and_activate)


# -- requests --------------------------------------------------------------------------------------------


def requests_adapter(
    source: X509SnapshotSource, authorizer: Authorizer, **kwargs: Any
) -> requests.adapters.HTTPAdapter:
    """A ``requests`` transport adapter for ``https://`` URLs served by SPIFFE workloads::

        session = requests.Session()
        session.mount("https://", requests_adapter(source, authorize_id("spiffe://example.org/api")))

    The server is verified against the source's bundles and authorized by SPIFFE ID, not by host name or
    the system CA store; ``verify=False`` on a request cannot switch that off.
    """
    from requests.adapters import HTTPAdapter

    ctx = client_context(source, authorizer)

    class SpiffeAdapter(HTTPAdapter):
        def init_poolmanager(self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any) -> None:
            pool_kwargs["ssl_context"] = ctx
            pool_kwargs["assert_hostname"] = False
            super().init_poolmanager(connections, maxsize, block, **pool_kwargs)

        def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
            # Through an HTTPS-capable proxy, the tunnelled connection to the server uses the same context.
            proxy_kwargs["ssl_context"] = ctx
            proxy_kwargs["assert_hostname"] = False
            return super().proxy_manager_for(proxy, **proxy_kwargs)

        def cert_verify(self, conn: Any, url: str, verify: Any, cert: Any) -> None:
            # No CA files and no client certificate files: the context already carries both.
            conn.cert_reqs = "CERT_REQUIRED"
            conn.ca_certs = None
            conn.ca_cert_dir = None

        def build_connection_pool_key_attributes(self, request: Any, verify: Any, cert: Any = None) -> Any:
            # Whatever verify/cert a request passes, the pool is keyed (and configured) as verifying.
            return super().build_connection_pool_key_attributes(request, True, None)

    return SpiffeAdapter(**kwargs)


# -- httpx -----------------------------------------------------------------------------------------------


def httpx_transport(source: X509SnapshotSource, authorizer: Authorizer, **kwargs: Any) -> httpx.HTTPTransport:
    """An ``httpx.HTTPTransport`` for SPIFFE mutual TLS: ``httpx.Client(transport=httpx_transport(...))``."""
    import httpx

    return httpx.HTTPTransport(verify=client_context(source, authorizer), **kwargs)


def httpx_async_transport(
    source: X509SnapshotSource, authorizer: Authorizer, **kwargs: Any
) -> httpx.AsyncHTTPTransport:
    """The ``httpx.AsyncHTTPTransport`` twin of :func:`httpx_transport`."""
    import httpx

    return httpx.AsyncHTTPTransport(verify=client_context(source, authorizer), **kwargs)
