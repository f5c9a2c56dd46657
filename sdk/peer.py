"""Peer verification for mutual TLS: the one path from the certificates a peer presented to its authorized
SPIFFE ID. The ``ssl`` contexts (:mod:`tessera.sdk.tls`), the gRPC interceptors (:mod:`tessera.sdk.grpc`) and
the federation client all call :class:`PeerVerifier`, so a peer one of them refuses the others refuse too.

* The model is go-spiffe's ``x509svid.ParseAndVerify`` followed by the authorizer. OpenSSL and gRPC verify a
  chain against the union of every trusted bundle and know nothing of the X509-SVID leaf rules, so a CA
  trusted for ``partner.org`` would pass a leaf claiming ``spiffe://example.org/admin``, and a CA certificate
  or a leaf with two URI SANs would pass too. Here the chain is always verified again by
  :func:`~tessera.sdk.verify.verify_x509_svid` against the bundle of the trust domain the leaf names alone.
* Then the CRLs: the leaf is refused when a CRL signed by the issuer that path validation found lists it.
  Then the authorizer, on every connection or call (it may change its mind; nothing caches its answer).
* The same peers reconnect all day: a verifier belongs to one set of bundles and CRLs (one source snapshot)
  and remembers each chain it verified with the window in which every certificate of it is valid, so a
  repeat costs a dict lookup and a clock read, and an expired chain is refused even on a live connection.
"""

from __future__ import annotations

import datetime as dt
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509

from tessera.sdk.bundle import BundleSet, X509Bundle
from tessera.sdk.crl import RevocationChecker
from tessera.sdk.errors import AuthorizationError, TesseraError, VerificationError
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.verify import verify_x509_svid
from tessera.sdk.x509profile import check_x509_svid_leaf

Authorizer = Callable[[SpiffeId], None]
"""Raises AuthorizationError when the (already verified) peer ID is not acceptable; returns otherwise."""

CACHE_SIZE = 4096
"""Verified chains remembered per verifier; the cache starts over when full (a flood of distinct valid
chains costs verification, never memory)."""


class PeerAuthorizationError(ssl.SSLError, AuthorizationError):
    """A peer's certificates or SPIFFE ID were refused (or it presented none).

    An ``ssl.SSLError`` so that servers (socketserver, asyncio) treat it as a failed handshake, and an
    AuthorizationError so that the gRPC interceptors answer PERMISSION_DENIED with the same message.
    """

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "peer refused"


@dataclass(frozen=True, slots=True)
class _Verified:
    peer: SpiffeId
    not_before: float
    not_after: float


def _window(chain: Sequence[x509.Certificate]) -> tuple[float, float]:
    """When every certificate of ``chain`` is valid (POSIX seconds)."""
    return (
        max(c.not_valid_before_utc.timestamp() for c in chain),
        min(c.not_valid_after_utc.timestamp() for c in chain),
    )


class PeerVerifier:
    """Verifies peers against one set of bundles and CRLs (build a new verifier when either changes).

    ``bundles=None`` is for a caller that cannot know the bundles (a gRPC interceptor given no source): the
    TLS library has verified the chain against its trust store, and only the leaf rules and the validity
    dates are checked here; nothing is re-verified against the peer's own trust domain and no CRL applies.
    """

    __slots__ = ("_bundles", "_clock", "_revocations", "_verified")

    def __init__(
        self,
        bundles: BundleSet[X509Bundle] | None,
        crls: Sequence[bytes] = (),
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._bundles = bundles
        self._revocations = RevocationChecker(crls) if crls and bundles is not None else None
        self._clock = clock
        self._verified: dict[tuple[bytes, ...], _Verified] = {}

    def verify(self, chain_der: Sequence[bytes], authorizer: Authorizer) -> SpiffeId:
        """The SPIFFE ID of the peer that presented ``chain_der`` (DER, leaf first), once its chain verified
        and ``authorizer`` accepted it; PeerAuthorizationError saying why otherwise."""
        peer = self.authenticate(chain_der)
        try:
            authorizer(peer)
        except AuthorizationError as exc:
            raise PeerAuthorizationError(f"peer refused: {exc}") from None
        return peer

    def authenticate(self, chain_der: Sequence[bytes]) -> SpiffeId:
        """The verified SPIFFE ID of the peer that presented ``chain_der``, before any authorization."""
        if not chain_der or not chain_der[0]:
            raise PeerAuthorizationError("peer presented no certificate")
        key = tuple(chain_der)
        now = self._clock()
        known = self._verified.get(key)
        if known is not None and known.not_before <= now <= known.not_after:
            return known.peer
        try:
            chain = [x509.load_der_x509_certificate(der) for der in key]
        except ValueError as exc:
            raise PeerAuthorizationError(f"peer certificate chain is unreadable: {exc}") from None
        verified = self._verify_chain(chain, now)
        if len(self._verified) >= CACHE_SIZE:
            self._verified.clear()
        self._verified[key] = verified
        return verified.peer

    def _verify_chain(self, chain: list[x509.Certificate], now: float) -> _Verified:
        try:
            if self._bundles is None:
                peer = check_x509_svid_leaf(chain[0], VerificationError)
                verified = chain
                not_before, not_after = _window(chain)
                if not not_before <= now <= not_after:
                    raise VerificationError(f"a certificate of {peer}'s chain is expired or not yet valid")
            else:
                peer, verified = verify_x509_svid(chain, self._bundles, dt.datetime.fromtimestamp(now, dt.UTC))
                not_before, not_after = _window(verified)
        except TesseraError as exc:
            raise PeerAuthorizationError(
                f"peer certificate is not an X509-SVID that verifies against its own trust domain's bundle: {exc}"
            ) from None
        except ValueError as exc:  # an extension cryptography cannot decode
            raise PeerAuthorizationError(f"peer certificate chain is unreadable: {exc}") from None
        if self._revocations is not None and self._revocations.is_revoked(verified[0], verified[1:]):
            raise PeerAuthorizationError(
                f"peer {peer} presented a revoked certificate (serial {verified[0].serial_number:x})"
            )
        return _Verified(peer, not_before, not_after)


def verify_peer(
    chain_der: Sequence[bytes],
    bundles: BundleSet[X509Bundle],
    authorizer: Authorizer,
    crls: Sequence[bytes] = (),
) -> SpiffeId:
    """One peer, verified once: :meth:`PeerVerifier.verify` without a verifier to keep."""
    return PeerVerifier(bundles, crls).verify(chain_der, authorizer)


def presented_chain(tls: ssl.SSLSocket | ssl.SSLObject) -> list[bytes]:
    """The chain the peer of a finished handshake sent, DER, leaf first (empty when it sent none).

    ``get_unverified_chain`` is public on 3.13 and the same C method underneath since 3.10; CPython puts
    the peer's own certificate first on the server side too, where OpenSSL leaves it out.
    """
    inner: Any = tls._sslobj  # type: ignore[union-attr]
    certs = (inner.get_unverified_chain() if inner is not None else None) or []
    ders = [c if isinstance(c, bytes) else c.public_bytes(ssl._ssl.ENCODING_DER) for c in certs]  # type: ignore[attr-defined]
    if not ders:
        leaf = tls.getpeercert(binary_form=True)
        ders = [leaf] if leaf else []
    return ders


__all__ = [
    "CACHE_SIZE",
    "Authorizer",
    "PeerAuthorizationError",
    "PeerVerifier",
    "presented_chain",
    "verify_peer",
]
