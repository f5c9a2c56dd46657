"""The authorities the server's CA holds and the slots they sit in: immutable values and pure transitions.

- Two families of authority rotate side by side: X.509 CAs (:class:`X509Authority`, they sign X509-SVIDs) and
  JWT keys (:class:`JwtAuthority`, they sign JWT-SVIDs). Each is named by one *authority ID* (SPIRE's
  AuthorityID): the hex SKI of its key, which X509-SVID leaves carry as their AKI and JWT-SVIDs as ``kid``,
  and which operators read in ``ca show`` and give to ``ca taint`` / ``ca revoke``.
- A family's :class:`Slots` hold one active authority (signs now), at most one prepared (published in the
  bundle, not signing yet) and old ones (retired, kept in the bundle until they expire).
- Every change makes a new :class:`Slots` value, so readers (the CA that signs, the bundle views) always hold a
  consistent snapshot without a lock, and every transition here is tested without keys, files or a clock.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import ClassVar, Generic, Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm

from tessera.sdk.keys import key_id
from tessera.server.ca.journal import JwtRecord, Status, X509Record
from tessera.server.ca.keymanager import SigningKey
from tessera.server.ca.schedule import Lifetime, SlotState

AuthorityKind = Literal["x509", "jwt"]
AUTHORITY_KINDS: tuple[AuthorityKind, ...] = ("x509", "jwt")


@dataclass(frozen=True, slots=True)
class AuthorityInfo:
    """What an operator sees of one authority (a line of ``tessera-server ca show``)."""

    kind: AuthorityKind
    authority_id: str
    status: Status
    not_before: datetime
    not_after: datetime
    key_kind: str
    tainted: bool
    upstream_authority_id: str = ""
    """For an upstream-signed CA, the authority ID (hex SKI) of the upstream certificate that signed it."""


@dataclass(frozen=True, slots=True)
class X509Authority:
    """An X.509 CA the server holds: its certificate, its key handle, and what sits between it and a root."""

    kind: ClassVar[AuthorityKind] = "x509"

    slot_id: str
    key: SigningKey
    certificate: x509.Certificate
    issuer_chain: tuple[x509.Certificate, ...]
    status: Status
    tainted: bool = False
    authority_id: str = field(init=False)
    lifetime: Lifetime = field(init=False)
    chain_from_ca: tuple[x509.Certificate, ...] = field(init=False)
    """What follows a leaf in every SVID chain: up to, not including, a root of the bundle."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "authority_id", key_id(self.key.public_key))
        cert = self.certificate
        object.__setattr__(self, "lifetime", Lifetime(cert.not_valid_before_utc, cert.not_valid_after_utc))
        # A self-signed CA is itself a root of the bundle, so nothing follows the leaf; an upstream-signed CA
        # is an intermediate and travels with the leaf, followed by any upstream intermediates.
        object.__setattr__(self, "chain_from_ca", () if self_signed(cert) else (cert, *self.issuer_chain))

    def record(self) -> X509Record:
        return X509Record(self.slot_id, self.status, self.certificate, self.issuer_chain, self.tainted)

    def info(self) -> AuthorityInfo:
        upstream_id = key_id(self.issuer_chain[0].public_key()) if self.issuer_chain else ""  # type: ignore[arg-type]
        return _info(self, upstream_id)


@dataclass(frozen=True, slots=True)
class JwtAuthority:
    """A JWT signing key the server holds; tokens and the JWT bundle name it by its authority ID (``kid``)."""

    kind: ClassVar[AuthorityKind] = "jwt"

    slot_id: str
    key: SigningKey
    authority_id: str
    lifetime: Lifetime
    status: Status
    tainted: bool = False

    def record(self) -> JwtRecord:
        return JwtRecord(
            self.slot_id,
            self.status,
            self.authority_id,
            self.key.public_key,
            self.lifetime.not_before,
            self.lifetime.not_after,
            self.tainted,
        )

    def info(self) -> AuthorityInfo:
        return _info(self)


A = TypeVar("A", X509Authority, JwtAuthority)


def _info(authority: X509Authority | JwtAuthority, upstream_authority_id: str = "") -> AuthorityInfo:
    lifetime = authority.lifetime
    return AuthorityInfo(
        authority.kind,
        authority.authority_id,
        authority.status,
        lifetime.not_before,
        lifetime.not_after,
        authority.key.kind,
        authority.tainted,
        upstream_authority_id,
    )


@dataclass(frozen=True, slots=True)
class Slots(Generic[A]):
    """One family's authorities by slot. Every method returns a new value; none touches a key."""

    active: A | None = None
    prepared: A | None = None
    old: tuple[A, ...] = ()

    @classmethod
    def of(cls, items: Sequence[A]) -> Slots[A]:
        """The slots of restored authorities, each placed by its recorded status."""
        active = next((a for a in items if a.status is Status.ACTIVE), None)
        prepared = next((a for a in items if a.status is Status.PREPARED), None)
        return cls(active=active, prepared=prepared, old=tuple(a for a in items if a.status is Status.OLD))

    def all(self) -> tuple[A, ...]:
        """Every authority, oldest first: the order they appear in the bundle."""
        items: list[A] = list(self.old)
        if self.active is not None:
            items.append(self.active)
        if self.prepared is not None:
            items.append(self.prepared)
        items.sort(key=lambda a: (a.lifetime.not_before, a.slot_id))
        return tuple(items)

    def find(self, authority_id: str) -> A | None:
        """The authority with this ID (as an operator types it: any case, spaces around ignored)."""
        wanted = authority_id.strip().lower()
        return next((a for a in self.all() if a.authority_id.lower() == wanted), None)

    def schedule_state(self, issuer_not_after: datetime | None = None) -> SlotState:
        return SlotState(
            active=self.active.lifetime if self.active else None,
            prepared=self.prepared.lifetime if self.prepared else None,
            old=tuple(a.lifetime for a in self.old),
            issuer_not_after=issuer_not_after,
        )

    def with_prepared(self, authority: A) -> Slots[A]:
        """``authority`` in the prepared slot (replacing any prepared one, whose key the caller retires)."""
        return replace(self, prepared=authority)

    def activated(self) -> Slots[A]:
        """The prepared authority signs; the active one joins the old ones, which stay in the bundle until they
        expire. Without a prepared authority nothing changes."""
        if self.prepared is None:
            return self
        old: list[A] = list(self.old)
        if self.active is not None:
            old.append(replace(self.active, status=Status.OLD))
        return Slots(active=replace(self.prepared, status=Status.ACTIVE), prepared=None, old=tuple(old))

    def pruned(self, now: datetime) -> tuple[Slots[A], list[A]]:
        """Without the expired old (and prepared) authorities, and those removed."""
        gone = [a for a in self.old if a.lifetime.expired(now)]
        keep_old = tuple(a for a in self.old if not a.lifetime.expired(now))
        prepared = self.prepared
        if prepared is not None and prepared.lifetime.expired(now):
            gone.append(prepared)
            prepared = None
        return Slots(active=self.active, prepared=prepared, old=keep_old), gone

    def with_old_tainted(self, authority_id: str) -> Slots[A]:
        """The old authority with this ID marked tainted."""
        old = tuple(replace(a, tainted=True) if a.authority_id == authority_id else a for a in self.old)
        return replace(self, old=old)

    def without_old(self, authority_id: str) -> Slots[A]:
        """Without the old authority with this ID."""
        return replace(self, old=tuple(a for a in self.old if a.authority_id != authority_id))


def issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """Whether ``cert`` names ``issuer`` as its issuer and ``issuer``'s key signed it; any doubt is a no."""
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


def self_signed(cert: x509.Certificate) -> bool:
    return issued_by(cert, cert)
