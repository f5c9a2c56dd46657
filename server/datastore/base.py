"""The datastore contract: records and the one interface every backend (SQLite, PostgreSQL) implements.

Callers (the node and admin APIs, attestation, the CA) depend on this module only, never on a backend, so a
deployment can move from SQLite to PostgreSQL without any change above this line.

Every method is synchronous and safe to call from several threads at once (the asyncio APIs call them through
``asyncio.to_thread`` or a small executor). Times are integer unix seconds. Errors are the
:mod:`tessera.server.errors` datastore family: :class:`NotFound`, :class:`AlreadyExists`,
:class:`RevisionConflictError`, :class:`InvalidPageTokenError`, :class:`AgentBannedError`,
:class:`JoinTokenExpiredError`, and :class:`DatastoreError` (their root) for storage that cannot be used.

Revisions. Two global, monotonic counters live in the store:

* the **entries revision** is bumped by every entry create, update and delete, and the changed entry (or
  its tombstone) carries the new value. An agent that holds revision R needs exactly the entries and
  tombstones of its parents with revision > R; when R equals the current revision it needs nothing, and
  finding that out reads one counter row and no entry rows.
* the **bundles revision** is bumped by every bundle set or delete.

Writers of each counter are serialized (the counter row is updated inside the writing transaction), so
revisions become visible in commit order: a reader that saw revision R has seen every change <= R.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, TypeVar

from tessera.server.errors import AlreadyExists
from tessera.server.selectors import Selector

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "MAX_PAGE_SIZE",
    "AttestedAgent",
    "Bundle",
    "Crl",
    "Datastore",
    "EntryChanges",
    "EntryFilter",
    "FederationRelationship",
    "IssuedSvid",
    "JoinToken",
    "Page",
    "RegistrationEntry",
    "Revisions",
    "RevokedCertificate",
    "Selector",
    "SelectorMatch",
    "hash_join_token",
]

DEFAULT_PAGE_SIZE = 1000
MAX_PAGE_SIZE = 10_000

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RegistrationEntry:
    """A registration entry: "workloads with these selectors, under this parent, get this SPIFFE ID".

    ``id`` is a uuid4 string assigned by :meth:`Datastore.create_entry` (pass ``""``). ``selectors`` are kept
    sorted and unique (the datastore normalizes them). TTLs are seconds, 0 meaning the server default.
    ``node`` marks a node alias entry: its ``spiffe_id`` names the group of agents whose node selectors
    include all of the entry's selectors, and its ``parent_id`` is the server's ID. ``expires_at`` is unix
    seconds or None (never). ``revision`` and ``created_at`` are assigned by the datastore.
    """

    id: str
    spiffe_id: str
    parent_id: str
    selectors: tuple[Selector, ...]
    x509_svid_ttl: int = 0
    jwt_svid_ttl: int = 0
    dns_names: tuple[str, ...] = ()
    hint: str = ""
    admin: bool = False
    downstream: bool = False
    node: bool = False
    federates_with: tuple[str, ...] = ()
    expires_at: int | None = None
    revision: int = 0
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class AttestedAgent:
    """An agent the server has attested.

    ``serial`` is the hex serial of the agent SVID the server issued last: the node API refuses an agent
    presenting any other certificate. ``expires_at`` is that SVID's notAfter. A banned agent keeps its row
    (so it cannot simply attest again) with an empty serial; evicting deletes the row, after which the agent
    must attest again (and may, if its attestor allows it). ``reattestable`` is true for attestors that can
    prove the node's identity again (x509pop), false for one-time proofs (join tokens).
    """

    spiffe_id: str
    attestor: str
    selectors: tuple[Selector, ...]
    serial: str
    expires_at: int
    banned: bool = False
    reattestable: bool = False
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True, slots=True)
class JoinToken:
    """A one-time join token. Only the SHA-256 of the secret is stored (``token_hash``, hex).

    ``id`` is a public handle (uuid4) for listing and deleting a token without its secret. ``spiffe_id``,
    when set, is the agent ID an attestation with this token yields (instead of the attestor's default).
    """

    id: str
    token_hash: str
    expires_at: int
    spiffe_id: str | None = None
    created_at: int = 0


@dataclass(frozen=True, slots=True)
class Bundle:
    """A trust bundle: the SPIFFE bundle document (JSON bytes) of one trust domain (own or federated).

    ``revision`` is the value of the global bundles revision when this bundle was last written; pass it back
    as ``expected_revision`` to update it without losing a concurrent writer's change.
    """

    trust_domain: str
    document: bytes
    revision: int


@dataclass(frozen=True, slots=True)
class FederationRelationship:
    """A foreign trust domain whose bundle this server fetches from its bundle endpoint.

    ``profile`` is ``https_web`` (the endpoint has a Web PKI certificate) or ``https_spiffe`` (it presents the
    X509-SVID ``endpoint_spiffe_id`` of the foreign trust domain, checked against that domain's bundle). The
    refresher keeps ``last_refresh`` / ``next_refresh`` / ``last_error`` (unix seconds, "" when fine).
    """

    trust_domain: str
    bundle_endpoint_url: str
    profile: str
    endpoint_spiffe_id: str = ""
    last_refresh: int = 0
    next_refresh: int = 0
    last_error: str = ""
    created_at: int = 0
    updated_at: int = 0


@dataclass(frozen=True, slots=True)
class IssuedSvid:
    """An X509-SVID the server signed, remembered until it expires (``entry_id`` "" for an agent SVID).

    Serials are lowercase hex without leading zeros; ``issuer_key_id`` is the hex SKI of the signing CA.
    """

    serial: str
    issuer_key_id: str
    spiffe_id: str
    entry_id: str
    agent_id: str
    issued_at: int
    expires_at: int


@dataclass(frozen=True, slots=True)
class RevokedCertificate:
    """A serial on the CRL of ``issuer_key_id`` until ``expires_at`` (then it would be refused anyway)."""

    serial: str
    issuer_key_id: str
    spiffe_id: str
    expires_at: int
    revoked_at: int


@dataclass(frozen=True, slots=True)
class Crl:
    """The DER CRL signed by the X.509 authority ``issuer_key_id``, valid until ``next_update``."""

    issuer_key_id: str
    crl: bytes
    next_update: int
    updated_at: int


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a listing. ``next_page_token`` is "" on the last page.

    ``revision`` is the entries revision the listing is pinned to (for entry listings; 0 otherwise): every
    change after it carries a higher revision, so an agent that applies all the pages of a full sync and then
    syncs incrementally from ``revision`` misses nothing, even if entries changed between pages.
    """

    items: list[T]
    next_page_token: str = ""
    revision: int = 0


class SelectorMatch(StrEnum):
    """How :class:`EntryFilter` ``selectors`` are compared with an entry's selectors."""

    EXACT = "exact"
    """The entry has exactly these selectors."""
    SUPERSET = "superset"
    """The entry has at least these selectors (and maybe more)."""
    SUBSET = "subset"
    """All the entry's selectors are among these (the workload-matching rule)."""


@dataclass(frozen=True, slots=True)
class EntryFilter:
    """Filters for :meth:`Datastore.list_entries` / :meth:`Datastore.count_entries`; None = no filter."""

    spiffe_id: str | None = None
    parent_id: str | None = None
    selectors: tuple[Selector, ...] | None = None
    selector_match: SelectorMatch = SelectorMatch.EXACT
    node: bool | None = None


@dataclass(frozen=True, slots=True)
class EntryChanges:
    """What an agent must apply to move from the revision it holds to ``revision``.

    Apply ``removed_ids`` first, then ``upserts`` (an id is never in both). When ``full_sync_required`` is
    true the lists are empty and the caller must send a full (paged) sync instead: the agent's revision is
    older than the oldest tombstone kept, is newer than the store's (a restored or different database), or
    the changes exceed the caller's ``max_changes``.
    """

    upserts: list[RegistrationEntry] = field(default_factory=list)
    removed_ids: list[str] = field(default_factory=list)
    revision: int = 0
    full_sync_required: bool = False


@dataclass(frozen=True, slots=True)
class Revisions:
    """The store's counters, read together in one cheap query.

    ``node_aliases`` is the entries revision of the last change that touched a node alias entry (created,
    deleted, or updated while or after being one): when it is above the revision an agent holds, the set of
    parents that agent inherits through aliases may have changed, so the agent needs a full sync.
    """

    entries: int
    bundles: int
    node_aliases: int


def hash_join_token(token: str) -> str:
    """The stored form of a join token: hex SHA-256 of its UTF-8 bytes (the token itself is never stored)."""
    return hashlib.sha256(token.encode()).hexdigest()


class Datastore(ABC):
    """The storage interface of the server. See the module docstring for threading, times and revisions."""

    # ---- lifecycle ----------------------------------------------------------------------------------------

    @abstractmethod
    def close(self) -> None:
        """Releases connections. Calls after close raise DatastoreError."""

    @abstractmethod
    def ping(self) -> None:
        """Raises DatastoreError when the store cannot serve a read right now (for health checks)."""

    @abstractmethod
    def schema_version(self) -> int:
        """The schema version the store is migrated to."""

    def __enter__(self) -> Datastore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- revisions ----------------------------------------------------------------------------------------

    @abstractmethod
    def revisions(self) -> Revisions:
        """The entries, bundles and node-alias revisions, in one read that touches no entry rows."""

    # ---- registration entries -----------------------------------------------------------------------------

    @abstractmethod
    def create_entry(self, entry: RegistrationEntry) -> RegistrationEntry:
        """Stores a new entry and returns it with its id (uuid4 when ``entry.id`` is ""), revision and
        created_at (now when 0). Selectors are normalized. The caller validates first
        (:func:`tessera.server.entries.validate_entry`); the store only enforces identity.

        Raises AlreadyExists when an entry with the same (spiffe_id, parent_id, selectors) or the same id
        exists; the message names the existing entry's id.
        """

    @abstractmethod
    def create_entries(self, entries: Sequence[RegistrationEntry]) -> list[RegistrationEntry | AlreadyExists]:
        """Creates up to MAX_PAGE_SIZE entries in one transaction (bulk import, batch admin calls).

        Returns one result per input, in order: the stored entry, or the AlreadyExists refusing that one entry
        (a duplicate of a stored entry or of an earlier one in the batch); the others are created regardless.
        Raises ValueError for an oversized batch, DatastoreError when the store fails (then nothing is created).
        """

    @abstractmethod
    def get_entry(self, entry_id: str) -> RegistrationEntry:
        """Raises NotFound."""

    @abstractmethod
    def get_entries(self, entry_ids: Sequence[str]) -> dict[str, RegistrationEntry]:
        """The entries among ``entry_ids`` that exist, keyed by id (unknown ids are simply absent)."""

    @abstractmethod
    def update_entry(self, entry: RegistrationEntry, *, expected_revision: int | None = None) -> RegistrationEntry:
        """Replaces every field of entry ``entry.id`` except id and created_at, and bumps its revision.

        With ``expected_revision`` the update only happens if the stored entry still has that revision
        (RevisionConflictError otherwise). When the parent changes, the old parent's agents see the entry as
        removed. Raises NotFound, AlreadyExists (the new identity collides with another entry).
        """

    @abstractmethod
    def delete_entry(self, entry_id: str) -> RegistrationEntry:
        """Deletes the entry, records a tombstone carrying the new revision, and returns what was deleted.

        Raises NotFound.
        """

    @abstractmethod
    def list_entries(
        self,
        entry_filter: EntryFilter | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[RegistrationEntry]:
        """Entries matching the filter in a stable order (by id), one page at a time.

        Pages are keyset-paged: entries created or deleted meanwhile never make another entry appear twice
        or be skipped (unless it was itself created or deleted meanwhile). ``page_size`` is 1..MAX_PAGE_SIZE.
        Raises InvalidPageTokenError for a token from another listing; ValueError for a bad page size.
        """

    @abstractmethod
    def count_entries(self, entry_filter: EntryFilter | None = None) -> int:
        """How many entries match the filter."""

    @abstractmethod
    def prune_expired_entries(self, now: int) -> list[str]:
        """Deletes (with tombstones) entries whose expires_at is <= now; returns their ids."""

    # ---- sync support -------------------------------------------------------------------------------------

    @abstractmethod
    def entries_changed_since(
        self,
        parent_ids: Sequence[str],
        revision: int,
        *,
        max_changes: int | None = None,
    ) -> EntryChanges:
        """Entries (upserts) and removed entry ids, among the children of ``parent_ids``, whose revision is
        above ``revision``, read in one snapshot together with the current revision.

        When ``revision`` equals the current revision this returns at once without reading entry rows. See
        :class:`EntryChanges` for when ``full_sync_required`` is set. Node alias changes are not detected
        here: compare :meth:`revisions` ``.node_aliases`` with the agent's revision first.
        """

    @abstractmethod
    def entries_for_parents(
        self,
        parent_ids: Sequence[str],
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[RegistrationEntry]:
        """All entries whose parent is one of ``parent_ids``, paged by id: the full sync.

        The first page pins the listing to the current entries revision (``Page.revision``); later pages
        (fetched with the token) report the same revision, which is what the agent should hold afterwards.
        """

    @abstractmethod
    def node_alias_entries_matching(self, agent_selectors: Sequence[Selector]) -> list[RegistrationEntry]:
        """Node alias entries (``node=True``) all of whose selectors are among ``agent_selectors``.

        Their ``spiffe_id`` values are the extra parents the agent inherits (entries parented to an alias are
        authorized for every agent the alias matches).
        """

    @abstractmethod
    def prune_tombstones(self, before: int) -> int:
        """Deletes tombstones recorded before unix time ``before``; returns how many.

        Agents holding a revision older than the newest pruned tombstone then get ``full_sync_required``.
        """

    # ---- attested agents ----------------------------------------------------------------------------------

    @abstractmethod
    def upsert_agent(self, agent: AttestedAgent) -> AttestedAgent:
        """Records a (re-)attested agent: creates it, or replaces attestor, selectors, serial, expires_at and
        reattestable of an existing one (created_at kept, updated_at now).

        Raises AgentBannedError when the agent exists and is banned (nothing is changed).
        """

    @abstractmethod
    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        """Raises NotFound."""

    @abstractmethod
    def list_agents(
        self,
        *,
        banned: bool | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[AttestedAgent]:
        """Agents in SPIFFE ID order, paged; ``banned`` filters on the flag."""

    @abstractmethod
    def count_agents(self, *, banned: bool | None = None) -> int:
        """How many agents (optionally only banned / not banned)."""

    @abstractmethod
    def evict_agent(self, spiffe_id: str) -> None:
        """Deletes the agent (banned or not) so it must attest again. Raises NotFound."""

    @abstractmethod
    def ban_agent(self, spiffe_id: str) -> AttestedAgent:
        """Marks the agent banned and clears its serial: every call and re-attestation is refused until it is
        evicted. Raises NotFound."""

    @abstractmethod
    def set_agent_serial(
        self,
        spiffe_id: str,
        serial: str,
        expires_at: int,
        *,
        expected_serial: str | None = None,
    ) -> AttestedAgent:
        """Records the agent's renewed SVID. With ``expected_serial`` the update only happens while the stored
        serial is still that one (RevisionConflictError otherwise: a concurrent renewal won).

        Raises NotFound, AgentBannedError.
        """

    # ---- join tokens --------------------------------------------------------------------------------------

    @abstractmethod
    def create_join_token(self, token: str, expires_at: int, *, spiffe_id: str | None = None) -> JoinToken:
        """Stores the SHA-256 of ``token`` (never the token). Raises AlreadyExists for a token already stored."""

    @abstractmethod
    def consume_join_token(self, token: str, *, now: int | None = None) -> JoinToken:
        """Atomically deletes the token and returns it: of concurrent consumers exactly one wins.

        Raises NotFound for an unknown or already used token, JoinTokenExpiredError when it expired at or
        before ``now`` (the expired row is deleted too).
        """

    @abstractmethod
    def list_join_tokens(self) -> list[JoinToken]:
        """All unused tokens (hashes only), by expiry."""

    @abstractmethod
    def delete_join_token(self, token_id: str) -> None:
        """Deletes a token by its public id. Raises NotFound."""

    @abstractmethod
    def prune_join_tokens(self, now: int) -> int:
        """Deletes tokens that expired at or before ``now``; returns how many."""

    # ---- bundles ------------------------------------------------------------------------------------------

    @abstractmethod
    def get_bundle(self, trust_domain: str) -> Bundle:
        """Raises NotFound."""

    @abstractmethod
    def list_bundles(self) -> list[Bundle]:
        """Every bundle (own and federated), by trust domain name."""

    @abstractmethod
    def set_bundle(self, trust_domain: str, document: bytes, *, expected_revision: int | None = None) -> Bundle:
        """Creates or replaces a bundle, bumping the bundles revision.

        ``expected_revision`` makes it a compare-and-set (several servers share the own bundle): 0 means "must
        not exist yet", any other value must equal the stored bundle's revision; otherwise
        RevisionConflictError and nothing is written.
        """

    @abstractmethod
    def delete_bundle(self, trust_domain: str) -> None:
        """Deletes a bundle, bumping the bundles revision. Raises NotFound. (Callers refuse to delete their
        own trust domain's bundle; the store does not know which one that is.)"""

    # ---- CA journal ---------------------------------------------------------------------------------------

    @abstractmethod
    def get_ca_journal(self, server_id: str) -> bytes | None:
        """The CA journal blob of server ``server_id``, or None when it has none yet."""

    @abstractmethod
    def set_ca_journal(self, server_id: str, data: bytes) -> None:
        """Creates or replaces the CA journal blob of server ``server_id``."""

    # ---- federation relationships -------------------------------------------------------------------------

    @abstractmethod
    def create_federation_relationship(self, relationship: FederationRelationship) -> FederationRelationship:
        """Stores a new relationship (created_at/updated_at now). Raises AlreadyExists."""

    @abstractmethod
    def get_federation_relationship(self, trust_domain: str) -> FederationRelationship:
        """Raises NotFound."""

    @abstractmethod
    def list_federation_relationships(self) -> list[FederationRelationship]:
        """Every relationship, by trust domain name."""

    @abstractmethod
    def update_federation_relationship(self, relationship: FederationRelationship) -> FederationRelationship:
        """Replaces URL, profile, endpoint ID and refresh state (created_at kept). Raises NotFound."""

    @abstractmethod
    def delete_federation_relationship(self, trust_domain: str) -> None:
        """Deletes the relationship and, in the same transaction, its federated bundle (if any; bumping the
        bundles revision), so agents stop trusting the domain at their next sync. Raises NotFound."""

    # ---- issued and revoked X509-SVIDs --------------------------------------------------------------------

    @abstractmethod
    def record_issued_svids(self, svids: Sequence[IssuedSvid]) -> None:
        """Remembers signed X509-SVIDs (one transaction per call; a repeated serial is replaced)."""

    @abstractmethod
    def list_issued_svids(
        self,
        *,
        serial: str | None = None,
        entry_id: str | None = None,
        agent_id: str | None = None,
        issuer_key_id: str | None = None,
        unexpired_at: int | None = None,
    ) -> list[IssuedSvid]:
        """Issued SVIDs matching every given filter (``unexpired_at``: expires_at > that instant)."""

    @abstractmethod
    def revoke_certificates(self, revoked: Sequence[RevokedCertificate]) -> list[RevokedCertificate]:
        """Adds serials to the revocation list (already listed ones are kept as they are) and bumps the bundles
        revision when anything was added; returns what was added."""

    @abstractmethod
    def list_revoked_certificates(self, *, unexpired_at: int | None = None) -> list[RevokedCertificate]:
        """Revoked certificates by issuer then serial (``unexpired_at``: only those expiring after it)."""

    @abstractmethod
    def set_crls(self, crls: Sequence[Crl], *, delete_issuers: Sequence[str] = ()) -> None:
        """Creates or replaces the given CRLs and deletes those of ``delete_issuers``, in one transaction that
        bumps the bundles revision (agents receive CRLs together with bundles)."""

    @abstractmethod
    def list_crls(self) -> list[Crl]:
        """Every stored CRL, by issuer key id."""

    @abstractmethod
    def prune_issued_and_revoked(self, now: int) -> int:
        """Forgets issued SVIDs and revocations of certificates expired at or before ``now``; returns how many
        rows went (CRLs are rewritten by the CA's owner afterwards)."""
