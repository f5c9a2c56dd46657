"""The agent's workload cache: entries, their X509-SVIDs and JWT-SVIDs, and the trust bundles.

Everything the Workload API serves comes from here, and every change wakes the open streams through one
shared event (swapped on each change), so the fan-out to thousands of streams is a single ``set()``.
Responses are memoized per (cache version, selector set), so a thousand streams of the same workload
cost one response build. Pure state: the clock is injected and no I/O happens here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tessera.agent.bundles import TrustBundle
from tessera.agent.rotation import jwt_reusable_until, rotate_at
from tessera.proto import node_pb2
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.bundle import BundleSet, JwtBundle


@dataclass(frozen=True, slots=True)
class EntryRecord:
    id: str
    spiffe_id: str
    selectors: frozenset[str]
    hint: str = ""
    federates_with: tuple[str, ...] = ()  # trust domain IDs, "spiffe://td"
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    revision: int = 0
    created_at: int = 0
    expires_at: int = 0
    node: bool = False

    @classmethod
    def from_proto(cls, entry: node_pb2.Entry) -> EntryRecord:
        return cls(
            id=entry.id,
            spiffe_id=entry.spiffe_id,
            selectors=frozenset(f"{s.type}:{s.value}" for s in entry.selectors),
            hint=entry.hint,
            federates_with=tuple(td if td.startswith("spiffe://") else f"spiffe://{td}" for td in entry.federates_with),
            x509_svid_ttl=entry.x509_svid_ttl,
            jwt_svid_ttl=entry.jwt_svid_ttl,
            dns_names=tuple(entry.dns_names),
            revision=entry.revision,
            created_at=entry.created_at,
            expires_at=entry.expires_at,
            node=entry.node,
        )

    def signing_inputs(self) -> tuple[object, ...]:
        """What the server puts in the certificate: when any of it changes the SVID must be re-issued."""
        return (self.spiffe_id, self.x509_svid_ttl, tuple(sorted(self.dns_names)))

    def matches(self, selectors: frozenset[str]) -> bool:
        return bool(self.selectors) and self.selectors <= selectors


@dataclass(frozen=True, slots=True)
class CachedSvid:
    entry_id: str
    spiffe_id: str
    chain_der: bytes
    key_der: bytes
    not_before: float
    not_after: float
    rotate_at: float
    signing_inputs: tuple[object, ...] = ()
    authority_key_id: str = ""  # hex AKI of the leaf: which CA signed it (for taint)


@dataclass(frozen=True, slots=True)
class CachedJwt:
    token: str
    issued_at: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Entitlement:
    """What a workload with a given selector set is entitled to right now."""

    entries: tuple[EntryRecord, ...]  # matching entries, default identity first
    x509: wpb.X509SVIDResponse | None  # None while no matching entry has a usable SVID yet
    x509_bundles: wpb.X509BundlesResponse | None
    jwt_bundles: wpb.JWTBundlesResponse | None

    @property
    def has_identity(self) -> bool:
        return bool(self.entries)


class WorkloadCache:
    def __init__(
        self,
        trust_domain_id: str,
        *,
        clock: Callable[[], float] = time.time,
        max_unwatched_svids: int = 1000,
        max_jwt_svids: int = 10000,
    ) -> None:
        self.trust_domain_id = trust_domain_id
        self._clock = clock
        self.max_unwatched_svids = max_unwatched_svids
        self._max_jwt = max_jwt_svids
        self.entries: dict[str, EntryRecord] = {}
        self.svids: OrderedDict[str, CachedSvid] = OrderedDict()  # LRU order: least recently served first
        self.jwts: dict[tuple[str, frozenset[str]], CachedJwt] = {}
        self.bundles: dict[str, TrustBundle] = {}
        self.jwt_bundles: BundleSet[JwtBundle] = BundleSet()  # the same bundles' JWT authorities, by trust domain
        self.crls: tuple[bytes, ...] = ()
        self.version = 0
        self.ready = False  # set once a first sync has been applied
        self._changed = asyncio.Event()
        self._watchers: dict[frozenset[str], int] = {}
        self._requested: set[str] = set()
        self._memo: dict[frozenset[str], Entitlement] = {}
        self._memo_version = -1
        self._selector_types: frozenset[str] = frozenset()
        self.sign_wanted = asyncio.Event()  # set when a workload needs an SVID the cache lacks

    # -- change notification --------------------------------------------------------------------------

    def changed(self) -> asyncio.Event:
        """The event the next change will set; grab it *before* reading state to never miss an update."""
        return self._changed

    def _bump(self) -> None:
        self.version += 1
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- updates from sync -----------------------------------------------------------------------------

    def apply_entries(
        self, upserts: Iterable[EntryRecord], removed_ids: Iterable[str] = (), *, full: bool = False
    ) -> bool:
        """Applies a sync result; returns whether anything changed. SVIDs of removed entries (or entries
        whose certificate contents changed) are dropped at once."""
        new = {} if full else dict(self.entries)
        for entry_id in removed_ids:
            new.pop(entry_id, None)
        for entry in upserts:
            new[entry.id] = entry
        if new == self.entries:
            return False
        self.entries = new
        self._selector_types = _selector_types(new.values())
        for entry_id, svid in list(self.svids.items()):
            current = new.get(entry_id)
            if current is None or current.signing_inputs() != svid.signing_inputs:
                del self.svids[entry_id]
        for key in [k for k in self.jwts if k[0] not in new]:
            del self.jwts[key]
        self._bump()
        return True

    def set_bundles(self, bundles: Mapping[str, TrustBundle], crls: Sequence[bytes] = ()) -> None:
        self.bundles = dict(bundles)
        self.jwt_bundles = BundleSet(b.jwt_bundle for b in self.bundles.values())
        self.crls = tuple(crls)
        self._bump()

    def put_svids(self, svids: Iterable[CachedSvid]) -> None:
        changed = False
        for svid in svids:
            entry = self.entries.get(svid.entry_id)
            if entry is None:
                continue  # removed while its CSR was in flight
            self.svids[svid.entry_id] = svid
            self.svids.move_to_end(svid.entry_id)
            self._requested.discard(svid.entry_id)
            changed = True
        if changed:
            self._evict()
            self._bump()

    def mark_ready(self) -> None:
        if not self.ready:
            self.ready = True
            self._bump()

    def drop_expired(self) -> int:
        now = self._clock()
        expired = [k for k, s in self.svids.items() if s.not_after <= now]
        for k in expired:
            del self.svids[k]
        for key in [k for k, j in self.jwts.items() if j.expires_at <= now]:
            del self.jwts[key]
        if expired:
            self._bump()
        return len(expired)

    def drop_svids_signed_by(self, authority_key_ids: Iterable[str]) -> int:
        tainted = {k.lower() for k in authority_key_ids}
        victims = [k for k, s in self.svids.items() if s.authority_key_id and s.authority_key_id.lower() in tainted]
        for k in victims:
            svid = self.svids[k]
            # keep serving it until the replacement arrives, but rotate now
            self.svids[k] = CachedSvid(
                svid.entry_id,
                svid.spiffe_id,
                svid.chain_der,
                svid.key_der,
                svid.not_before,
                svid.not_after,
                rotate_at=0.0,
                signing_inputs=svid.signing_inputs,
                authority_key_id=svid.authority_key_id,
            )
        return len(victims)

    def rotate_revoked(self, serials: Iterable[int]) -> int:
        """Re-issues now every cached SVID whose leaf serial is on a CRL (kept serving until replaced: the
        server revoked it, so peers refuse it either way, and the replacement comes with this sync)."""
        revoked = set(serials)
        if not revoked:
            return 0
        victims = []
        for k, s in self.svids.items():
            try:
                leaf_serial = x509.load_der_x509_certificate(_first_der(s.chain_der)).serial_number
            except ValueError:
                continue
            if leaf_serial in revoked and s.rotate_at > 0.0:
                victims.append(k)
        for k in victims:
            self.svids[k] = dataclasses.replace(self.svids[k], rotate_at=0.0)
        return len(victims)

    # -- what to sign ----------------------------------------------------------------------------------

    @contextmanager
    def watch(self, selectors: frozenset[str]) -> Iterator[None]:
        """Registers an open stream: its entries' SVIDs are always kept (never evicted)."""
        self._watchers[selectors] = self._watchers.get(selectors, 0) + 1
        try:
            yield
        finally:
            n = self._watchers[selectors] - 1
            if n:
                self._watchers[selectors] = n
            else:
                del self._watchers[selectors]

    def watched_entry_ids(self) -> set[str]:
        ids: set[str] = set()
        for selectors in self._watchers:
            ids.update(e.id for e in self.entries.values() if not e.node and e.matches(selectors))
        return ids

    def request(self, entry_ids: Iterable[str]) -> None:
        """A workload needs SVIDs the cache does not hold (evicted or never signed): ask sync for them."""
        wanted = [i for i in entry_ids if i in self.entries]
        if wanted:
            self._requested.update(wanted)
            self.sign_wanted.set()

    def entries_to_sign(self) -> list[EntryRecord]:
        """Entries needing a (new) SVID now: missing, due for rotation, or re-issue after a change.

        Watched and requested entries always; others to pre-warm only while under the soft cap.
        """
        now = self._clock()
        wanted = self.watched_entry_ids() | self._requested
        result: list[EntryRecord] = []
        room = self.max_unwatched_svids - sum(1 for k in self.svids if k not in wanted)
        for entry in sorted(self.entries.values(), key=lambda e: (e.id not in wanted, e.created_at, e.id)):
            if entry.node or (entry.expires_at and entry.expires_at <= now):
                continue
            svid = self.svids.get(entry.id)
            if svid is not None:
                if svid.rotate_at <= now or svid.not_after <= now:
                    result.append(entry)
                continue
            if entry.id in wanted:
                result.append(entry)
            elif room > 0:
                room -= 1
                result.append(entry)
        return result

    def _evict(self) -> None:
        """Soft cap: least recently served SVIDs nobody watches go first; watched ones never do."""
        keep = self.watched_entry_ids() | self._requested
        unwatched = [k for k in self.svids if k not in keep]
        excess = len(unwatched) - self.max_unwatched_svids
        for k in unwatched[: max(0, excess)]:
            del self.svids[k]

    # -- what workloads get ----------------------------------------------------------------------------

    def uses_selector_type(self, selector_type: str) -> bool:
        """Whether some workload entry has a selector of this type (``unix:sha256``, or just ``unix``): what
        attestation may skip (hashing executables) or must add (the shared-connection check) depends on it."""
        return selector_type in self._selector_types

    def matching_entries(self, selectors: frozenset[str]) -> list[EntryRecord]:
        now = self._clock()
        found = [
            e
            for e in self.entries.values()
            if not e.node and e.matches(selectors) and not (e.expires_at and e.expires_at <= now)
        ]
        found.sort(key=lambda e: (e.created_at, e.id))
        return found

    def entitlement(self, selectors: frozenset[str]) -> Entitlement:
        if self._memo_version != self.version:
            self._memo.clear()
            self._memo_version = self.version
        cached = self._memo.get(selectors)
        if cached is not None:
            return cached
        result = self._build(selectors)
        if len(self._memo) < 4096:
            self._memo[selectors] = result
        return result

    def touch(self, entries: Iterable[EntryRecord]) -> None:
        for e in entries:
            if e.id in self.svids:
                self.svids.move_to_end(e.id)

    def _build(self, selectors: frozenset[str]) -> Entitlement:
        entries = tuple(self.matching_entries(selectors))
        if not entries:
            return Entitlement((), None, None, None)
        now = self._clock()
        own = self.bundles.get(self.trust_domain_id)
        federated_ids = sorted({td for e in entries for td in e.federates_with if td != self.trust_domain_id})
        federated = {td: self.bundles[td] for td in federated_ids if td in self.bundles}

        x509: wpb.X509SVIDResponse | None = None
        svids = [
            wpb.X509SVID(
                spiffe_id=e.spiffe_id,
                x509_svid=s.chain_der,
                x509_svid_key=s.key_der,
                bundle=own.x509_der,
                hint=e.hint,
            )
            for e in entries
            if own is not None and own.x509_der and (s := self.svids.get(e.id)) is not None and s.not_after > now
        ]
        if svids:
            x509 = wpb.X509SVIDResponse(
                svids=svids,
                crl=list(self.crls),
                federated_bundles={td: b.x509_der for td, b in federated.items() if b.x509_der},
            )
        x509_bundles = jwt_bundles = None
        if own is not None:
            all_bundles = {self.trust_domain_id: own, **federated}
            x509_bundles = wpb.X509BundlesResponse(
                crl=list(self.crls), bundles={td: b.x509_der for td, b in all_bundles.items() if b.x509_der}
            )
            jwt_bundles = wpb.JWTBundlesResponse(bundles={td: b.jwks for td, b in all_bundles.items()})
        return Entitlement(entries, x509, x509_bundles, jwt_bundles)

    def missing_svids(self, entries: Iterable[EntryRecord]) -> list[str]:
        now = self._clock()
        return [e.id for e in entries if (s := self.svids.get(e.id)) is None or s.not_after <= now]

    # -- JWT-SVIDs -------------------------------------------------------------------------------------

    def cached_jwt(self, entry_id: str, audience: frozenset[str]) -> CachedJwt | None:
        jwt = self.jwts.get((entry_id, audience))
        if jwt is None or self._clock() >= jwt_reusable_until(jwt.issued_at, jwt.expires_at):
            return None
        return jwt

    def put_jwt(self, entry_id: str, audience: frozenset[str], jwt: CachedJwt) -> None:
        if entry_id not in self.entries:
            return
        if len(self.jwts) >= self._max_jwt:
            now = self._clock()
            for key in [k for k, j in self.jwts.items() if now >= jwt_reusable_until(j.issued_at, j.expires_at)]:
                del self.jwts[key]
            while len(self.jwts) >= self._max_jwt:
                del self.jwts[next(iter(self.jwts))]
        self.jwts[(entry_id, audience)] = jwt

    def now(self) -> float:
        """The cache's clock (seconds since the epoch): what JWT-SVIDs are validated against, as they are cached."""
        return self._clock()


def _selector_types(entries: Iterable[EntryRecord]) -> frozenset[str]:
    """Every ``type`` and ``type:subtype`` prefix of the workload entries' selectors (``unix``, ``unix:sha256``)."""
    types: set[str] = set()
    for entry in entries:
        if entry.node:
            continue  # never matched against a workload
        for selector in entry.selectors:
            parts = selector.split(":", 2)
            types.add(parts[0])
            if len(parts) == 3:
                types.add(f"{parts[0]}:{parts[1]}")
    return frozenset(types)


def make_cached_svid(
    entry: EntryRecord,
    chain: Sequence[x509.Certificate],
    key_der: bytes,
    rand: Callable[[], float] = random.random,
) -> CachedSvid:
    """Wraps a freshly signed chain for the cache, fixing its rotation time (half life +-10 %)."""
    leaf = chain[0]
    not_before = leaf.not_valid_before_utc.timestamp()
    not_after = leaf.not_valid_after_utc.timestamp()
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier or b""
    except x509.ExtensionNotFound:
        aki = b""
    return CachedSvid(
        entry_id=entry.id,
        spiffe_id=entry.spiffe_id,
        chain_der=b"".join(c.public_bytes(Encoding.DER) for c in chain),
        key_der=key_der,
        not_before=not_before,
        not_after=not_after,
        rotate_at=rotate_at(not_before, not_after, rand),
        signing_inputs=entry.signing_inputs(),
        authority_key_id=aki.hex(),
    )


def _first_der(chain_der: bytes) -> bytes:
    """The first certificate of a concatenated DER chain (its SEQUENCE header gives its length)."""
    if len(chain_der) < 2 or chain_der[0] != 0x30:
        raise ValueError("not a DER certificate")
    first = chain_der[1]
    if first < 0x80:
        return chain_der[: 2 + first]
    n = first & 0x7F
    length = int.from_bytes(chain_der[2 : 2 + n], "big")
    return chain_der[: 2 + n + length]
