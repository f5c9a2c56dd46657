"""The server's certificate authority: X.509 CAs and JWT signing keys in prepared / active / old slots.

One :class:`CaManager` owns two families of authorities that rotate on the same schedule
(:mod:`tessera.server.ca.schedule`): X.509 CAs, which sign X509-SVIDs, and JWT keys, which sign JWT-SVIDs.
It is driven from outside with instants: the server's loop calls :meth:`CaManager.tick` and sleeps until
:meth:`CaManager.next_event_at`; the admin API calls :meth:`CaManager.prepare` / :meth:`CaManager.activate`
to force a rotation. Every change is recorded in the journal before a retired key is destroyed, so a crash
at any point leaves a server that restarts with the same active CA.

By default each X.509 CA is a self-signed root and the trust bundle holds the CAs themselves. With an
:class:`~tessera.server.ca.upstream.UpstreamAuthority`, each CA is an intermediate signed by the upstream
key, the bundle holds the upstream root(s) and SVID chains carry the intermediates.

Signing reads an immutable snapshot of the slots without taking the lock, so the signing path (the node
API's batch signing) never waits behind a rotation.
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import secrets
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Generic, Literal, TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.errors import SpiffeIdError, SvidError
from tessera.sdk.jwtsvid import mint_jwt_svid
from tessera.sdk.keys import PublicKey, key_id, public_key_der, public_keys_equal
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.x509profile import DEFAULT_CA_COMMON_NAME, build_ca_certificate, build_x509_svid
from tessera.server.ca import journal as journal_mod
from tessera.server.ca.csr import check_public_key
from tessera.server.ca.journal import FileJournalStore, Journal, JournalStore, JwtRecord, Status, X509Record
from tessera.server.ca.keymanager import DEFAULT_KEY_KIND, DiskKeyManager, KeyManager, SigningKey, check_key_kind
from tessera.server.ca.schedule import Action, Lifetime, SlotState, next_action, next_event_at
from tessera.server.ca.upstream import UpstreamAuthority
from tessera.server.errors import BadSigningRequestError, CaError, CaJournalError, CaNotReadyError, KeyManagerError

log = logging.getLogger("tessera.server.ca")

X509_SLOT_PREFIX = "x509-"
JWT_SLOT_PREFIX = "jwt-"
_MAX_STEPS_PER_TICK = 8
_MAX_DNS_NAME = 253


class UnknownAuthorityError(CaError):
    """No authority with that key id is held."""


class AuthorityStateError(CaError):
    """The authority is in a state that does not allow the operation (the message says what to do first)."""


def utc_now() -> datetime:
    return datetime.now(UTC)


def _whole_seconds(value: datetime) -> datetime:
    """Certificates and JWTs carry whole seconds; computing with the same precision keeps caps exact."""
    return value.replace(microsecond=0)


@dataclass(frozen=True)
class CaConfig:
    """CA settings. Durations are :class:`~datetime.timedelta`; defaults are SPIRE's."""

    ca_key_kind: str = DEFAULT_KEY_KIND
    ca_ttl: timedelta = timedelta(hours=24)
    jwt_key_kind: str = DEFAULT_KEY_KIND
    jwt_key_ttl: timedelta | None = None
    """Life of a JWT signing key; None = the same as ``ca_ttl``."""
    x509_svid_ttl: timedelta = timedelta(hours=1)
    """Default X509-SVID life when the request does not give one."""
    max_x509_svid_ttl: timedelta = timedelta(hours=24)
    """Longer requested X509-SVID lives are cut to this (and every SVID is cut at its CA's notAfter)."""
    jwt_svid_ttl: timedelta = timedelta(minutes=5)
    max_jwt_svid_ttl: timedelta = timedelta(hours=24)
    backdate: timedelta = timedelta(seconds=10)
    """notBefore is set this far in the past so peers with slightly slow clocks accept new certificates."""
    ca_common_name: str = DEFAULT_CA_COMMON_NAME
    bundle_refresh_hint: timedelta | None = timedelta(minutes=5)

    def __post_init__(self) -> None:
        check_key_kind(self.ca_key_kind)
        check_key_kind(self.jwt_key_kind)
        if self.ca_ttl < timedelta(minutes=1):
            raise ValueError(f"ca_ttl must be at least 1 minute, got {self.ca_ttl}")
        if self.jwt_key_ttl is not None and self.jwt_key_ttl < timedelta(minutes=1):
            raise ValueError(f"jwt_key_ttl must be at least 1 minute, got {self.jwt_key_ttl}")
        for name in ("x509_svid_ttl", "max_x509_svid_ttl", "jwt_svid_ttl", "max_jwt_svid_ttl"):
            value: timedelta = getattr(self, name)
            if value < timedelta(seconds=1):
                raise ValueError(f"{name} must be at least 1 second, got {value}")
        if self.x509_svid_ttl > self.max_x509_svid_ttl:
            raise ValueError("x509_svid_ttl must not exceed max_x509_svid_ttl")
        if self.jwt_svid_ttl > self.max_jwt_svid_ttl:
            raise ValueError("jwt_svid_ttl must not exceed max_jwt_svid_ttl")
        if not timedelta(0) <= self.backdate <= timedelta(minutes=10):
            raise ValueError(f"backdate must be between 0 and 10 minutes, got {self.backdate}")
        if self.bundle_refresh_hint is not None and self.bundle_refresh_hint < timedelta(seconds=1):
            raise ValueError("bundle_refresh_hint must be at least 1 second")

    @property
    def effective_jwt_key_ttl(self) -> timedelta:
        return self.jwt_key_ttl if self.jwt_key_ttl is not None else self.ca_ttl


# --------------------------------------------------------------------------------------------------------
# Slots


@dataclass(frozen=True, slots=True)
class X509Authority:
    """An X.509 CA the server holds: its certificate, its key handle, and what sits between it and a root."""

    slot_id: str
    key: SigningKey
    certificate: x509.Certificate
    issuer_chain: tuple[x509.Certificate, ...]
    status: Status
    tainted: bool = False
    key_id: str = field(init=False)
    lifetime: Lifetime = field(init=False)
    chain_from_ca: tuple[x509.Certificate, ...] = field(init=False)
    """What follows a leaf in every SVID chain: up to, not including, a root of the bundle."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "key_id", x509.SubjectKeyIdentifier.from_public_key(self.key.public_key).digest.hex())
        cert = self.certificate
        object.__setattr__(self, "lifetime", Lifetime(cert.not_valid_before_utc, cert.not_valid_after_utc))
        # A self-signed CA is itself a root of the bundle, so nothing follows the leaf; an upstream-signed CA
        # is an intermediate and travels with the leaf, followed by any upstream intermediates.
        object.__setattr__(self, "chain_from_ca", () if _self_signed(cert) else (cert, *self.issuer_chain))

    def record(self) -> X509Record:
        return X509Record(self.slot_id, self.status, self.certificate, self.issuer_chain, self.tainted)


@dataclass(frozen=True, slots=True)
class JwtKey:
    """A JWT signing key the server holds, named in tokens and in the JWT bundle by ``kid``."""

    slot_id: str
    key: SigningKey
    kid: str
    lifetime: Lifetime
    status: Status
    tainted: bool = False

    def record(self) -> JwtRecord:
        return JwtRecord(
            self.slot_id,
            self.status,
            self.kid,
            self.key.public_key,
            self.lifetime.not_before,
            self.lifetime.not_after,
            self.tainted,
        )


A = TypeVar("A", X509Authority, JwtKey)


@dataclass(frozen=True, slots=True)
class _Slots(Generic[A]):
    active: A | None = None
    prepared: A | None = None
    old: tuple[A, ...] = ()

    def all(self) -> tuple[A, ...]:
        """Every authority, oldest first: the order they appear in the bundle."""
        items: list[A] = list(self.old)
        if self.active is not None:
            items.append(self.active)
        if self.prepared is not None:
            items.append(self.prepared)
        items.sort(key=lambda a: (a.lifetime.not_before, a.slot_id))
        return tuple(items)

    def schedule_state(self, issuer_not_after: datetime | None = None) -> SlotState:
        return SlotState(
            active=self.active.lifetime if self.active else None,
            prepared=self.prepared.lifetime if self.prepared else None,
            old=tuple(a.lifetime for a in self.old),
            issuer_not_after=issuer_not_after,
        )


# --------------------------------------------------------------------------------------------------------
# Public read models


@dataclass(frozen=True, slots=True)
class AuthorityInfo:
    """One line of ``tessera-server ca show``."""

    kind: Literal["x509", "jwt"]
    id: str
    """Hex SKI of the CA key (X.509) or the key ID (JWT)."""
    status: Status
    not_before: datetime
    not_after: datetime
    key_kind: str
    tainted: bool
    upstream_authority_id: str = ""
    """For an upstream-signed CA, the hex SKI of the upstream certificate that signed it."""


@dataclass(frozen=True, slots=True)
class RotationEvent:
    """Something :meth:`CaManager.tick`, :meth:`CaManager.prepare` or :meth:`CaManager.activate` did."""

    kind: Literal["x509", "jwt"]
    action: Action
    ids: tuple[str, ...]
    """The authorities concerned: the new one (prepare), the newly active one (activate), the removed ones."""


# --------------------------------------------------------------------------------------------------------
# The manager


class CaManager:
    """The server's CA. Thread-safe; all instants are aware UTC datetimes (``now=None`` reads the clock)."""

    def __init__(
        self,
        trust_domain: TrustDomain | str,
        key_manager: KeyManager,
        journal_store: JournalStore,
        config: CaConfig | None = None,
        upstream: UpstreamAuthority | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.trust_domain = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        self.config = config or CaConfig()
        self.upstream = upstream
        self._keys = key_manager
        self._store = journal_store
        self._clock = clock
        self._lock = threading.RLock()
        self._x509: _Slots[X509Authority] = _Slots()
        self._jwt: _Slots[JwtKey] = _Slots()
        self._sequence = 0
        self._digest = ""
        self._dirty = False
        self._loaded = False
        self._jwt_minted_until: dict[str, datetime] = {}

    @classmethod
    def open(
        cls,
        data_dir: Path | str,
        trust_domain: TrustDomain | str,
        config: CaConfig | None = None,
        upstream: UpstreamAuthority | None = None,
        clock: Callable[[], datetime] = utc_now,
        journal_store: JournalStore | None = None,
        now: datetime | None = None,
    ) -> CaManager:
        """The usual start-up: keys in ``<data_dir>/keys``, journal in ``<data_dir>/ca_journal.json`` (or the
        given store), restored from the journal and brought up to date (a first start creates the CAs)."""
        data = Path(data_dir)
        manager = cls(
            trust_domain,
            DiskKeyManager(data / "keys"),
            journal_store or FileJournalStore(data / "ca_journal.json"),
            config,
            upstream,
            clock,
        )
        manager.load()
        manager.tick(now)
        return manager

    # ---- clock ---------------------------------------------------------------------------------------

    def _now(self, now: datetime | None) -> datetime:
        value = self._clock() if now is None else now
        if value.tzinfo is None:
            raise ValueError("instants must be timezone-aware datetimes")
        return value.astimezone(UTC)

    # ---- restore -------------------------------------------------------------------------------------

    def load(self) -> None:
        """Restores the slots from the journal. Rotates nothing: call :meth:`tick` afterwards.

        Authorities whose key is missing, whose key does not match, or which the current configuration
        cannot use (the upstream authority changed) are dropped with a warning; the next tick replaces them.
        Keys no journal entry refers to (left by a crash between creating a key and recording it) are
        destroyed.
        """
        with self._lock:
            data = self._store.load()
            journal = journal_mod.decode(data) if data is not None else Journal(self.trust_domain.name)
            if journal.trust_domain != self.trust_domain.name:
                raise CaJournalError(
                    f"the CA journal belongs to trust domain {journal.trust_domain!r}, not "
                    f"{self.trust_domain.name!r}; use a fresh data directory for a new trust domain"
                )
            x509_items = [a for a in (self._restore_x509(r) for r in journal.x509) if a is not None]
            jwt_items = [k for k in (self._restore_jwt(r) for r in journal.jwt) if k is not None]
            self._x509 = _slots_from(x509_items)
            self._jwt = _slots_from(jwt_items)
            self._sequence = journal.bundle_sequence
            self._digest = journal.bundle_digest
            dropped = len(journal.x509) - len(x509_items) + len(journal.jwt) - len(jwt_items)
            self._loaded = True
            self._update_sequence()
            if dropped:
                self._dirty = True
                self._save()
            self._delete_orphan_keys()

    def _restore_x509(self, record: X509Record) -> X509Authority | None:
        where = f"X.509 authority in slot {record.slot_id}"
        key = self._load_key(record.slot_id, where)
        if key is None:
            return None
        if not public_keys_equal(key.public_key, record.certificate.public_key()):  # type: ignore[arg-type]
            log.warning("dropping %s: its stored key does not match its certificate", where)
            return None
        if self.upstream is None and not (_self_signed(record.certificate) and not record.issuer_chain):
            log.warning("dropping %s: it was signed by an upstream authority, which is no longer configured", where)
            return None
        if self.upstream is not None and not self.upstream.anchors(record.certificate, record.issuer_chain):
            log.warning("dropping %s: the configured upstream authority does not vouch for it", where)
            return None
        return X509Authority(
            record.slot_id, key, record.certificate, record.issuer_chain, record.status, record.tainted
        )

    def _restore_jwt(self, record: JwtRecord) -> JwtKey | None:
        where = f"JWT key {record.kid} in slot {record.slot_id}"
        key = self._load_key(record.slot_id, where)
        if key is None:
            return None
        if public_key_der(key.public_key) != public_key_der(record.public_key):
            log.warning("dropping %s: its stored key does not match the journal", where)
            return None
        lifetime = Lifetime(record.not_before, record.not_after)
        return JwtKey(record.slot_id, key, record.kid, lifetime, record.status, record.tainted)

    def _load_key(self, slot_id: str, where: str) -> SigningKey | None:
        try:
            key = self._keys.load(slot_id)
        except KeyManagerError as exc:
            log.warning("dropping %s: %s", where, exc)
            return None
        if key is None:
            log.warning("dropping %s: its private key is missing", where)
        return key

    def _delete_orphan_keys(self) -> None:
        referenced = {a.slot_id for a in self._x509.all()} | {k.slot_id for k in self._jwt.all()}
        for slot_id in self._keys.slot_ids():
            if slot_id.startswith((X509_SLOT_PREFIX, JWT_SLOT_PREFIX)) and slot_id not in referenced:
                log.info("destroying unreferenced CA key in slot %s", slot_id)
                self._delete_key(slot_id)

    def _delete_key(self, slot_id: str) -> None:
        try:
            self._keys.delete(slot_id)
        except KeyManagerError as exc:  # the key is unreferenced already; the next start retries
            log.warning("could not destroy retired CA key: %s", exc)

    # ---- rotation ------------------------------------------------------------------------------------

    def tick(self, now: datetime | None = None) -> list[RotationEvent]:
        """Performs every rotation step due at ``now`` (a first start prepares and activates at once).

        The two families are independent: if the X.509 side fails (say the upstream CA expired), the JWT
        side still rotates and what was done is recorded before the error is raised.
        """
        now = self._now(now)
        with self._lock:
            self._require_loaded()
            events: list[RotationEvent] = []
            retired: list[str] = []
            failure: CaError | None = None
            try:
                for _ in range(_MAX_STEPS_PER_TICK):
                    action = next_action(self._x509.schedule_state(self._issuer_not_after()), now)
                    if action is None:
                        break
                    events.append(self._x509_step(action, now, retired))
            except CaError as exc:
                failure = exc
            try:
                for _ in range(_MAX_STEPS_PER_TICK):
                    action = next_action(self._jwt.schedule_state(), now)
                    if action is None:
                        break
                    events.append(self._jwt_step(action, now, retired))
            except CaError as exc:
                failure = failure or exc
            self._commit(bool(events), retired)
            if failure is not None:
                raise failure
            return events

    def prepare(self, now: datetime | None = None) -> list[RotationEvent]:
        """Forces new prepared authorities (X.509 and JWT), replacing prepared ones; publishes them at once."""
        now = self._now(now)
        with self._lock:
            self._require_loaded()
            retired: list[str] = []
            events = [self._x509_step(Action.PREPARE, now, retired), self._jwt_step(Action.PREPARE, now, retired)]
            self._commit(True, retired)
            return events

    def activate(self, now: datetime | None = None) -> list[RotationEvent]:
        """Forces the prepared authorities to become active (the active ones become old).

        Raises :class:`CaError` when there is nothing prepared: prepare first, and give relying parties time
        to fetch the new bundle, or SVIDs from the new CA will be refused.
        """
        now = self._now(now)
        with self._lock:
            self._require_loaded()
            if self._x509.prepared is None and self._jwt.prepared is None:
                raise CaError("there is no prepared authority to activate; run `ca prepare` first")
            retired: list[str] = []
            events = []
            if self._x509.prepared is not None:
                events.append(self._x509_step(Action.ACTIVATE, now, retired))
            if self._jwt.prepared is not None:
                events.append(self._jwt_step(Action.ACTIVATE, now, retired))
            self._commit(True, retired)
            return events

    # ---- forced retirement (taint / revoke) ---------------------------------------------------------

    def _find(self, kind: str, key_id: str) -> X509Authority | JwtKey:
        if kind not in ("x509", "jwt"):
            raise ValueError(f"authority kind must be 'x509' or 'jwt', got {kind!r}")
        wanted = key_id.strip().lower()
        items: Sequence[X509Authority | JwtKey] = self._x509.all() if kind == "x509" else self._jwt.all()
        for item in items:
            if (item.key_id if isinstance(item, X509Authority) else item.kid).lower() == wanted:
                return item
        known = ", ".join((a.key_id if isinstance(a, X509Authority) else a.kid) for a in items) or "none"
        raise UnknownAuthorityError(f"no {kind} authority with id {key_id!r} (held: {known})")

    def taint(self, kind: str, key_id: str) -> bool:
        """Marks an old authority tainted: SVIDs it signed must be re-issued now (agents learn it at their next
        sync). Only an old authority can be tainted: activate a replacement first, or every SVID re-issued
        would be signed by the tainted key again. Returns False when it was tainted already."""
        with self._lock:
            self._require_loaded()
            item = self._find(kind, key_id)
            if item.status is Status.ACTIVE:
                raise AuthorityStateError(
                    f"{kind} authority {key_id} is active; run `ca prepare` and `ca activate` first, then taint it"
                )
            if item.status is Status.PREPARED:
                raise AuthorityStateError(
                    f"{kind} authority {key_id} is only prepared and signed nothing; `ca prepare` replaces it"
                )
            if item.tainted:
                return False
            if isinstance(item, X509Authority):
                self._x509 = replace(
                    self._x509, old=tuple(replace(a, tainted=True) if a is item else a for a in self._x509.old)
                )
            else:
                self._jwt = replace(
                    self._jwt, old=tuple(replace(k, tainted=True) if k is item else k for k in self._jwt.old)
                )
            self._commit(True, ())
            log.warning("%s authority %s tainted: everything it signed is being re-issued", kind, key_id)
            return True

    def jwt_minted_until(self, kid: str) -> datetime | None:
        """The latest expiry of a JWT-SVID minted with ``kid`` since this process started (None: none seen)."""
        return self._jwt_minted_until.get(kid)

    def revoke(self, kind: str, key_id: str) -> None:
        """Removes a tainted old authority from the bundle and destroys its key, so nothing it signed verifies.

        Whether SVIDs it signed are still in use is for the caller to check first (the CA does not track
        issued SVIDs); this refuses only what is wrong in the CA itself: an authority that is not tainted, or
        an X.509 CA signed by an upstream authority (the bundle holds the upstream root, so removing the
        intermediate here would not stop its chains from verifying: revoke it in the upstream PKI).
        """
        with self._lock:
            self._require_loaded()
            item = self.check_revocable(kind, key_id)
            if isinstance(item, X509Authority):
                self._x509 = replace(self._x509, old=tuple(a for a in self._x509.old if a is not item))
            else:
                self._jwt = replace(self._jwt, old=tuple(k for k in self._jwt.old if k is not item))
                self._jwt_minted_until.pop(item.kid, None)
            self._commit(True, (item.slot_id,))
            log.warning("%s authority %s revoked: removed from the bundle, key destroyed", kind, key_id)

    def check_revocable(self, kind: str, key_id: str) -> X509Authority | JwtKey:
        """The authority, if its own state allows revoking it (else AuthorityStateError / UnknownAuthorityError)."""
        with self._lock:
            self._require_loaded()
            item = self._find(kind, key_id)
            if item.status is not Status.OLD or not item.tainted:
                raise AuthorityStateError(
                    f"{kind} authority {key_id} is {item.status.value}"
                    f"{'' if item.tainted else ' and not tainted'}; only a tainted old authority can be revoked "
                    "(activate a replacement, taint this one, wait for SVIDs to be re-issued, then revoke)"
                )
            if isinstance(item, X509Authority) and self.upstream is not None:
                raise AuthorityStateError(
                    f"X.509 CA {key_id} is signed by the upstream authority, whose root stays in the bundle; "
                    "revoke it in the upstream PKI (its CRL) instead"
                )
            return item

    def held_x509_authorities(self) -> tuple[X509Authority, ...]:
        """Every X.509 CA held (prepared, active, old), oldest first: each signs its own CRL."""
        return self._x509.all()

    def next_event_at(self, now: datetime | None = None) -> datetime | None:
        """When :meth:`tick` next has something to do (``now`` if already due): sleep exactly until then.

        After a :meth:`tick` that raised (e.g. the upstream CA expired) this stays ``now``: the caller's loop
        should retry with a backoff rather than spin.
        """
        now = self._now(now)
        x509_slots, jwt_slots = self._x509, self._jwt
        times = [
            t
            for t in (
                next_event_at(x509_slots.schedule_state(self._issuer_not_after()), now),
                next_event_at(jwt_slots.schedule_state(), now),
            )
            if t is not None
        ]
        return min(times) if times else None

    def _require_loaded(self) -> None:
        if not self._loaded:
            raise CaError("the CA manager has not loaded its journal yet; call load() first")

    def _issuer_not_after(self) -> datetime | None:
        return self.upstream.not_after if self.upstream is not None else None

    def _x509_step(self, action: Action, now: datetime, retired: list[str]) -> RotationEvent:
        slots = self._x509
        if action is Action.PREPARE:
            authority = self._new_x509_authority(now)
            if slots.prepared is not None:
                retired.append(slots.prepared.slot_id)
            self._x509 = replace(slots, prepared=authority)
            log.info("prepared X.509 CA %s (valid until %s)", authority.key_id, authority.lifetime.not_after)
            return RotationEvent("x509", action, (authority.key_id,))
        if action is Action.ACTIVATE:
            prepared = slots.prepared
            if prepared is None:  # next_action never asks for this; activate() checks before calling
                raise CaError("there is no prepared X.509 CA to activate")
            self._x509 = _activated(slots, prepared)
            log.info("activated X.509 CA %s", prepared.key_id)
            return RotationEvent("x509", action, (prepared.key_id,))
        keep, gone = _prune(slots, now)
        self._x509 = keep
        retired.extend(a.slot_id for a in gone)
        for authority in gone:
            log.info("pruned expired X.509 CA %s", authority.key_id)
        return RotationEvent("x509", action, tuple(a.key_id for a in gone))

    def _jwt_step(self, action: Action, now: datetime, retired: list[str]) -> RotationEvent:
        slots = self._jwt
        if action is Action.PREPARE:
            jwt_key = self._new_jwt_key(now)
            if slots.prepared is not None:
                retired.append(slots.prepared.slot_id)
            self._jwt = replace(slots, prepared=jwt_key)
            log.info("prepared JWT key %s (valid until %s)", jwt_key.kid, jwt_key.lifetime.not_after)
            return RotationEvent("jwt", action, (jwt_key.kid,))
        if action is Action.ACTIVATE:
            prepared = slots.prepared
            if prepared is None:
                raise CaError("there is no prepared JWT key to activate")
            self._jwt = _activated(slots, prepared)
            log.info("activated JWT key %s", prepared.kid)
            return RotationEvent("jwt", action, (prepared.kid,))
        keep, gone = _prune(slots, now)
        self._jwt = keep
        retired.extend(k.slot_id for k in gone)
        for jwt_key in gone:
            log.info("pruned expired JWT key %s", jwt_key.kid)
        return RotationEvent("jwt", action, tuple(k.kid for k in gone))

    def _new_x509_authority(self, now: datetime) -> X509Authority:
        if self.upstream is not None:
            self.upstream.check_usable(now)
        slot_id = f"{X509_SLOT_PREFIX}{secrets.token_hex(8)}"
        key = self._keys.generate(slot_id, self.config.ca_key_kind)
        try:
            start = _whole_seconds(now)
            serial = x509.random_serial_number()
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera"),
                    x509.NameAttribute(NameOID.COMMON_NAME, self.config.ca_common_name),
                    # A distinct subject per CA: several CAs of one trust domain sit in the same trust store.
                    x509.NameAttribute(NameOID.SERIAL_NUMBER, format(serial, "x")),
                ]
            )
            issuer_chain: tuple[x509.Certificate, ...] = ()
            if self.upstream is None:
                issuer_cert, issuer_key = None, key.signer
            else:
                issuer_cert, issuer_key = self.upstream.certificate, self.upstream.signer
                issuer_chain = self.upstream.chain
            cert = build_ca_certificate(
                subject_key=key.public_key,
                issuer_cert=issuer_cert,
                issuer_key=issuer_key,
                trust_domain=self.trust_domain,
                not_before=start - self.config.backdate,
                not_after=start + self.config.ca_ttl,
                serial=serial,
                subject=subject,
            )
        except BaseException:
            self._delete_key(slot_id)
            raise
        return X509Authority(slot_id, key, cert, issuer_chain, Status.PREPARED)

    def _new_jwt_key(self, now: datetime) -> JwtKey:
        slot_id = f"{JWT_SLOT_PREFIX}{secrets.token_hex(8)}"
        key = self._keys.generate(slot_id, self.config.jwt_key_kind)
        start = _whole_seconds(now)
        lifetime = Lifetime(start - self.config.backdate, start + self.config.effective_jwt_key_ttl)
        return JwtKey(slot_id, key, key_id(key.public_key), lifetime, Status.PREPARED)

    def _commit(self, changed: bool, retired: Sequence[str]) -> None:
        """Records the new state, then destroys retired keys (never the other way round)."""
        if changed:
            self._dirty = True
        self._update_sequence()
        self._save()
        for slot_id in retired:
            self._delete_key(slot_id)

    def _save(self) -> None:
        if not self._dirty:
            return
        journal = Journal(
            trust_domain=self.trust_domain.name,
            x509=tuple(a.record() for a in self._x509.all()),
            jwt=tuple(k.record() for k in self._jwt.all()),
            bundle_sequence=self._sequence,
            bundle_digest=self._digest,
        )
        self._store.save(journal_mod.encode(journal))
        self._dirty = False

    def _update_sequence(self) -> None:
        digest = _bundle_digest(self.bundle_x509_authorities(), self.jwt_authorities())
        if digest != self._digest:
            self._digest = digest
            self._sequence += 1
            self._dirty = True

    # ---- reading -------------------------------------------------------------------------------------

    @property
    def active_x509_authority(self) -> X509Authority | None:
        return self._x509.active

    @property
    def active_jwt_key(self) -> JwtKey | None:
        return self._jwt.active

    @property
    def bundle_sequence(self) -> int:
        """Increases whenever the bundle's content (X.509 or JWT authorities) changes; survives restarts."""
        return self._sequence

    def bundle_x509_authorities(self) -> list[x509.Certificate]:
        """The trust anchors relying parties need: every held CA (prepared, active, old), or the upstream roots.

        Expired old CAs leave the bundle at the tick that prunes them (:meth:`next_event_at` is their expiry).
        """
        if self.upstream is not None:
            return list(self.upstream.roots)
        return [a.certificate for a in self._x509.all()]

    def jwt_authorities(self) -> dict[str, PublicKey]:
        """``{kid: public key}`` of every held JWT key (prepared, active, old)."""
        return {k.kid: k.key.public_key for k in self._jwt.all()}

    def bundle(self) -> SpiffeBundle:
        """The trust domain's SPIFFE bundle (both kinds of authority), with its sequence number."""
        hint = self.config.bundle_refresh_hint
        with self._lock:
            return SpiffeBundle(
                self.trust_domain,
                tuple(self.bundle_x509_authorities()),
                self.jwt_authorities(),
                sequence=self._sequence,
                refresh_hint=int(hint.total_seconds()) if hint is not None else None,
            )

    def authorities(self) -> list[AuthorityInfo]:
        """Every authority held, for ``ca show``: X.509 CAs then JWT keys, oldest first."""
        infos: list[AuthorityInfo] = []
        for a in self._x509.all():
            upstream_id = ""
            if a.issuer_chain:
                upstream_id = x509.SubjectKeyIdentifier.from_public_key(a.issuer_chain[0].public_key()).digest.hex()
            infos.append(
                AuthorityInfo(
                    "x509",
                    a.key_id,
                    a.status,
                    a.lifetime.not_before,
                    a.lifetime.not_after,
                    a.key.kind,
                    a.tainted,
                    upstream_id,
                )
            )
        for k in self._jwt.all():
            lifetime = k.lifetime
            infos.append(
                AuthorityInfo("jwt", k.kid, k.status, lifetime.not_before, lifetime.not_after, k.key.kind, k.tainted)
            )
        return infos

    # ---- signing -------------------------------------------------------------------------------------

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

    @staticmethod
    def _ttl(requested: float | timedelta | None, default: timedelta, maximum: timedelta) -> timedelta:
        if requested is None:
            return default
        ttl = requested if isinstance(requested, timedelta) else timedelta(seconds=requested)
        if ttl < timedelta(0):
            raise BadSigningRequestError(f"TTL must not be negative, got {ttl.total_seconds():g} seconds")
        if ttl == timedelta(0):
            return default
        return min(ttl, maximum)

    def sign_x509_svid(
        self,
        public_key: PublicKey,
        spiffe_id: SpiffeId | str,
        ttl_seconds: float | timedelta | None = None,
        dns_names: Sequence[str] = (),
        now: datetime | None = None,
        ip_addresses: Sequence[str | ipaddress.IPv4Address | ipaddress.IPv6Address] = (),
    ) -> list[x509.Certificate]:
        """Signs an X509-SVID with the active CA: returns the leaf followed by the intermediates up to (not
        including) a root of the bundle.

        ``ttl_seconds`` None or 0 means the default (1 h); longer than the maximum is cut to the maximum; the
        leaf never outlives the active CA and is backdated by ``config.backdate``. ``ip_addresses`` are for
        the server's own SVID when agents dial it by address.
        """
        now = self._now(now)
        check_public_key(public_key)
        sid = self._spiffe_id(spiffe_id)
        names = _check_dns_names(dns_names)
        try:
            ips = tuple(ipaddress.ip_address(ip) for ip in ip_addresses)
        except ValueError as exc:
            raise BadSigningRequestError(str(exc)) from None
        ttl = self._ttl(ttl_seconds, self.config.x509_svid_ttl, self.config.max_x509_svid_ttl)
        authority = self._x509.active
        if authority is None or now >= authority.lifetime.not_after:
            raise CaNotReadyError("no X.509 CA is active; the server cannot sign X509-SVIDs right now")
        start = _whole_seconds(now)
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
            raise CaNotReadyError(f"cannot sign an X509-SVID with CA {authority.key_id}: {exc}") from None
        except ValueError as exc:  # a DNS name cryptography refuses
            raise BadSigningRequestError(f"cannot sign an X509-SVID for {sid}: {exc}") from None
        return [leaf, *authority.chain_from_ca]

    def mint_jwt_svid(
        self,
        spiffe_id: SpiffeId | str,
        audience: Sequence[str] | str,
        ttl_seconds: float | timedelta | None = None,
        now: datetime | None = None,
    ) -> tuple[str, datetime]:
        """Mints a JWT-SVID with the active JWT key (``kid`` = its key ID); returns the token and its expiry.

        The expiry never passes the key's own notAfter (after which the key leaves the JWT bundle).
        """
        now = self._now(now)
        sid = self._spiffe_id(spiffe_id)
        audiences = [audience] if isinstance(audience, str) else list(audience)
        if not audiences or any(not isinstance(a, str) or not a for a in audiences):
            raise BadSigningRequestError("a JWT-SVID needs at least one audience, and no audience may be empty")
        ttl = self._ttl(ttl_seconds, self.config.jwt_svid_ttl, self.config.max_jwt_svid_ttl)
        jwt_key = self._jwt.active
        if jwt_key is None or now >= jwt_key.lifetime.not_after:
            raise CaNotReadyError("no JWT key is active; the server cannot mint JWT-SVIDs right now")
        issued_at = _whole_seconds(now)
        expires_at = min(issued_at + ttl, jwt_key.lifetime.not_after)
        if expires_at <= issued_at:
            raise CaNotReadyError(f"JWT key {jwt_key.kid} expires now; cannot mint a JWT-SVID")
        token = mint_jwt_svid(jwt_key.key.signer, jwt_key.kid, sid, audiences, expires_at, issued_at)
        previous = self._jwt_minted_until.get(jwt_key.kid)
        if previous is None or expires_at > previous:
            self._jwt_minted_until[jwt_key.kid] = expires_at
        return token, expires_at


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _check_dns_names(names: Iterable[str]) -> tuple[str, ...]:
    checked = []
    for name in names:
        if not isinstance(name, str) or not name:
            raise BadSigningRequestError("DNS names must be non-empty strings")
        if len(name) > _MAX_DNS_NAME or not name.isascii() or any(c.isspace() or c in "/:@" for c in name):
            raise BadSigningRequestError(
                f"DNS name {name!r} is invalid: use an ASCII (IDNA) host name of at most {_MAX_DNS_NAME} characters"
            )
        checked.append(name)
    return tuple(checked)


def _slots_from(items: Sequence[A]) -> _Slots[A]:
    active = next((a for a in items if a.status is Status.ACTIVE), None)
    prepared = next((a for a in items if a.status is Status.PREPARED), None)
    old = tuple(a for a in items if a.status is Status.OLD)
    return _Slots(active=active, prepared=prepared, old=old)


def _activated(slots: _Slots[A], prepared: A) -> _Slots[A]:
    """The slots once ``prepared`` (the prepared authority) signs: the active one joins the old ones, which stay
    in the bundle until they expire."""
    old: list[A] = list(slots.old)
    if slots.active is not None:
        old.append(replace(slots.active, status=Status.OLD))
    return _Slots(active=replace(prepared, status=Status.ACTIVE), prepared=None, old=tuple(old))


def _prune(slots: _Slots[A], now: datetime) -> tuple[_Slots[A], list[A]]:
    gone = [a for a in slots.old if a.lifetime.expired(now)]
    keep_old = tuple(a for a in slots.old if not a.lifetime.expired(now))
    prepared = slots.prepared
    if prepared is not None and prepared.lifetime.expired(now):
        gone.append(prepared)
        prepared = None
    return _Slots(active=slots.active, prepared=prepared, old=keep_old), gone


def _bundle_digest(certs: Sequence[x509.Certificate], jwt_keys: Mapping[str, PublicKey]) -> str:
    """A fingerprint of the bundle's content ("" for an empty bundle, the state before the first CA)."""
    if not certs and not jwt_keys:
        return ""
    h = hashlib.sha256()
    for der in sorted(c.public_bytes(serialization.Encoding.DER) for c in certs):
        h.update(b"x509\0" + len(der).to_bytes(4, "big") + der)
    for kid, public_key in sorted(jwt_keys.items()):
        der = public_key_der(public_key)
        h.update(b"jwt\0" + kid.encode() + b"\0" + len(der).to_bytes(4, "big") + der)
    return h.hexdigest()
