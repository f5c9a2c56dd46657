"""Mutual TLS with SPIFFE identities on the standard library's ``ssl``: contexts that follow rotation and
authorize the peer's SPIFFE ID.

Three facts shape this module (see ARCHITECTURE.md, "Facts already checked"):

* A context already serving connections must never be reconfigured (``load_cert_chain`` on a live context
  crashed CPython under concurrent handshakes). Each snapshot from the source gets its own *inner* context,
  built once and never touched again. The server hands out one fixed *front* context whose ``sni_callback``
  (which runs on every handshake, SNI or not) points the connection at the current inner context; the
  client's front context delegates ``wrap_socket``/``wrap_bio`` to the current inner context. Trust anchors
  can only be added to a context, so a removed CA disappears with the next inner context.
* ``ssl`` has no verification hook for URI SANs: OpenSSL verifies the chain against the bundles during the
  handshake, and right after it, before any application byte is read or written, our ``SSLSocket``/
  ``SSLObject`` subclasses hand the presented chain to the one peer verifier (:mod:`tessera.sdk.peer`, which
  the gRPC interceptors use too): verified again against the bundle of the peer's own trust domain, checked
  against the CRLs, then authorized. Failures raise :class:`PeerAuthorizationError`, an ``ssl.SSLError`` (so
  socketserver and asyncio treat them as failed handshakes) and an AuthorizationError.
* Every context comes from the one factory (:mod:`tessera.sdk.tlscontext`), which decides the TLS floor
  (versions, no session resumption) and loads the SVID's key from memory, never from a persistent file.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import threading
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from tessera.sdk.errors import AuthorizationError, TesseraError
from tessera.sdk.peer import Authorizer as Authorizer
from tessera.sdk.peer import PeerAuthorizationError as PeerAuthorizationError
from tessera.sdk.peer import PeerVerifier, presented_chain
from tessera.sdk.source import X509Snapshot, X509SnapshotSource
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.tlscontext import build_context, switching_server_context
from tessera.sdk.tlscontext import harden as harden

log = logging.getLogger(__name__)


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


def _authorize_after_handshake(tls: ssl.SSLSocket | ssl.SSLObject) -> None:
    ctx = tls.context
    verifier: PeerVerifier | None = getattr(ctx, "_tessera_verifier", None)
    if verifier is None:
        # Only the server front context reaches here without a swap: the sni_callback failed to run.
        raise PeerAuthorizationError("TLS context was not switched to a SPIFFE identity; refusing the peer")
    tls._tessera_peer_id = verifier.verify(presented_chain(tls), ctx._tessera_authorizer)  # type: ignore[attr-defined,union-attr]


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
    _tessera_verifier: PeerVerifier | None = None  # bound to the snapshot whose bundles the context trusts
    _tessera_authorizer: Authorizer


# -- building inner contexts -----------------------------------------------------------------------------


def _build_inner(snapshot: X509Snapshot, server_side: bool, authorizer: Authorizer, strict: bool) -> _SpiffeContext:
    roots = [cert for bundle in snapshot.bundles.values() for cert in bundle.authorities]
    if not roots:
        raise TesseraError("the source has no X.509 bundle to trust; refusing to build a TLS context")
    svid = snapshot.svid
    ctx = build_context(
        server_side,
        chain=svid.cert_chain,
        key=svid.private_key,
        roots=roots,
        strict=strict,
        context_class=_SpiffeContext,
    )
    ctx._tessera_verifier = PeerVerifier(snapshot.bundles, snapshot.crls)
    ctx._tessera_authorizer = authorizer
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
        return self._client(server_side).wrap_socket(
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
        return self._client(server_side).wrap_bio(incoming, outgoing, server_hostname=server_hostname, session=session)

    def current_context(self) -> ssl.SSLContext:
        """The immutable context new connections use right now."""
        return self._tessera_rotating.current()

    def _client(self, server_side: bool) -> ssl.SSLContext:
        if server_side:
            raise ValueError("a SPIFFE client context cannot accept connections; use server_context()")
        return self._tessera_rotating.current()


def server_context(source: X509SnapshotSource, authorizer: Authorizer, *, strict: bool = True) -> ssl.SSLContext:
    """A server-side context for mutual TLS that presents the source's current SVID, trusts its current
    bundles and refuses clients whose SPIFFE ID ``authorizer`` rejects. Pass it once to any server
    (``http.server``, ``asyncio.start_server``...); it follows rotation by itself."""
    rotating = _Rotating(source, True, authorizer, strict)
    front = switching_server_context(rotating.current, strict=strict, context_class=_ServerFront)
    front._tessera_rotating = rotating
    return front


def client_context(source: X509SnapshotSource, authorizer: Authorizer, *, strict: bool = True) -> ssl.SSLContext:
    """A client-side context for mutual TLS: presents the source's current SVID, verifies the server against
    the current bundles and refuses it unless ``authorizer`` accepts its SPIFFE ID (no hostname check: the
    SPIFFE ID is the name). Each new connection uses the identity current at that moment."""
    rotating = _Rotating(source, False, authorizer, strict)
    front = build_context(False, strict=strict, context_class=_ClientFront)
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
    return await asyncio.start_server(client_connected_cb, host, port, ssl=server_context(source, authorizer), **kwargs)
