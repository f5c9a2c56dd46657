"""Mutual TLS with SPIFFE identities on the standard library's ``ssl``: contexts that follow rotation and
authorize the peer's SPIFFE ID.

Three facts shape this module (see ARCHITECTURE.md, "Facts already checked"):

* A context already serving connections must never be reconfigured (``load_cert_chain`` on a live context
  crashed CPython under concurrent handshakes). Each snapshot from the source gets its own *inner* context,
  built once and never touched again. The server hands out one fixed *front* context whose ``sni_callback``
  (which runs on every handshake, SNI or not) points the connection at the current inner context; the
  client's front context delegates ``wrap_socket``/``wrap_bio`` to the current inner context. Trust anchors
  can only be added to a context, so a removed CA disappears with the next inner context.
* ``ssl`` has no verification hook for URI SANs: the chain is verified by OpenSSL against the bundles, and
  the peer's SPIFFE ID is checked by our ``SSLSocket``/``SSLObject`` subclasses right after the handshake,
  before any application byte is read or written. Failures raise :class:`PeerAuthorizationError`, an
  ``ssl.SSLError`` (so socketserver and asyncio treat them as failed handshakes) and an AuthorizationError.
* With bundles of several trust domains in one store, OpenSSL would accept a chain from trust domain B
  for a leaf claiming an ID in A; then the peer's chain is verified again against A's bundle alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cryptography import x509

from tessera.sdk.crl import RevocationChecker
from tessera.sdk.errors import AuthorizationError, TesseraError
from tessera.sdk.source import X509Snapshot, X509SnapshotSource
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import X509Svid
from tessera.sdk.verify import verify_x509_svid

log = logging.getLogger(__name__)

Authorizer = Callable[[SpiffeId], None]
"""Raises AuthorizationError when the (already verified) peer ID is not acceptable; returns otherwise."""


class PeerAuthorizationError(ssl.SSLError, AuthorizationError):
    """The peer completed the TLS handshake but its SPIFFE ID was refused (or it has none)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "peer refused"


# -- authorizers -----------------------------------------------------------------------------------------


def _as_id(value: SpiffeId | str) -> SpiffeId:
    return value if isinstance(value, SpiffeId) else SpiffeId.parse(value)


def authorize_any() -> Authorizer:
    """Any peer with a valid SVID from a trusted bundle (authentication only)."""

    def authorize(peer: SpiffeId) -> None:
        return None

    return authorize


def authorize_id(expected: SpiffeId | str) -> Authorizer:
    """Exactly this SPIFFE ID."""
    wanted = _as_id(expected)

    def authorize(peer: SpiffeId) -> None:
        if peer != wanted:
            raise AuthorizationError(f"peer {peer} is not the expected {wanted}")

    return authorize


def authorize_one_of(*allowed: SpiffeId | str | Iterable[SpiffeId | str]) -> Authorizer:
    """Any of these SPIFFE IDs (pass them as arguments or as one iterable)."""
    flat: list[SpiffeId | str] = []
    for item in allowed:
        if isinstance(item, SpiffeId | str):
            flat.append(item)
        else:
            flat.extend(item)
    wanted = frozenset(_as_id(i) for i in flat)
    if not wanted:
        raise ValueError("authorize_one_of needs at least one SPIFFE ID")

    def authorize(peer: SpiffeId) -> None:
        if peer not in wanted:
            raise AuthorizationError(f"peer {peer} is not one of the {len(wanted)} allowed SPIFFE IDs")

    return authorize


def authorize_member_of(trust_domain: TrustDomain | str) -> Authorizer:
    """Any workload of this trust domain."""
    td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)

    def authorize(peer: SpiffeId) -> None:
        if peer.trust_domain != td:
            raise AuthorizationError(f"peer {peer} is not a member of trust domain {td}")

    return authorize


# -- peer checks -----------------------------------------------------------------------------------------


def _peer_chain_der(tls: ssl.SSLSocket | ssl.SSLObject) -> list[bytes]:
    """The chain the peer sent, leaf first (public on 3.13, the same C method underneath since 3.10)."""
    inner: Any = tls._sslobj  # type: ignore[union-attr]
    certs = inner.get_unverified_chain() or []
    return [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in certs]  # type: ignore[attr-defined]


_ID_CACHE_SIZE = 4096


def _leaf_id(der: bytes) -> SpiffeId:
    """The SPIFFE ID of a peer leaf OpenSSL has already verified: exactly one URI SAN, a workload ID."""
    try:
        cert = x509.load_der_x509_certificate(der)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PeerAuthorizationError("peer certificate has no SAN extension; it is not an X509-SVID") from None
    except ValueError as exc:
        raise PeerAuthorizationError(f"peer certificate is unreadable: {exc}") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise PeerAuthorizationError(f"peer certificate has {len(uris)} URI SANs; an X509-SVID has exactly one")
    try:
        peer = SpiffeId.parse(uris[0])
    except TesseraError as exc:
        raise PeerAuthorizationError(f"peer certificate's URI SAN is not a SPIFFE ID: {exc}") from None
    if not peer.is_workload_id():
        raise PeerAuthorizationError(f"peer ID {peer} has no path; it is not a workload SVID")
    return peer


class _PeerCheck:
    """Authorizes the peer of one handshake; bound to the inner context, hence to the bundles that
    OpenSSL verified the chain against."""

    __slots__ = ("_anchored", "_authorizer", "_bundles", "_ids", "_multi_td", "_not_revoked", "_revocations")

    def __init__(self, authorizer: Authorizer, snapshot: X509Snapshot) -> None:
        self._authorizer = authorizer
        # Peer leaf (DER) -> its SPIFFE ID: the same peers reconnect all day, so each leaf is parsed once.
        self._ids: dict[bytes, SpiffeId] = {}
        self._anchored: set[bytes] = set()
        self._bundles = snapshot.bundles
        self._multi_td = len(snapshot.bundles) > 1
        # CRLs come with the snapshot, so a new CRL means a new inner context: leaves found unrevoked here stay so.
        self._revocations = RevocationChecker(snapshot.crls) if snapshot.crls else None
        self._not_revoked: set[bytes] = set()

    def __call__(self, tls: ssl.SSLSocket | ssl.SSLObject) -> SpiffeId:
        der = tls.getpeercert(binary_form=True)
        if not der:
            raise PeerAuthorizationError("peer presented no certificate")
        peer = self._ids.get(der)
        if peer is None:
            peer = _leaf_id(der)
            if len(self._ids) >= _ID_CACHE_SIZE:
                self._ids.clear()
            self._ids[der] = peer
        if self._multi_td:
            self._reverify(tls, peer)
        if self._revocations is not None and der not in self._not_revoked:
            self._check_revocation(tls, der, peer)
        try:
            self._authorizer(peer)
        except AuthorizationError as exc:
            raise PeerAuthorizationError(f"peer refused: {exc}") from None
        return peer

    def _check_revocation(self, tls: ssl.SSLSocket | ssl.SSLObject, der: bytes, peer: SpiffeId) -> None:
        """Refuses a leaf listed on a CRL signed by its issuer (a presented intermediate or a bundle CA)."""
        assert self._revocations is not None
        try:
            leaf = x509.load_der_x509_certificate(der)
            issuers = [x509.load_der_x509_certificate(d) for d in _peer_chain_der(tls)[1:]]
        except ValueError as exc:
            raise PeerAuthorizationError(f"peer certificate chain is unreadable: {exc}") from None
        bundle = self._bundles.get(peer.trust_domain)
        if bundle is not None:
            issuers.extend(bundle.authorities)
        if self._revocations.is_revoked(leaf, issuers):
            raise PeerAuthorizationError(f"peer {peer} presented a revoked certificate (serial {leaf.serial_number:x})")
        if len(self._not_revoked) >= _ID_CACHE_SIZE:
            self._not_revoked.clear()
        self._not_revoked.add(der)

    def _reverify(self, tls: ssl.SSLSocket | ssl.SSLObject, peer: SpiffeId) -> None:
        ders = _peer_chain_der(tls)
        key = b"".join(ders)
        if key in self._anchored:
            return  # verified before against these same bundles (OpenSSL re-checked validity dates just now)
        try:
            chain = [x509.load_der_x509_certificate(der) for der in ders]
            verified_id, _ = verify_x509_svid(chain, self._bundles)
        except TesseraError as exc:
            raise PeerAuthorizationError(
                f"peer {peer} does not chain to the bundle of its own trust domain: {exc}"
            ) from None
        except ValueError as exc:
            raise PeerAuthorizationError(f"peer certificate chain is unreadable: {exc}") from None
        if verified_id != peer:
            raise PeerAuthorizationError(f"peer chain verifies as {verified_id}, not {peer}")
        if len(self._anchored) >= _ID_CACHE_SIZE:
            self._anchored.clear()
        self._anchored.add(key)


def _authorize_after_handshake(tls: ssl.SSLSocket | ssl.SSLObject) -> None:
    check: _PeerCheck | None = getattr(tls.context, "_tessera_check", None)
    if check is None:
        # Only the server front context reaches here without a swap: the sni_callback failed to run.
        raise PeerAuthorizationError("TLS context was not switched to a SPIFFE identity; refusing the peer")
    tls._tessera_peer_id = check(tls)  # type: ignore[union-attr]


class SpiffeSSLSocket(ssl.SSLSocket):
    """An SSLSocket that refuses the peer's SPIFFE ID right after the handshake unless it is authorized."""

    _tessera_peer_id: SpiffeId | None = None

    def do_handshake(self, block: bool = False) -> None:
        super().do_handshake(block)
        try:
            _authorize_after_handshake(self)
        except PeerAuthorizationError:
            with contextlib.suppress(OSError):
                self.close()
            raise

    @property
    def peer_spiffe_id(self) -> SpiffeId | None:
        return self._tessera_peer_id


class SpiffeSSLObject(ssl.SSLObject):
    """The SSLObject twin (asyncio, anyio and other memory-BIO users)."""

    _tessera_peer_id: SpiffeId | None = None

    def do_handshake(self) -> None:
        super().do_handshake()
        _authorize_after_handshake(self)

    @property
    def peer_spiffe_id(self) -> SpiffeId | None:
        return self._tessera_peer_id


def peer_spiffe_id(conn: object) -> SpiffeId | None:
    """The authorized peer ID of a connection made with these contexts: an SSLSocket, an SSLObject, an
    asyncio StreamWriter or transport."""
    get_extra = getattr(conn, "get_extra_info", None)
    if get_extra is not None:
        conn = get_extra("ssl_object")
    return getattr(conn, "_tessera_peer_id", None)


class _SpiffeContext(ssl.SSLContext):
    sslsocket_class = SpiffeSSLSocket
    sslobject_class = SpiffeSSLObject
    _tessera_check: _PeerCheck | None = None


# -- building inner contexts -----------------------------------------------------------------------------


def _load_svid(ctx: ssl.SSLContext, svid: X509Svid) -> None:
    """``load_cert_chain`` reads files only: hand it an anonymous memory file (or, without memfd, a 0600 file
    in a private directory removed at once), so the key never lands on a persistent disk."""
    data = svid.chain_pem() + svid.key_pem()
    memfd_create = getattr(os, "memfd_create", None)
    if memfd_create is not None:
        fd = memfd_create("tessera-svid", os.MFD_CLOEXEC)
        try:
            os.write(fd, data)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
            return
        except OSError:
            pass  # no /proc: fall back to a private temp file
        finally:
            os.close(fd)
    with tempfile.TemporaryDirectory(prefix="tessera-tls-") as tmp:
        path = os.path.join(tmp, "svid.pem")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        try:
            ctx.load_cert_chain(path)
        finally:
            os.unlink(path)


def _trust_der(snapshot: X509Snapshot) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return b"".join(
        cert.public_bytes(Encoding.DER) for bundle in snapshot.bundles.values() for cert in bundle.authorities
    )


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """The TLS floor of every context Tessera builds (this module's, the node API's, the bundle endpoint's):
    TLS 1.2 at least, and a server never resumes a session.

    A resumed session skips certificate verification: with no tickets, every connection is checked against
    the current bundles and authorizer, so a removed CA cannot come back through a ticket. (Measured with
    CPython's server contexts: ``OP_NO_TICKET`` plus ``num_tickets = 0`` leaves no resumption at all, TLS 1.2
    session IDs included.) Returns ``ctx``, changed in place: call it before the context serves anything.
    """
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if ctx.protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.options |= ssl.OP_NO_TICKET
        ctx.num_tickets = 0
    return ctx


def _configure(ctx: ssl.SSLContext, strict: bool) -> None:
    harden(ctx)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    if strict:
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT


def _build_inner(snapshot: X509Snapshot, server_side: bool, authorizer: Authorizer, strict: bool) -> _SpiffeContext:
    ctx = _SpiffeContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    _configure(ctx, strict)
    _load_svid(ctx, snapshot.svid)
    trust = _trust_der(snapshot)
    if not trust:
        raise TesseraError("the source has no X.509 bundle to trust; refusing to build a TLS context")
    ctx.load_verify_locations(cadata=trust)
    ctx._tessera_check = _PeerCheck(authorizer, snapshot)
    return ctx


class _Rotating:
    """Maps the source's current snapshot to its inner context, building each one once."""

    def __init__(self, source: X509SnapshotSource, server_side: bool, authorizer: Authorizer, strict: bool) -> None:
        self._source = source
        self._server_side = server_side
        self._authorizer = authorizer
        self._strict = strict
        self._lock = threading.Lock()
        self._built: tuple[X509Snapshot, _SpiffeContext] | None = None
        self.current()  # fail now, not on the first connection, if the identity cannot be loaded

    def current(self) -> _SpiffeContext:
        snapshot = self._source.snapshot()
        built = self._built
        if built is not None and built[0] is snapshot:
            return built[1]
        with self._lock:
            built = self._built
            if built is not None and built[0] is snapshot:
                return built[1]
            ctx = _build_inner(snapshot, self._server_side, self._authorizer, self._strict)
            self._built = (snapshot, ctx)
            log.debug("TLS context rebuilt for %s", snapshot.svid.spiffe_id)
            return ctx

    def sni_callback(
        self, tls: ssl.SSLSocket | ssl.SSLObject, server_name: str | None, front: ssl.SSLContext
    ) -> int | None:
        try:
            tls.context = self.current()
        except Exception:
            log.exception("no usable SPIFFE identity for an incoming TLS connection")
            return int(ssl.AlertDescription.ALERT_DESCRIPTION_INTERNAL_ERROR)
        return None


class _ServerFront(_SpiffeContext):
    _tessera_rotating: _Rotating


class _ClientFront(_SpiffeContext):
    """Never used for a connection itself: each wrap goes to the current inner context, so settings that
    libraries poke into this object (ALPN, verify mode) cannot change a context in use."""

    _tessera_rotating: _Rotating

    def wrap_socket(  # type: ignore[override]
        self,
        sock: Any,
        server_side: bool = False,
        do_handshake_on_connect: bool = True,
        suppress_ragged_eofs: bool = True,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLSocket:
        if server_side:
            raise ValueError("a SPIFFE client context cannot accept connections; use server_context()")
        return self._tessera_rotating.current().wrap_socket(
            sock,
            do_handshake_on_connect=do_handshake_on_connect,
            suppress_ragged_eofs=suppress_ragged_eofs,
            server_hostname=server_hostname,
            session=session,
        )

    def wrap_bio(  # type: ignore[override]
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        if server_side:
            raise ValueError("a SPIFFE client context cannot accept connections; use server_context()")
        return self._tessera_rotating.current().wrap_bio(
            incoming, outgoing, server_hostname=server_hostname, session=session
        )

    def current_context(self) -> ssl.SSLContext:
        """The immutable context new connections use right now."""
        return self._tessera_rotating.current()


def server_context(source: X509SnapshotSource, authorizer: Authorizer, *, strict: bool = True) -> ssl.SSLContext:
    """A server-side context for mutual TLS that presents the source's current SVID, trusts its current
    bundles and refuses clients whose SPIFFE ID ``authorizer`` rejects. Pass it once to any server
    (``http.server``, ``asyncio.start_server``...); it follows rotation by itself."""
    rotating = _Rotating(source, True, authorizer, strict)
    front = _ServerFront(ssl.PROTOCOL_TLS_SERVER)
    _configure(front, strict)
    front._tessera_rotating = rotating
    front.sni_callback = rotating.sni_callback
    return front


def client_context(source: X509SnapshotSource, authorizer: Authorizer, *, strict: bool = True) -> ssl.SSLContext:
    """A client-side context for mutual TLS: presents the source's current SVID, verifies the server against
    the current bundles and refuses it unless ``authorizer`` accepts its SPIFFE ID (no hostname check: the
    SPIFFE ID is the name). Each new connection uses the identity current at that moment."""
    rotating = _Rotating(source, False, authorizer, strict)
    front = _ClientFront(ssl.PROTOCOL_TLS_CLIENT)
    _configure(front, strict)
    front._tessera_rotating = rotating
    return front


# -- asyncio streams -------------------------------------------------------------------------------------


async def open_connection(
    host: str, port: int, source: X509SnapshotSource, authorizer: Authorizer, **kwargs: Any
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """``asyncio.open_connection`` over SPIFFE mutual TLS: returns once the server's SPIFFE ID is authorized
    (raises PeerAuthorizationError, an ``ssl.SSLError``, otherwise). ``peer_spiffe_id(writer)`` names it."""
    return await asyncio.open_connection(host, port, ssl=client_context(source, authorizer), **kwargs)


async def start_server(
    client_connected_cb: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None],
    host: str | None,
    port: int | None,
    source: X509SnapshotSource,
    authorizer: Authorizer,
    **kwargs: Any,
) -> asyncio.Server:
    """``asyncio.start_server`` over SPIFFE mutual TLS: ``client_connected_cb`` runs only for clients whose
    SPIFFE ID ``authorizer`` accepted (``peer_spiffe_id(writer)``); others are dropped after the handshake."""
    return await asyncio.start_server(
        client_connected_cb, host, port, ssl=server_context(source, authorizer), **kwargs
    )
