"""The bundle endpoint: this trust domain's SPIFFE bundle document over HTTPS, for other trust domains.

``GET /`` answers the current bundle document (``spiffe_sequence`` and ``spiffe_refresh_hint`` included, so a
foreign refresher knows when to come back); ``GET /crl`` answers the CA's current CRLs as concatenated PEM,
for relying parties in other domains that check revocation. Nothing else is served, nothing is accepted
from the client beyond a request line and headers (bounded in size and time), and every connection closes
after one answer: the endpoint is polled every few minutes, never a hot path.

TLS: ``https_web`` presents a certificate and key read from configured files (re-read when they change, so a
certificate renewed by an ACME client is picked up); ``https_spiffe`` presents the server's own X509-SVID,
swapped in whenever the server renews it. Both use one fixed front context whose ``sni_callback`` switches
each handshake to the current immutable context (a live context is never reconfigured); every context comes
from the SDK's one factory (:mod:`tessera.sdk.tlscontext`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
from collections.abc import Callable, Sequence
from email.utils import formatdate
from pathlib import Path

from cryptography import x509

from tessera.sdk.keys import PrivateKey
from tessera.sdk.tlscontext import build_context, switching_server_context

log = logging.getLogger("tessera.server.federation.endpoint")

MAX_REQUEST_BYTES = 16 * 1024
REQUEST_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0


def svid_context(chain: Sequence[x509.Certificate], key: PrivateKey) -> ssl.SSLContext:
    """``https_spiffe``: the server's own X509-SVID (leaf first, then intermediates)."""
    return build_context(True, chain=chain, key=key, verify_mode=ssl.CERT_NONE)  # anyone may read a public bundle


def web_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """``https_web``: a Web PKI certificate chain and its key from files (ValueError naming the file)."""
    try:
        return build_context(True, cert_file=cert_file, key_file=key_file, verify_mode=ssl.CERT_NONE)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"federation_cert/federation_key ({cert_file}, {key_file}): cannot load: {exc}") from None


class WebCertificateFiles:
    """Re-reads the https_web certificate and key when either file changes (e.g. renewed by an ACME client)."""

    def __init__(self, cert_file: Path, key_file: Path) -> None:
        self.cert_file, self.key_file = cert_file, key_file
        self._stamp = self._read_stamp()
        self.context = web_context(cert_file, key_file)

    def _read_stamp(self) -> tuple[float, float, int, int]:
        c, k = os.stat(self.cert_file), os.stat(self.key_file)
        return (c.st_mtime, k.st_mtime, c.st_size, k.st_size)

    def reload_if_changed(self) -> ssl.SSLContext | None:
        try:
            stamp = self._read_stamp()
        except OSError as exc:
            log.warning("bundle endpoint certificate files unreadable (keeping the loaded ones): %s", exc)
            return None
        if stamp == self._stamp:
            return None
        try:
            ctx = web_context(self.cert_file, self.key_file)
        except ValueError as exc:
            log.warning("bundle endpoint certificate not reloaded (keeping the loaded one): %s", exc)
            return None
        self._stamp, self.context = stamp, ctx
        log.info("bundle endpoint certificate reloaded from %s", self.cert_file)
        return ctx


def _response(status: str, body: bytes, content_type: str, head: bool) -> bytes:
    headers = [
        f"HTTP/1.1 {status}",
        f"Date: {formatdate(usegmt=True)}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(headers).encode("ascii") + (b"" if head else body)


class BundleEndpoint:
    """The HTTPS server. ``document()`` and ``crls_pem()`` are called per request (keep them cheap)."""

    def __init__(
        self,
        host: str,
        port: int,
        context: ssl.SSLContext,
        document: Callable[[], bytes],
        crls_pem: Callable[[], bytes] = lambda: b"",
    ) -> None:
        self._host, self._port = host, port
        self._current = context
        self._document = document
        self._crls_pem = crls_pem
        self._server: asyncio.Server | None = None
        self._front: ssl.SSLContext = switching_server_context(lambda: self._current, verify_mode=ssl.CERT_NONE)
        self.port = 0

    def set_context(self, context: ssl.SSLContext) -> None:
        """New connections present this certificate from now on."""
        self._current = context

    async def start(self) -> int:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, ssl=self._front, ssl_handshake_timeout=HANDSHAKE_TIMEOUT
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("bundle endpoint listening on %s:%d", self._host, self.port)
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), REQUEST_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            if len(head) > MAX_REQUEST_BYTES:
                writer.write(_response("431 Request Header Fields Too Large", b"", "text/plain", False))
                return
            writer.write(self._answer(head))
            with contextlib.suppress(ConnectionError, TimeoutError):
                await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT)
        except Exception:
            log.exception("bundle endpoint request failed")
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    def _answer(self, head: bytes) -> bytes:
        try:
            method, target, _version = head.split(b"\r\n", 1)[0].decode("ascii").split(" ")
        except (UnicodeDecodeError, ValueError):
            return _response("400 Bad Request", b"malformed request line\n", "text/plain", False)
        is_head = method == "HEAD"
        if method not in ("GET", "HEAD"):
            return _response("405 Method Not Allowed", b"only GET\n", "text/plain", False)
        path = target.split("?", 1)[0]
        if path == "/":
            return _response("200 OK", self._document(), "application/json", is_head)
        if path == "/crl":
            return _response("200 OK", self._crls_pem(), "application/pkix-crl", is_head)
        return _response("404 Not Found", b"not found: GET / for the bundle, /crl for the CRLs\n", "text/plain", False)


__all__ = ["BundleEndpoint", "WebCertificateFiles", "svid_context", "web_context"]
