"""The CA that signs: X509-SVIDs and JWT-SVIDs with the authorities it was handed, and nothing else.

- Which authority signs is the rotation manager's decision (:mod:`~tessera.server.ca.manager`); this module
  only signs with the active pair it was last given, as SPIRE's ``ca`` signs apart from its ``manager``. Every
  SVID the server issues comes through :meth:`ServerCa.sign_x509_svid`, the server's own TLS SVID included,
  so one set of rules holds for all of them: the ID is a workload of this trust domain, the key is strong
  enough, the life is capped (and never outlives the CA), notBefore is backdated by ``config.backdate``.
- The active pair is one immutable snapshot swapped by a single assignment: the node API's batch signing never
  waits behind a rotation, and no signature mixes two rotations.
- It remembers until when the JWT-SVIDs minted with each key stay valid: ``ca revoke`` of a JWT key waits
  for them (the CA keeps no list of tokens).
"""

from __future__ import annotations

import ipaddress
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509

from tessera.sdk.errors import SpiffeIdError, SvidError
from tessera.sdk.jwtsvid import mint_jwt_svid
from tessera.sdk.keys import PublicKey
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.x509profile import build_x509_svid
from tessera.server.ca.config import CaConfig, Clock, instant, utc_now, whole_seconds
from tessera.server.ca.csr import check_public_key
from tessera.server.ca.slots import JwtAuthority, X509Authority
from tessera.server.errors import BadSigningRequestError, CaNotReadyError

MAX_DNS_NAME = 253

IpAddress = str | ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, slots=True)
class ActiveAuthorities:
    """The authorities that sign right now (None: that family has none active yet)."""

    x509: X509Authority | None = None
    jwt: JwtAuthority | None = None


class ServerCa:
    """Signs with the active authorities. Thread-safe; ``now=None`` reads the clock."""

    def __init__(self, trust_domain: TrustDomain, config: CaConfig, clock: Clock = utc_now) -> None:
        self.trust_domain = trust_domain
        self.config = config
        self._clock = clock
        self._active = ActiveAuthorities()
        self._minted_lock = threading.Lock()
        self._jwt_minted_until: dict[str, datetime] = {}

    @property
    def active(self) -> ActiveAuthorities:
        return self._active

    def set_active(self, active: ActiveAuthorities) -> None:
        """Called by the manager after every rotation step: later signatures use these authorities."""
        self._active = active

    # ---- X509-SVIDs ----------------------------------------------------------------------------------

    def sign_x509_svid(
        self,
        public_key: PublicKey,
        spiffe_id: SpiffeId | str,
        ttl_seconds: float | timedelta | None = None,
        dns_names: Sequence[str] = (),
        now: datetime | None = None,
        ip_addresses: Sequence[IpAddress] = (),
    ) -> list[x509.Certificate]:
        """Signs an X509-SVID with the active CA: returns the leaf followed by the intermediates up to (not
        including) a root of the bundle.

        ``ttl_seconds`` None or 0 means the default (1 h); longer than the maximum is cut to the maximum; the
        leaf never outlives the active CA and is backdated by ``config.backdate``. ``ip_addresses`` are for
        the server's own SVID when agents dial it by address.
        """
        now = instant(self._clock, now)
        check_public_key(public_key)
        sid = self._spiffe_id(spiffe_id)
        names = check_dns_names(dns_names)
        try:
            ips = tuple(ipaddress.ip_address(ip) for ip in ip_addresses)
        except ValueError as exc:
            raise BadSigningRequestError(str(exc)) from None
        ttl = _ttl(ttl_seconds, self.config.x509_svid_ttl, self.config.max_x509_svid_ttl)
        authority = self._active.x509
        if authority is None or now >= authority.lifetime.not_after:
            raise CaNotReadyError("no X.509 CA is active; the server cannot sign X509-SVIDs right now")
        start = whole_seconds(now)
        try:
            leaf = build_x509_svid(
                public_key=public_key,
                spiffe_id=sid,
                issuer_cert=authority.certificate,
                issuer_key=authority.key.signer,
                not_before=start - self.config.backdate,
                not_after=start + ttl,
                dns_names=names,
                ip_addresses=ips,
            )
        except SvidError as exc:
            raise CaNotReadyError(f"cannot sign an X509-SVID with CA {authority.authority_id}: {exc}") from None
        except ValueError as exc:  # a DNS name cryptography refuses
            raise BadSigningRequestError(f"cannot sign an X509-SVID for {sid}: {exc}") from None
        return [leaf, *authority.chain_from_ca]

    # ---- JWT-SVIDs -----------------------------------------------------------------------------------

    def mint_jwt_svid(
        self,
        spiffe_id: SpiffeId | str,
        audience: Sequence[str] | str,
        ttl_seconds: float | timedelta | None = None,
        now: datetime | None = None,
    ) -> tuple[str, datetime]:
        """Mints a JWT-SVID with the active JWT key (``kid`` = its authority ID); returns the token and its
        expiry, which never passes the key's own notAfter (after which the key leaves the JWT bundle)."""
        now = instant(self._clock, now)
        sid = self._spiffe_id(spiffe_id)
        audiences = [audience] if isinstance(audience, str) else list(audience)
        if not audiences or any(not isinstance(a, str) or not a for a in audiences):
            raise BadSigningRequestError("a JWT-SVID needs at least one audience, and no audience may be empty")
        ttl = _ttl(ttl_seconds, self.config.jwt_svid_ttl, self.config.max_jwt_svid_ttl)
        authority = self._active.jwt
        if authority is None or now >= authority.lifetime.not_after:
            raise CaNotReadyError("no JWT key is active; the server cannot mint JWT-SVIDs right now")
        issued_at = whole_seconds(now)
        expires_at = min(issued_at + ttl, authority.lifetime.not_after)
        if expires_at <= issued_at:
            raise CaNotReadyError(f"JWT key {authority.authority_id} expires now; cannot mint a JWT-SVID")
        token = mint_jwt_svid(authority.key.signer, authority.authority_id, sid, audiences, expires_at, issued_at)
        with self._minted_lock:
            previous = self._jwt_minted_until.get(authority.authority_id)
            if previous is None or expires_at > previous:
                self._jwt_minted_until[authority.authority_id] = expires_at
        return token, expires_at

    def jwt_minted_until(self, authority_id: str) -> datetime | None:
        """The latest expiry of a JWT-SVID minted with this key since this process started (None: none seen)."""
        with self._minted_lock:
            return self._jwt_minted_until.get(authority_id)

    def forget_jwt_authority(self, authority_id: str) -> None:
        """Drops what was recorded about a JWT key (it was revoked: nothing it signed verifies any more)."""
        with self._minted_lock:
            self._jwt_minted_until.pop(authority_id, None)

    # ---- request checks ------------------------------------------------------------------------------

    def _spiffe_id(self, spiffe_id: SpiffeId | str) -> SpiffeId:
        try:
            sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
        except SpiffeIdError as exc:
            raise BadSigningRequestError(f"invalid SPIFFE ID: {exc}") from None
        if not sid.member_of(self.trust_domain):
            raise BadSigningRequestError(
                f"{sid} is not in trust domain {self.trust_domain}; this server cannot sign it"
            )
        if not sid.is_workload_id():
            raise BadSigningRequestError(f"{sid} has no path; an SVID names a workload, so its ID needs a path")
        return sid


def _ttl(requested: float | timedelta | None, default: timedelta, maximum: timedelta) -> timedelta:
    if requested is None:
        return default
    ttl = requested if isinstance(requested, timedelta) else timedelta(seconds=requested)
    if ttl < timedelta(0):
        raise BadSigningRequestError(f"TTL must not be negative, got {ttl.total_seconds():g} seconds")
    if ttl == timedelta(0):
        return default
    return min(ttl, maximum)


def check_dns_names(names: Iterable[str]) -> tuple[str, ...]:
    """The DNS names as given, if each can go into a certificate's SAN; else :class:`BadSigningRequestError`."""
    checked = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise BadSigningRequestError("DNS names must be non-empty strings")
        if len(name) > MAX_DNS_NAME or not name.isascii() or any(c.isspace() or c in "/:@" for c in name):
            raise BadSigningRequestError(
                f"DNS name {name!r} is invalid: use an ASCII (IDNA) host name of at most {MAX_DNS_NAME} characters"
            )
        checked.append(name)
    return tuple(checked)
