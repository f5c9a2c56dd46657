"""Real mutual-TLS handshakes with the SDK's contexts: stdlib HTTP server, requests, httpx, asyncio streams;
authorization on both sides; foreign trust domains; rotation of SVIDs and removal of CAs."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import threading
from collections.abc import Iterator

import httpx
import pytest
import requests
from support.web import QuietHandler

from tessera.sdk.bundle import BundleSet, X509Bundle
from tessera.sdk.errors import AuthorizationError
from tessera.sdk.http import SpiffeHTTPServer, httpx_async_transport, httpx_transport, requests_adapter
from tessera.sdk.source import StaticX509Source
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.svid import X509Svid
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import (
    PeerAuthorizationError,
    authorize_any,
    authorize_id,
    authorize_member_of,
    authorize_one_of,
    client_context,
    peer_spiffe_id,
    server_context,
)
from tessera.sdk.tls import open_connection as tls_open_connection
from tessera.sdk.tls import start_server as tls_start_server

SERVER_ID = "spiffe://example.org/server"
CLIENT_ID = "spiffe://example.org/client"


class Handler(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        peer = peer_spiffe_id(self.request)
        body = json.dumps({"peer": str(peer)}).encode()
        self.reply(body)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


@pytest.fixture(scope="module")
def foreign_ca() -> TestCA:
    return TestCA("other.org")


def serve(source: StaticX509Source, authorizer=None) -> tuple[SpiffeHTTPServer, str]:  # type: ignore[no-untyped-def]
    server = SpiffeHTTPServer(("127.0.0.1", 0), Handler, source=source, authorizer=authorizer or authorize_any())
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"https://127.0.0.1:{server.server_address[1]}/"


@pytest.fixture
def server(ca: TestCA) -> Iterator[tuple[StaticX509Source, str]]:
    source = StaticX509Source(ca.issue_svid(SERVER_ID), ca.x509_bundle())
    srv, url = serve(source, authorize_member_of("example.org"))
    yield source, url
    srv.shutdown()
    srv.server_close()


def test_authorizers() -> None:
    a = SpiffeId.parse("spiffe://example.org/a")
    b = SpiffeId.parse("spiffe://other.org/b")
    authorize_any()(a)
    authorize_id(a)(a)
    with pytest.raises(AuthorizationError, match="not the expected"):
        authorize_id(a)(b)
    authorize_one_of(a, "spiffe://example.org/c")(a)
    authorize_one_of([a])(a)
    with pytest.raises(AuthorizationError):
        authorize_one_of([a])(b)
    authorize_member_of("other.org")(b)
    with pytest.raises(AuthorizationError, match="not a member"):
        authorize_member_of("example.org")(b)


def test_contexts_use_strict_verification(ca: TestCA) -> None:
    source = StaticX509Source(ca.issue_svid(SERVER_ID), ca.x509_bundle())
    for ctx in (server_context(source, authorize_any()), client_context(source, authorize_any())):
        assert ctx.verify_flags & ssl.VERIFY_X509_STRICT
        assert ctx.verify_mode == ssl.CERT_REQUIRED
    inner = client_context(source, authorize_any()).current_context()  # type: ignore[attr-defined]
    assert inner.verify_flags & ssl.VERIFY_X509_STRICT and not inner.check_hostname


def test_requests_and_httpx_against_stdlib_server(ca: TestCA, server: tuple[StaticX509Source, str]) -> None:
    _, url = server
    client = StaticX509Source(ca.issue_svid(CLIENT_ID), ca.x509_bundle())
    session = requests.Session()
    session.mount("https://", requests_adapter(client, authorize_id(SERVER_ID)))
    for _ in range(3):
        assert session.get(url, timeout=10).json()["peer"] == CLIENT_ID
    with httpx.Client(transport=httpx_transport(client, authorize_id(SERVER_ID))) as hc:
        for _ in range(3):
            assert hc.get(url, timeout=10).json()["peer"] == CLIENT_ID

    async def go() -> str:
        async with httpx.AsyncClient(transport=httpx_async_transport(client, authorize_id(SERVER_ID))) as ac:
            return str((await ac.get(url, timeout=10)).json()["peer"])

    assert asyncio.run(go()) == CLIENT_ID


def test_client_refuses_unauthorized_server(ca: TestCA, server: tuple[StaticX509Source, str]) -> None:
    _, url = server
    client = StaticX509Source(ca.issue_svid(CLIENT_ID), ca.x509_bundle())
    session = requests.Session()
    session.mount("https://", requests_adapter(client, authorize_id("spiffe://example.org/not-the-server")))
    with pytest.raises(requests.exceptions.SSLError, match="not the expected"):
        session.get(url, timeout=10)
    with pytest.raises(requests.exceptions.SSLError, match="not the expected"):
        session.get(url, timeout=10, verify=False)  # cannot switch SPIFFE verification off
    with httpx.Client(transport=httpx_transport(client, authorize_id("spiffe://example.org/nope"))) as hc, \
            pytest.raises(httpx.ConnectError):
        hc.get(url, timeout=10)


def _raw_handshake(url: str, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    port = int(url.rsplit(":", 1)[1].strip("/"))
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return ctx.wrap_socket(sock, server_hostname="localhost")


def _get(tls: ssl.SSLSocket) -> bytes:
    """One HTTP/1.1 request on a raw TLS socket; returns everything the server sent before closing."""
    tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    data = b""
    while chunk := tls.recv(4096):
        data += chunk
    return data


def _server_refused(tls: ssl.SSLSocket) -> bool:
    """The server authorizes after its side of the handshake: the client then sees the connection closed."""
    try:
        tls.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        return tls.recv(100) == b""
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError):
        return True
    finally:
        tls.close()


def test_server_refuses_unauthorized_client(server: tuple[StaticX509Source, str]) -> None:
    _, url = server
    intruder_ca = TestCA("example.org")  # right trust domain name, but not the bundle the server trusts
    source, _ = server
    # Authorized chain, wrong ID: the server's authorizer is member_of(example.org), so use a different TD.
    other = TestCA("other.org")
    both = BundleSet([source.bundles[next(iter(source.bundles))], other.x509_bundle()])
    client = StaticX509Source(other.issue_svid("spiffe://other.org/client"), both)
    assert _server_refused(_raw_handshake(url, client_context(client, authorize_any())))
    # A chain from an unknown CA fails OpenSSL's verification in the handshake itself.
    stranger = StaticX509Source(intruder_ca.issue_svid(CLIENT_ID), both)
    assert _server_refused(_raw_handshake(url, client_context(stranger, authorize_any())))


def test_foreign_trust_domain_cannot_claim_our_ids(ca: TestCA, foreign_ca: TestCA) -> None:
    """With bundles of two trust domains in one store, a leaf for example.org signed by other.org's CA
    passes OpenSSL's chain check but must fail the re-verification against example.org's own bundle."""
    bundles = BundleSet([ca.x509_bundle(), foreign_ca.x509_bundle()])
    server_src = StaticX509Source(ca.issue_svid(SERVER_ID), bundles)
    srv, url = serve(server_src, authorize_any())
    try:
        forged = foreign_ca.issue_leaf(CLIENT_ID)
        forger = StaticX509Source(X509Svid.from_chain(forged.cert_chain, forged.private_key), bundles)
        assert _server_refused(_raw_handshake(url, client_context(forger, authorize_any())))
        honest = StaticX509Source(foreign_ca.issue_svid("spiffe://other.org/client"), bundles)
        tls = _raw_handshake(url, client_context(honest, authorize_id(SERVER_ID)))
        assert peer_spiffe_id(tls) == SpiffeId.parse(SERVER_ID)
        assert b"spiffe://other.org/client" in _get(tls)
        tls.close()
        # And the client side refuses a forged server the same way.
        forged_srv = foreign_ca.issue_leaf(SERVER_ID)
        forged_src = StaticX509Source(X509Svid.from_chain(forged_srv.cert_chain, forged_srv.private_key), bundles)
        srv2, url2 = serve(forged_src, authorize_any())
        try:
            with pytest.raises(PeerAuthorizationError, match="own trust domain"):
                _raw_handshake(url2, client_context(honest, authorize_any()))
        finally:
            srv2.shutdown()
            srv2.server_close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_intermediate_chains_reverify(ca: TestCA, foreign_ca: TestCA) -> None:
    inter = ca.issue_intermediate()
    bundles = BundleSet([ca.x509_bundle(), foreign_ca.x509_bundle()])
    srv, url = serve(StaticX509Source(inter.issue_svid(SERVER_ID), bundles), authorize_id(CLIENT_ID))
    try:
        client = StaticX509Source(inter.issue_svid(CLIENT_ID), bundles)
        tls = _raw_handshake(url, client_context(client, authorize_id(SERVER_ID)))
        assert CLIENT_ID.encode() in _get(tls)
        tls.close()
    finally:
        srv.shutdown()
        srv.server_close()


def test_asyncio_streams_authorize_both_sides(ca: TestCA) -> None:
    server_src = StaticX509Source(ca.issue_svid(SERVER_ID), ca.x509_bundle())
    client_src = StaticX509Source(ca.issue_svid(CLIENT_ID), ca.x509_bundle())
    bad_src = StaticX509Source(ca.issue_svid("spiffe://example.org/mallory"), ca.x509_bundle())

    async def main() -> None:
        seen: list[SpiffeId | None] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.append(peer_spiffe_id(writer))
            line = await reader.readline()
            writer.write(line.upper())
            await writer.drain()
            writer.close()

        srv = await tls_start_server(handle, "127.0.0.1", 0, server_src, authorize_id(CLIENT_ID))
        port = srv.sockets[0].getsockname()[1]
        reader, writer = await tls_open_connection("127.0.0.1", port, client_src, authorize_id(SERVER_ID))
        assert peer_spiffe_id(writer) == SpiffeId.parse(SERVER_ID)
        writer.write(b"hello\n")
        assert await reader.readline() == b"HELLO\n"
        writer.close()
        # The server refuses mallory: the client sees the connection end without an answer.
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=client_context(bad_src, authorize_any()))
        writer.write(b"hello\n")
        with contextlib.suppress(ConnectionResetError, ssl.SSLError):
            assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        # The client refuses a server that is not the one it wants.
        with pytest.raises(ssl.SSLError, match="not the expected"):
            await asyncio.open_connection(
                "127.0.0.1", port, ssl=client_context(client_src, authorize_id("spiffe://example.org/x"))
            )
        srv.close()
        await srv.wait_closed()
        assert seen == [SpiffeId.parse(CLIENT_ID)]

    asyncio.run(main())


def test_rotation_new_connections_use_new_svid_and_removed_ca_is_refused(ca: TestCA) -> None:
    new_ca = TestCA("example.org")
    both = X509Bundle(ca.trust_domain, (ca.certificate, new_ca.certificate))
    server_src = StaticX509Source(ca.issue_svid(SERVER_ID), both)
    client_src = StaticX509Source(ca.issue_svid(CLIENT_ID), both)
    srv, url = serve(server_src, authorize_id(CLIENT_ID))
    try:
        cctx = client_context(client_src, authorize_id(SERVER_ID))
        keep = _raw_handshake(url, cctx)  # an existing connection across every rotation below
        first = keep.getpeercert(binary_form=True)
        serials = {first}
        for _ in range(2):
            server_src.set(new_ca.issue_svid(SERVER_ID))
            client_src.set(new_ca.issue_svid(CLIENT_ID))
            tls = _raw_handshake(url, cctx)
            serials.add(tls.getpeercert(binary_form=True))
            assert CLIENT_ID.encode() in _get(tls)
            tls.close()
        assert len(serials) == 3
        assert CLIENT_ID.encode() in _get(keep)
        keep.close()
        # The old CA leaves the server's bundle: a client still holding an old-CA SVID is refused.
        server_src.set(bundles=new_ca.x509_bundle())
        old_client = StaticX509Source(ca.issue_svid(CLIENT_ID), both)
        assert _server_refused(_raw_handshake(url, client_context(old_client, authorize_id(SERVER_ID))))
        # ...and a client that dropped the old CA refuses a server still presenting an old-CA SVID.
        client_src.set(bundles=new_ca.x509_bundle())
        server_src.set(ca.issue_svid(SERVER_ID), both)
        with pytest.raises(ssl.SSLCertVerificationError):
            _raw_handshake(url, cctx)
    finally:
        srv.shutdown()
        srv.server_close()
