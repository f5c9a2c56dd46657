"""One table of peers, run against every path that verifies one: the peer verifier itself, the ``ssl`` contexts
on both sides (real handshakes with ``server_context`` and ``client_context``) and the gRPC interceptors, sync
and ``grpc.aio`` (real servers with ``server_credentials`` and the interceptor given the same source). Every
path must accept and refuse exactly the peers the table says, with servers trusting one trust domain and
two, and where the verifier (not the TLS library) refused, say so in the same words."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from tessera.sdk.bundle import BundleSet
from tessera.sdk.errors import AuthorizationError
from tessera.sdk.grpc import AsyncSpiffeServerInterceptor, SpiffeServerInterceptor, current_peer_id, server_credentials
from tessera.sdk.keys import PrivateKey, private_key_to_pem
from tessera.sdk.peer import PeerAuthorizationError, PeerVerifier
from tessera.sdk.source import X509Snapshot
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.svid import certificates_to_pem
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import client_context, peer_spiffe_id, server_context
from tessera.sdk.tlscontext import build_context

TD = "example.org"
SERVER_ID = f"spiffe://{TD}/server"
CLIENT_ID = f"spiffe://{TD}/client"
DNS = "server.example.internal"
HOUR = dt.timedelta(hours=1)


def authorizer(peer: SpiffeId) -> None:
    """A custom authorizer (any callable raising AuthorizationError): everyone verified but ``/denied``."""
    if peer.path == "/denied":
        raise AuthorizationError(f"{peer} is denied by policy")


Chain = tuple[tuple[x509.Certificate, ...], PrivateKey] | None


@dataclass(frozen=True)
class Cas:
    ours: TestCA
    partner: TestCA  # a federated trust domain the server trusts too
    stranger: TestCA  # claims our trust domain's name; nobody trusts it
    revoked: Chain  # an SVID of ours, listed on the CRL the servers' snapshot carries


def _svid(issuer: TestCA, spiffe_id: str) -> Chain:
    svid = issuer.issue_svid(spiffe_id)
    return svid.cert_chain, svid.private_key


def _leaf(issuer: TestCA, spiffe_id: str | None = "/workload", **knobs: Any) -> Chain:
    """A leaf built from explicit knobs, not checked (see TestCA.issue_leaf)."""
    issued = issuer.issue_leaf(spiffe_id, **knobs)
    return issued.cert_chain, issued.private_key


def _dated(issuer: TestCA, start: dt.timedelta, end: dt.timedelta) -> Chain:
    now = issuer.now()
    return _leaf(issuer, not_before=now + start, not_after=now + end)


@dataclass(frozen=True)
class Row:
    name: str
    make: Callable[[Cas], Chain]
    accepted: bool
    federated_only: bool = False  # accepted only where the partner's bundle is trusted too

    def expected(self, federated: bool) -> bool:
        return self.accepted and (federated or not self.federated_only)


ROWS = [
    Row("good SVID", lambda c: _svid(c.ours, CLIENT_ID), True),
    Row("good SVID through an intermediate", lambda c: _svid(c.ours.issue_intermediate(), "/via-intermediate"), True),
    Row("SVID of a federated trust domain", lambda c: _svid(c.partner, "spiffe://partner.org/client"), True, True),
    Row("authorizer says no", lambda c: _svid(c.ours, "/denied"), False),
    Row("our CA signing another trust domain's ID", lambda c: _leaf(c.ours, "spiffe://partner.org/client"), False),
    Row("our CA signing an unknown trust domain's ID", lambda c: _leaf(c.ours, "spiffe://unknown.org/x"), False),
    Row("foreign CA's chain presented as ours", lambda c: _leaf(c.partner, "spiffe://example.org/admin"), False),
    Row("untrusted CA with our trust domain's name", lambda c: _svid(c.stranger, CLIENT_ID), False),
    Row("two URI SANs", lambda c: _leaf(c.ours, uri_sans=[CLIENT_ID, f"spiffe://{TD}/other"]), False),
    Row("no URI SAN", lambda c: _leaf(c.ours, None, dns_names=["client.example.org"]), False),
    Row("URI SAN that is no SPIFFE ID", lambda c: _leaf(c.ours, uri_sans=["https://example.org/client"]), False),
    Row("trust domain ID without a path", lambda c: _leaf(c.ours, uri_sans=[f"spiffe://{TD}"]), False),
    Row("CA certificate as leaf", lambda c: _leaf(c.ours, ca=True, key_cert_sign=True, digital_signature=False), False),
    Row("leaf that may sign certificates", lambda c: _leaf(c.ours, key_cert_sign=True), False),
    Row("revoked by a CRL", lambda c: c.revoked, False),
    Row("expired", lambda c: _dated(c.ours, -2 * HOUR, -HOUR), False),
    Row("not yet valid", lambda c: _dated(c.ours, HOUR, 2 * HOUR), False),
    Row("no certificate at all", lambda c: None, False),
]


def _crl(ca: TestCA, *serials: int) -> bytes:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - dt.timedelta(minutes=1))
        .next_update(now + HOUR)
    )
    for serial in serials:
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(Encoding.DER)  # type: ignore[arg-type]


class FixedSource:
    def __init__(self, snapshot: X509Snapshot) -> None:
        self._snapshot = snapshot

    def snapshot(self) -> X509Snapshot:
        return self._snapshot


@dataclass(frozen=True)
class Outcome:
    accepted: bool
    detail: str  # the accepted peer ID, or why it was refused
    by_verifier: bool = False  # refused after the handshake, by the peer verifier (not by the TLS library)


# -- the paths ---------------------------------------------------------------------------------------------


def verifier_path(snapshot: X509Snapshot, chain: Chain) -> Outcome:
    ders = [] if chain is None else [c.public_bytes(Encoding.DER) for c in chain[0]]
    try:
        peer = PeerVerifier(snapshot.bundles, snapshot.crls).verify(ders, authorizer)
    except PeerAuthorizationError as exc:
        return Outcome(False, str(exc), by_verifier=True)
    return Outcome(True, str(peer))


def _raw_context(server_side: bool, chain: Chain) -> ssl.SSLContext:
    """A context that presents ``chain`` as is and trusts anything: the other side is the one judging."""
    if chain is None:
        return build_context(server_side, verify_mode=ssl.CERT_NONE)
    return build_context(server_side, chain=chain[0], key=chain[1], verify_mode=ssl.CERT_NONE)


def tls_server_path(snapshot: X509Snapshot, chain: Chain) -> Outcome:
    """Our server_context judges a client presenting ``chain``."""
    sctx = server_context(FixedSource(snapshot), authorizer)
    listener = socket.create_server(("127.0.0.1", 0))
    outcome: list[Outcome] = []

    def accept() -> None:
        raw, _ = listener.accept()
        raw.settimeout(10)
        try:
            with sctx.wrap_socket(raw, server_side=True) as tls:
                outcome.append(Outcome(True, str(peer_spiffe_id(tls))))
                tls.sendall(b"ok")
        except PeerAuthorizationError as exc:
            outcome.append(Outcome(False, str(exc), by_verifier=True))
        except (OSError, ssl.SSLError) as exc:
            outcome.append(Outcome(False, f"handshake: {exc}"))

    server = threading.Thread(target=accept)
    server.start()
    try:
        with (
            socket.create_connection(listener.getsockname(), timeout=10) as raw,
            _raw_context(False, chain).wrap_socket(raw) as tls,
        ):
            tls.recv(2)
    except (OSError, ssl.SSLError):
        pass  # the server's side of the story is the one recorded
    finally:
        server.join(20)
        listener.close()
    return outcome[0]


def tls_client_path(snapshot: X509Snapshot, chain: Chain) -> Outcome:
    """Our client_context judges a server presenting ``chain``."""
    assert chain is not None
    raw_server = _raw_context(True, chain)
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        raw, _ = listener.accept()
        raw.settimeout(10)
        try:
            with raw_server.wrap_socket(raw, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError):
            pass

    server = threading.Thread(target=accept)
    server.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=10) as raw:
            cctx = client_context(FixedSource(snapshot), authorizer)
            with cctx.wrap_socket(raw) as tls:
                return Outcome(True, str(peer_spiffe_id(tls)))
    except PeerAuthorizationError as exc:
        return Outcome(False, str(exc), by_verifier=True)
    except (OSError, ssl.SSLError) as exc:
        return Outcome(False, f"handshake: {exc}")
    finally:
        server.join(20)
        listener.close()


def _call(port: int, roots_pem: bytes, chain: Chain) -> Outcome:
    if chain is None:
        credentials = grpc.ssl_channel_credentials(roots_pem)
    else:
        credentials = grpc.ssl_channel_credentials(
            roots_pem, private_key_to_pem(chain[1]), certificates_to_pem(chain[0])
        )
    options = [("grpc.ssl_target_name_override", DNS)]
    with grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        try:
            return Outcome(True, channel.unary_unary("/test.Echo/Whoami")(b"", timeout=10).decode())
        except grpc.RpcError as exc:
            details = exc.details() or ""
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                return Outcome(False, details, by_verifier=True)
            return Outcome(False, f"handshake: {exc.code().name} {details}")


def _whoami_sync(request: bytes, context: grpc.ServicerContext) -> bytes:
    return str(current_peer_id()).encode()


async def _whoami_aio(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return str(current_peer_id()).encode()


def _handlers(behaviour: Callable[..., Any]) -> grpc.GenericRpcHandler:
    return grpc.method_handlers_generic_handler("test.Echo", {"Whoami": grpc.unary_unary_rpc_method_handler(behaviour)})


class SyncGrpcServer:
    def __init__(self, source: FixedSource) -> None:
        self.server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), interceptors=[SpiffeServerInterceptor(authorizer, source)]
        )
        self.server.add_generic_rpc_handlers((_handlers(_whoami_sync),))
        self.port = self.server.add_secure_port("127.0.0.1:0", server_credentials(source))
        self.server.start()

    def close(self) -> None:
        self.server.stop(0)


class AioGrpcServer:
    """A ``grpc.aio`` server on its own event loop thread, so the table's sync clients can call it."""

    def __init__(self, source: FixedSource) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server: grpc.aio.Server | None = None
        self.port = asyncio.run_coroutine_threadsafe(self._start(source), self.loop).result(30)

    async def _start(self, source: FixedSource) -> int:
        self.server = grpc.aio.server(interceptors=[AsyncSpiffeServerInterceptor(authorizer, source)])
        self.server.add_generic_rpc_handlers((_handlers(_whoami_aio),))
        port = self.server.add_secure_port("127.0.0.1:0", server_credentials(source))
        await self.server.start()
        return port

    def close(self) -> None:
        assert self.server is not None
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


# -- running the table --------------------------------------------------------------------------------------

PATHS = ["peer verifier", "ssl server_context", "ssl client_context", "gRPC interceptor", "gRPC aio interceptor"]


@pytest.fixture(scope="module", params=[True, False], ids=["federated", "one trust domain"])
def federated(request: pytest.FixtureRequest) -> bool:
    """Servers trusting our bundle and a partner's, then ours alone (the checks must not depend on it)."""
    return bool(request.param)


@pytest.fixture(scope="module")
def outcomes(federated: bool) -> Iterator[dict[str, dict[str, Outcome]]]:
    ours = TestCA(TD)
    revoked = ours.issue_svid("/revoked")
    cas = Cas(ours, TestCA("partner.org"), TestCA(TD), (revoked.cert_chain, revoked.private_key))
    server_svid = ours.issue_svid(SERVER_ID, dns_names=[DNS])
    bundles = BundleSet([ours.x509_bundle(), cas.partner.x509_bundle()] if federated else [ours.x509_bundle()])
    crls = (_crl(ours, revoked.leaf.serial_number),)
    snapshot = X509Snapshot(server_svid, bundles, (server_svid,), crls)
    source = FixedSource(snapshot)
    roots_pem = cas.ours.x509_bundle().pem()
    sync_server, aio_server = SyncGrpcServer(source), AioGrpcServer(source)
    paths: dict[str, Callable[[Chain], Outcome]] = {
        "peer verifier": lambda chain: verifier_path(snapshot, chain),
        "ssl server_context": lambda chain: tls_server_path(snapshot, chain),
        "ssl client_context": lambda chain: tls_client_path(snapshot, chain),
        "gRPC interceptor": lambda chain: _call(sync_server.port, roots_pem, chain),
        "gRPC aio interceptor": lambda chain: _call(aio_server.port, roots_pem, chain),
    }
    results: dict[str, dict[str, Outcome]] = {name: {} for name in PATHS}
    try:
        for row in ROWS:
            chain = row.make(cas)
            for name, run in paths.items():
                if chain is None and name == "ssl client_context":
                    continue  # a TLS server always presents a certificate
                results[name][row.name] = run(chain)
        yield results
    finally:
        sync_server.close()
        aio_server.close()


@pytest.mark.parametrize("path", PATHS)
def test_every_path_accepts_and_refuses_the_peers_the_table_says(
    outcomes: dict[str, dict[str, Outcome]], federated: bool, path: str
) -> None:
    got = {row: outcome.accepted for row, outcome in outcomes[path].items()}
    want = {row.name: row.expected(federated) for row in ROWS if row.name in got}
    assert got == want, {row: outcomes[path][row].detail for row in got if got[row] != want[row]}
    assert len(got) >= len(ROWS) - 1


def test_accepted_peers_are_named_alike(outcomes: dict[str, dict[str, Outcome]], federated: bool) -> None:
    for row in (r for r in ROWS if r.expected(federated)):
        assert len({outcomes[path][row.name].detail for path in PATHS}) == 1, row.name


def test_where_the_verifier_refused_every_path_says_why_in_the_same_words(
    outcomes: dict[str, dict[str, Outcome]], federated: bool
) -> None:
    """The TLS libraries refuse some peers during the handshake already (an untrusted or expired chain); the
    others reach the verifier on every path, and its one message reaches the caller of each."""
    reached = 0
    for row in (r for r in ROWS if not r.expected(federated)):
        words = {path: outcomes[path][row.name].detail for path in PATHS if row.name in outcomes[path]}
        by_verifier = [path for path in words if outcomes[path][row.name].by_verifier]
        reference = outcomes["peer verifier"][row.name].detail
        for path in by_verifier:
            assert reference in words[path], (row.name, path, words[path])
        if set(by_verifier) >= {"ssl server_context", "gRPC interceptor", "gRPC aio interceptor"}:
            reached += 1
    assert reached >= 8  # most rows are the verifier's to refuse, on the ssl and the gRPC paths alike
