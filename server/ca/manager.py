"""The manager that rotates the server's authorities: X.509 CAs and JWT keys in prepared / active / old slots.

- It decides which authority signs and hands the active pair to the CA that signs (:attr:`CaManager.ca`, a
  :class:`~tessera.server.ca.signing.ServerCa`), as SPIRE's CA manager drives its CA. Both families rotate on
  the same pure schedule (:mod:`tessera.server.ca.schedule`) over immutable slots (:mod:`tessera.server.ca.slots`).
- It is driven from outside with instants: the server's loop calls :meth:`CaManager.tick` and sleeps until
  :meth:`CaManager.next_event_at`; the admin API calls :meth:`CaManager.prepare` / :meth:`CaManager.activate`
  (and :meth:`CaManager.taint` / :meth:`CaManager.revoke`) to force a rotation. Every change is recorded in
  the journal before a retired key is destroyed, so a crash at any point leaves a server that restarts with
  the same active CA.
- By default each X.509 CA is a self-signed root and the trust bundle holds the CAs themselves. With an
  :class:`~tessera.server.ca.upstream.UpstreamAuthority`, each CA is an intermediate signed by the upstream
  key, the bundle holds the upstream root(s) and SVID chains carry the intermediates.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.keys import PublicKey, key_id, public_key_der, public_keys_equal
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.x509profile import build_ca_certificate
from tessera.server.ca import journal as journal_mod
from tessera.server.ca.config import CaConfig, Clock, instant, utc_now, whole_seconds
from tessera.server.ca.journal import FileJournalStore, Journal, JournalStore, JwtRecord, Status, X509Record
from tessera.server.ca.keymanager import DiskKeyManager, KeyManager, SigningKey
from tessera.server.ca.schedule import Action, Lifetime, next_action, next_event_at
from tessera.server.ca.signing import ActiveAuthorities, ServerCa
from tessera.server.ca.slots import (
    A,
    AuthorityInfo,
    AuthorityKind,
    JwtAuthority,
    Slots,
    X509Authority,
    self_signed,
)
from tessera.server.ca.upstream import UpstreamAuthority
from tessera.server.errors import (
    AuthorityStateError,
    CaError,
    CaJournalError,
    KeyManagerError,
    UnknownAuthorityError,
)

log = logging.getLogger("tessera.server.ca")

X509_SLOT_PREFIX = "x509-"
JWT_SLOT_PREFIX = "jwt-"
_MAX_STEPS_PER_TICK = 8
_NOUNS: dict[AuthorityKind, str] = {"x509": "X.509 CA", "jwt": "JWT key"}


@dataclass(frozen=True, slots=True)
class RotationEvent:
    """Something :meth:`CaManager.tick`, :meth:`CaManager.prepare` or :meth:`CaManager.activate` did."""

    kind: AuthorityKind
    action: Action
    authority_ids: tuple[str, ...]
    """The authorities concerned: the new one (prepare), the newly active one (activate), the removed ones."""


class CaManager:
    """Rotates the server's authorities. Thread-safe; ``now=None`` reads the clock."""

    def __init__(
        self,
        trust_domain: TrustDomain | str,
        key_manager: KeyManager,
        journal_store: JournalStore,
        config: CaConfig | None = None,
        upstream: UpstreamAuthority | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self.trust_domain = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
        self.config = config or CaConfig()
        self.upstream = upstream
        self.ca = ServerCa(self.trust_domain, self.config, clock)
        """The CA that signs, with whatever this manager last activated."""
        self._keys = key_manager
        self._store = journal_store
        self._clock = clock
        self._lock = threading.RLock()
        self._x509: Slots[X509Authority] = Slots()
        self._jwt: Slots[JwtAuthority] = Slots()
        self._sequence = 0
        self._digest = ""
        self._dirty = False
        self._loaded = False

    @classmethod
    def open(
        cls,
        data_dir: Path | str,
        trust_domain: TrustDomain | str,
        config: CaConfig | None = None,
        upstream: UpstreamAuthority | None = None,
        clock: Clock = utc_now,
        journal_store: JournalStore | None = None,
        now: datetime | None = None,
        key_manager: KeyManager | None = None,
    ) -> CaManager:
        """The usual start-up: keys in ``<data_dir>/keys`` (or the given key manager), journal in
        ``<data_dir>/ca_journal.json`` (or the given store), restored from the journal and brought up to date
        (a first start creates the CAs)."""
        data = Path(data_dir)
        manager = cls(
            trust_domain,
            key_manager or DiskKeyManager(data / "keys"),
            journal_store or FileJournalStore(data / "ca_journal.json"),
            config,
            upstream,
            clock,
        )
        manager.load()
        manager.tick(now)
        return manager

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
            self._x509 = Slots.of(x509_items)
            self._jwt = Slots.of(jwt_items)
            self._sequence = journal.bundle_sequence
            self._digest = journal.bundle_digest
            dropped = len(journal.x509) - len(x509_items) + len(journal.jwt) - len(jwt_items)
            self._loaded = True
            self._publish_active()
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
        if self.upstream is None and not (self_signed(record.certificate) and not record.issuer_chain):
            log.warning("dropping %s: it was signed by an upstream authority, which is no longer configured", where)
            return None
        if self.upstream is not None and not self.upstream.anchors(record.certificate, record.issuer_chain):
            log.warning("dropping %s: the configured upstream authority does not vouch for it", where)
            return None
        return X509Authority(
            record.slot_id, key, record.certificate, record.issuer_chain, record.status, record.tainted
        )

    def _restore_jwt(self, record: JwtRecord) -> JwtAuthority | None:
        where = f"JWT key {record.authority_id} in slot {record.slot_id}"
        key = self._load_key(record.slot_id, where)
        if key is None:
            return None
        if public_key_der(key.public_key) != public_key_der(record.public_key):
            log.warning("dropping %s: its stored key does not match the journal", where)
            return None
        lifetime = Lifetime(record.not_before, record.not_after)
        return JwtAuthority(record.slot_id, key, record.authority_id, lifetime, record.status, record.tainted)

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
        now = instant(self._clock, now)
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
                    self._x509, event = _step("x509", self._x509, action, now, self._new_x509_authority, retired)
                    events.append(event)
            except CaError as exc:
                failure = exc
            try:
                for _ in range(_MAX_STEPS_PER_TICK):
                    action = next_action(self._jwt.schedule_state(), now)
                    if action is None:
                        break
                    self._jwt, event = _step("jwt", self._jwt, action, now, self._new_jwt_authority, retired)
                    events.append(event)
            except CaError as exc:
                failure = failure or exc
            self._commit(bool(events), retired)
            if failure is not None:
                raise failure
            return events

    def prepare(self, now: datetime | None = None) -> list[RotationEvent]:
        """Forces new prepared authorities (X.509 and JWT), replacing prepared ones; publishes them at once."""
        now = instant(self._clock, now)
        with self._lock:
            self._require_loaded()
            retired: list[str] = []
            self._x509, x509_event = _step("x509", self._x509, Action.PREPARE, now, self._new_x509_authority, retired)
            self._jwt, jwt_event = _step("jwt", self._jwt, Action.PREPARE, now, self._new_jwt_authority, retired)
            self._commit(True, retired)
            return [x509_event, jwt_event]

    def activate(self, now: datetime | None = None) -> list[RotationEvent]:
        """Forces the prepared authorities to become active (the active ones become old).

        Raises :class:`CaError` when there is nothing prepared: prepare first, and give relying parties time
        to fetch the new bundle, or SVIDs from the new CA will be refused.
        """
        now = instant(self._clock, now)
        with self._lock:
            self._require_loaded()
            if self._x509.prepared is None and self._jwt.prepared is None:
                raise CaError("there is no prepared authority to activate; run `ca prepare` first")
            retired: list[str] = []
            events = []
            if self._x509.prepared is not None:
                self._x509, event = _step("x509", self._x509, Action.ACTIVATE, now, self._new_x509_authority, retired)
                events.append(event)
            if self._jwt.prepared is not None:
                self._jwt, event = _step("jwt", self._jwt, Action.ACTIVATE, now, self._new_jwt_authority, retired)
                events.append(event)
            self._commit(True, retired)
            return events

    # ---- forced retirement (taint / revoke) ---------------------------------------------------------

    def _find(self, kind: str, authority_id: str) -> X509Authority | JwtAuthority:
        if kind == "x509":
            slots: Slots[X509Authority] | Slots[JwtAuthority] = self._x509
        elif kind == "jwt":
            slots = self._jwt
        else:
            raise ValueError(f"authority kind must be 'x509' or 'jwt', got {kind!r}")
        found = slots.find(authority_id)
        if found is None:
            known = ", ".join(a.authority_id for a in slots.all()) or "none"
            raise UnknownAuthorityError(f"no {kind} authority with id {authority_id!r} (held: {known})")
        return found

    def taint(self, kind: str, authority_id: str) -> bool:
        """Marks an old authority tainted: SVIDs it signed must be re-issued now (agents learn it at their next
        sync). Only an old authority can be tainted: activate a replacement first, or every SVID re-issued
        would be signed by the tainted key again. Returns False when it was tainted already."""
        with self._lock:
            self._require_loaded()
            item = self._find(kind, authority_id)
            if item.status is Status.ACTIVE:
                raise AuthorityStateError(
                    f"{kind} authority {authority_id} is active; run `ca prepare` and `ca activate` first, then "
                    "taint it"
                )
            if item.status is Status.PREPARED:
                raise AuthorityStateError(
                    f"{kind} authority {authority_id} is only prepared and signed nothing; `ca prepare` replaces it"
                )
            if item.tainted:
                return False
            if item.kind == "x509":
                self._x509 = self._x509.with_old_tainted(item.authority_id)
            else:
                self._jwt = self._jwt.with_old_tainted(item.authority_id)
            self._commit(True, ())
            log.warning("%s authority %s tainted: everything it signed is being re-issued", kind, authority_id)
            return True

    def revoke(self, kind: str, authority_id: str) -> None:
        """Removes a tainted old authority from the bundle and destroys its key, so nothing it signed verifies.

        Whether SVIDs it signed are still in use is for the caller to check first (the CA does not track
        issued SVIDs); this refuses only what is wrong in the CA itself: an authority that is not tainted, or
        an X.509 CA signed by an upstream authority (the bundle holds the upstream root, so removing the
        intermediate here would not stop its chains from verifying: revoke it in the upstream PKI).
        """
        with self._lock:
            self._require_loaded()
            item = self.check_revocable(kind, authority_id)
            if item.kind == "x509":
                self._x509 = self._x509.without_old(item.authority_id)
            else:
                self._jwt = self._jwt.without_old(item.authority_id)
                self.ca.forget_jwt_authority(item.authority_id)
            self._commit(True, (item.slot_id,))
            log.warning("%s authority %s revoked: removed from the bundle, key destroyed", kind, authority_id)

    def check_revocable(self, kind: str, authority_id: str) -> X509Authority | JwtAuthority:
        """The authority, if its own state allows revoking it (else AuthorityStateError / UnknownAuthorityError)."""
        with self._lock:
            self._require_loaded()
            item = self._find(kind, authority_id)
            if item.status is not Status.OLD or not item.tainted:
                raise AuthorityStateError(
                    f"{kind} authority {authority_id} is {item.status.value}"
                    f"{'' if item.tainted else ' and not tainted'}; only a tainted old authority can be revoked "
                    "(activate a replacement, taint this one, wait for SVIDs to be re-issued, then revoke)"
                )
            if item.kind == "x509" and self.upstream is not None:
                raise AuthorityStateError(
                    f"X.509 CA {authority_id} is signed by the upstream authority, whose root stays in the bundle; "
                    "revoke it in the upstream PKI (its CRL) instead"
                )
            return item

    def next_event_at(self, now: datetime | None = None) -> datetime | None:
        """When :meth:`tick` next has something to do (``now`` if already due): sleep exactly until then.

        After a :meth:`tick` that raised (e.g. the upstream CA expired) this stays ``now``: the caller's loop
        should retry with a backoff rather than spin.
        """
        now = instant(self._clock, now)
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

    def _new_x509_authority(self, now: datetime) -> X509Authority:
        if self.upstream is not None:
            self.upstream.check_usable(now)
        slot_id = f"{X509_SLOT_PREFIX}{secrets.token_hex(8)}"
        key = self._keys.generate(slot_id, self.config.ca_key_kind)
        try:
            start = whole_seconds(now)
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

    def _new_jwt_authority(self, now: datetime) -> JwtAuthority:
        slot_id = f"{JWT_SLOT_PREFIX}{secrets.token_hex(8)}"
        key = self._keys.generate(slot_id, self.config.jwt_key_kind)
        start = whole_seconds(now)
        lifetime = Lifetime(start - self.config.backdate, start + self.config.effective_jwt_key_ttl)
        return JwtAuthority(slot_id, key, key_id(key.public_key), lifetime, Status.PREPARED)

    def _commit(self, changed: bool, retired: Sequence[str]) -> None:
        """Hands the active pair to the CA that signs, records the new state, then destroys retired keys (never
        the other way round)."""
        self._publish_active()
        if changed:
            self._dirty = True
        self._update_sequence()
        self._save()
        for slot_id in retired:
            self._delete_key(slot_id)

    def _publish_active(self) -> None:
        self.ca.set_active(ActiveAuthorities(self._x509.active, self._jwt.active))

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
    def active_jwt_authority(self) -> JwtAuthority | None:
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
        """``{authority ID (kid): public key}`` of every held JWT key (prepared, active, old)."""
        return {k.authority_id: k.key.public_key for k in self._jwt.all()}

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
        return [a.info() for a in self._x509.all()] + [k.info() for k in self._jwt.all()]

    def held_x509_authorities(self) -> tuple[X509Authority, ...]:
        """Every X.509 CA held (prepared, active, old), oldest first: each signs its own CRL."""
        return self._x509.all()


def _step(
    kind: AuthorityKind,
    slots: Slots[A],
    action: Action,
    now: datetime,
    new: Callable[[datetime], A],
    retired: list[str],
) -> tuple[Slots[A], RotationEvent]:
    """One rotation step of one family: its new slots and what happened. Keys to destroy once the new state is
    recorded are added to ``retired``; ``new`` makes a fresh authority (the only step that touches a key)."""
    noun = _NOUNS[kind]
    if action is Action.PREPARE:
        authority = new(now)
        if slots.prepared is not None:
            retired.append(slots.prepared.slot_id)
        log.info("prepared %s %s (valid until %s)", noun, authority.authority_id, authority.lifetime.not_after)
        return slots.with_prepared(authority), RotationEvent(kind, action, (authority.authority_id,))
    if action is Action.ACTIVATE:
        prepared = slots.prepared
        if prepared is None:  # next_action never asks for this; activate() checks before calling
            raise CaError(f"there is no prepared {noun} to activate")
        log.info("activated %s %s", noun, prepared.authority_id)
        return slots.activated(), RotationEvent(kind, action, (prepared.authority_id,))
    keep, gone = slots.pruned(now)
    retired.extend(a.slot_id for a in gone)
    for authority in gone:
        log.info("pruned expired %s %s", noun, authority.authority_id)
    return keep, RotationEvent(kind, action, tuple(a.authority_id for a in gone))


def _bundle_digest(certs: Sequence[x509.Certificate], jwt_keys: Mapping[str, PublicKey]) -> str:
    """A fingerprint of the bundle's content ("" for an empty bundle, the state before the first CA)."""
    if not certs and not jwt_keys:
        return ""
    h = hashlib.sha256()
    for der in sorted(c.public_bytes(serialization.Encoding.DER) for c in certs):
        h.update(b"x509\0" + len(der).to_bytes(4, "big") + der)
    for authority_id, public_key in sorted(jwt_keys.items()):
        der = public_key_der(public_key)
        h.update(b"jwt\0" + authority_id.encode() + b"\0" + len(der).to_bytes(4, "big") + der)
    return h.hexdigest()
