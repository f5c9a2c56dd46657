# ruff: noqa: S608  (interpolated SQL is only constant column lists, table names and generated "?" lists)
"""The datastore written once in portable SQL; backends (SQLite, PostgreSQL) supply connections and dialect.

A backend subclasses :class:`SqlDatastore` and implements :meth:`SqlDatastore._transaction` (a context manager
yielding a :class:`Tx` inside one database transaction, committing on success and rolling back on any error,
mapping driver errors to :class:`~tessera.server.errors.DatastoreError`), plus a few dialect facts. Everything
else (the queries, revisions, tombstones, paging, compare-and-set) lives here, so the backends cannot drift.

Statements use ``?`` placeholders; a backend whose driver wants another style rewrites them in its ``Tx``
(no statement contains a literal ``?`` or ``%``).

What a backend must provide, and why (checked against PostgreSQL 15 with psycopg 3: this whole module and the
datastore test suite ran unchanged over a ~90-line backend):

* read transactions are one consistent snapshot (SQLite: a deferred ``BEGIN`` in WAL mode; PostgreSQL:
  ``REPEATABLE READ READ ONLY``), so ``entries_changed_since`` reads the counter and the rows it implies together;
* write transactions may be READ COMMITTED: every entries / bundles writer first takes the counter row's lock
  (:meth:`SqlDatastore._lock`), agent upserts and renewals are single conditional statements, and a join token is
  won by whichever ``DELETE`` removes the row;
* unique violations surface as :class:`~tessera.server.errors.AlreadyExists`, other driver errors as
  :class:`~tessera.server.errors.DatastoreError`;
* ``blob_type`` (``BYTEA``), ``_existing_tables`` (``information_schema.tables`` in the current schema), and a
  cross-server ``_migration_lock`` (``pg_advisory_lock``) so servers starting together migrate once.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import time
import uuid
from abc import abstractmethod
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from typing import Any, Protocol

from tessera.server.datastore.base import (
    DEFAULT_PAGE_SIZE,
    MAX_PAGE_SIZE,
    AttestedAgent,
    Bundle,
    Crl,
    Datastore,
    EntryChanges,
    EntryFilter,
    FederationRelationship,
    IssuedSvid,
    JoinToken,
    Page,
    RegistrationEntry,
    Revisions,
    RevokedCertificate,
    SelectorMatch,
    hash_join_token,
)
from tessera.server.datastore.schema import MIGRATIONS, SCHEMA_TABLE, SCHEMA_VERSION, TABLES, render
from tessera.server.errors import (
    AgentBannedError,
    AlreadyExists,
    DatastoreError,
    InvalidPageTokenError,
    JoinTokenExpiredError,
    NotFound,
    RevisionConflictError,
)
from tessera.server.selectors import Selector, matches, normalize

Row = tuple[Any, ...]


class Tx(Protocol):
    """One open transaction. ``?`` placeholders; rows are tuples."""

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        """Runs a statement and returns all its rows."""
        ...

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Runs a statement and returns the number of rows it changed."""
        ...


_ENTRY_COLUMNS = (
    "id, spiffe_id, parent_id, selectors, x509_svid_ttl, jwt_svid_ttl, dns_names, hint, admin, downstream, node, "
    "federates_with, expires_at, revision, created_at"
)
_E_ENTRY_COLUMNS = ", ".join("e." + c.strip() for c in _ENTRY_COLUMNS.split(","))
_AGENT_COLUMNS = "spiffe_id, attestor, selectors, serial, expires_at, banned, reattestable, created_at, updated_at"
_TOKEN_COLUMNS = "id, token_hash, expires_at, spiffe_id, created_at"  # noqa: S105 (column names)
_FED_COLUMNS = (
    "trust_domain, bundle_endpoint_url, profile, endpoint_spiffe_id, last_refresh, next_refresh, last_error, "
    "created_at, updated_at"
)
_ISSUED_COLUMNS = "serial, issuer_key_id, spiffe_id, entry_id, agent_id, issued_at, expires_at"
_REVOKED_COLUMNS = "serial, issuer_key_id, spiffe_id, expires_at, revoked_at"


def _selectors_json(selectors: Sequence[Selector]) -> str:
    return json.dumps([[s.type, s.value] for s in selectors], separators=(",", ":"))


def _selectors_from_json(text: str) -> tuple[Selector, ...]:
    return tuple(Selector(t, v) for t, v in json.loads(text))


def _identity_hash(spiffe_id: str, parent_id: str, selectors: Sequence[Selector]) -> str:
    canonical = json.dumps([spiffe_id, parent_id, [[s.type, s.value] for s in selectors]], separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def _as_stored(
    entry: RegistrationEntry, entry_id: str, selectors: tuple[Selector, ...], revision: int, created_at: int
) -> RegistrationEntry:
    """The entry as the store keeps it: its id, normalized selectors, tuples, the store's revision and time."""
    return replace(
        entry,
        id=entry_id,
        selectors=selectors,
        dns_names=tuple(entry.dns_names),
        federates_with=tuple(entry.federates_with),
        revision=revision,
        created_at=created_at,
    )


def _entry_from_row(row: Row) -> RegistrationEntry:
    return RegistrationEntry(
        id=row[0],
        spiffe_id=row[1],
        parent_id=row[2],
        selectors=_selectors_from_json(row[3]),
        x509_svid_ttl=int(row[4]),
        jwt_svid_ttl=int(row[5]),
        dns_names=tuple(json.loads(row[6])),
        hint=row[7],
        admin=bool(row[8]),
        downstream=bool(row[9]),
        node=bool(row[10]),
        federates_with=tuple(json.loads(row[11])),
        expires_at=None if row[12] is None else int(row[12]),
        revision=int(row[13]),
        created_at=int(row[14]),
    )


def _agent_from_row(row: Row) -> AttestedAgent:
    return AttestedAgent(
        spiffe_id=row[0],
        attestor=row[1],
        selectors=_selectors_from_json(row[2]),
        serial=row[3],
        expires_at=int(row[4]),
        banned=bool(row[5]),
        reattestable=bool(row[6]),
        created_at=int(row[7]),
        updated_at=int(row[8]),
    )


def _token_from_row(row: Row) -> JoinToken:
    return JoinToken(id=row[0], token_hash=row[1], expires_at=int(row[2]), spiffe_id=row[3], created_at=int(row[4]))


def _placeholders(n: int) -> str:
    return ", ".join("?" * n)


def _selector_match_clause(selectors: Sequence[Selector]) -> tuple[str, list[Any]]:
    clause = " OR ".join("(s.type = ? AND s.value = ?)" for _ in selectors)
    params: list[Any] = []
    for s in selectors:
        params.extend((s.type, s.value))
    return clause, params


def _check_page_size(page_size: int) -> None:
    if not isinstance(page_size, int) or isinstance(page_size, bool) or not 1 <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}, got {page_size!r}")


def _encode_token(kind: str, after: str, revision: int) -> str:
    raw = json.dumps({"k": kind, "a": after, "r": revision}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_token(kind: str, token: str) -> tuple[str, int]:
    """Returns (last key of the previous page, pinned revision); raises InvalidPageTokenError."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
        after, revision = data["a"], data["r"]
        if data["k"] != kind or not isinstance(after, str) or not isinstance(revision, int):
            raise ValueError(kind)
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidPageTokenError(
            f"page token {token[:32]!r} was not issued by this {kind} listing; start again without a token"
        ) from None
    return after, revision


class _AliasIndex:
    """All node alias entries at one node-alias revision, indexed by selector for fast matching."""

    __slots__ = ("by_selector", "revision")

    def __init__(self, revision: int, aliases: list[RegistrationEntry]) -> None:
        self.revision = revision
        self.by_selector: dict[Selector, list[RegistrationEntry]] = {}
        for alias in aliases:
            for selector in alias.selectors:
                self.by_selector.setdefault(selector, []).append(alias)

    def matching(self, available: frozenset[Selector]) -> list[RegistrationEntry]:
        candidates: dict[str, RegistrationEntry] = {}
        for selector in available:
            for alias in self.by_selector.get(selector, ()):
                candidates[alias.id] = alias
        return sorted(
            (a for a in candidates.values() if matches(a.selectors, available)),
            key=lambda a: a.id,
        )


class SqlDatastore(Datastore):
    """Every datastore operation, in portable SQL over a backend's transactions."""

    blob_type = "BLOB"
    """The column type for binary data (schema ``{blob}``)."""

    def __init__(self, *, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._alias_cache: _AliasIndex | None = None

    # ---- backend hooks ------------------------------------------------------------------------------------

    @abstractmethod
    def _transaction(self, *, write: bool) -> AbstractContextManager[Tx]:
        """One transaction: a consistent snapshot for reads; for writes, serialized with other writers as far as
        the backend allows. Commits on normal exit, rolls back on any exception."""

    @abstractmethod
    def _existing_tables(self, tx: Tx) -> set[str]:
        """Names of the tables present in the store (for migration and foreign-database detection)."""

    @property
    @abstractmethod
    def _description(self) -> str:
        """Where the store lives, for error messages (a path or a URL without password)."""

    def _now(self) -> int:
        return int(self._clock())

    # ---- migrations ---------------------------------------------------------------------------------------

    def _migration_lock(self) -> AbstractContextManager[None]:
        """Held around the whole migration; a shared-database backend makes it a cross-server lock."""
        return contextlib.nullcontext()

    def _migrate(self) -> None:
        """Brings the schema to SCHEMA_VERSION, refusing stores that are foreign or newer than this code."""
        with self._migration_lock():
            self._migrate_locked()

    def _migrate_locked(self) -> None:
        with self._transaction(write=True) as tx:
            tables = self._existing_tables(tx)
            if SCHEMA_TABLE not in tables:
                ours = tables & set(TABLES)
                if tables:
                    detail = f"tables {sorted(ours)} without" if ours else f"foreign tables {sorted(tables)[:5]} and no"
                    raise DatastoreError(
                        f"{self._description} is not a Tessera datastore (it has {detail} a {SCHEMA_TABLE} table); "
                        "refusing to use it: point the server at an empty or Tessera database"
                    )
                tx.execute(f"CREATE TABLE {SCHEMA_TABLE} (version INTEGER NOT NULL)")
                tx.execute(f"INSERT INTO {SCHEMA_TABLE} (version) VALUES (0)")
            version = self._read_schema_version(tx)
        if version > SCHEMA_VERSION:
            raise DatastoreError(
                f"{self._description} has schema version {version}, newer than this Tessera supports "
                f"({SCHEMA_VERSION}); upgrade Tessera rather than risk writing an unknown schema"
            )
        for migration in MIGRATIONS:
            if migration.version <= version:
                continue
            with self._transaction(write=True) as tx:
                current = self._read_schema_version(tx)
                if current >= migration.version:  # another server migrated meanwhile
                    continue
                for statement in migration.statements:
                    tx.execute(render(statement, blob_type=self.blob_type))
                tx.execute(f"UPDATE {SCHEMA_TABLE} SET version = ?", (migration.version,))

    def _read_schema_version(self, tx: Tx) -> int:
        rows = tx.query(f"SELECT version FROM {SCHEMA_TABLE}")
        if len(rows) != 1:
            raise DatastoreError(
                f"{self._description}: table {SCHEMA_TABLE} has {len(rows)} rows instead of 1; the store is damaged"
            )
        return int(rows[0][0])

    def schema_version(self) -> int:
        with self._transaction(write=False) as tx:
            return self._read_schema_version(tx)

    def ping(self) -> None:
        with self._transaction(write=False) as tx:
            tx.query("SELECT value FROM revisions WHERE name = 'entries'")

    # ---- revisions ----------------------------------------------------------------------------------------

    def _counters(self, tx: Tx) -> dict[str, int]:
        return {name: int(value) for name, value in tx.query("SELECT name, value FROM revisions")}

    def _lock(self, tx: Tx, name: str) -> None:
        """Takes the counter row's write lock before reading what a write depends on.

        Every writer of entries (or bundles) starts here, so writers of one kind are serialized and each one's
        reads see everything committed before it, also under READ COMMITTED isolation (PostgreSQL's default),
        where check-then-write would otherwise race.
        """
        tx.execute("UPDATE revisions SET value = value WHERE name = ?", (name,))

    def _bump(self, tx: Tx, name: str) -> int:
        # The UPDATE takes the counter row's write lock, which serializes writers: revisions commit in order.
        tx.execute("UPDATE revisions SET value = value + 1 WHERE name = ?", (name,))
        return int(tx.query("SELECT value FROM revisions WHERE name = ?", (name,))[0][0])

    def revisions(self) -> Revisions:
        with self._transaction(write=False) as tx:
            c = self._counters(tx)
        return Revisions(entries=c["entries"], bundles=c["bundles"], node_aliases=c["node_aliases"])

    # ---- entries ------------------------------------------------------------------------------------------

    def _find_identity(self, tx: Tx, identity: str) -> str | None:
        rows = tx.query("SELECT id FROM entries WHERE identity_hash = ?", (identity,))
        return str(rows[0][0]) if rows else None

    def _write_selectors(self, tx: Tx, entry_id: str, selectors: Sequence[Selector]) -> None:
        for s in selectors:
            tx.execute(
                "INSERT INTO entry_selectors (entry_id, type, value) VALUES (?, ?, ?)", (entry_id, s.type, s.value)
            )

    def _tombstone(self, tx: Tx, entry_id: str, parent_id: str, revision: int, now: int) -> None:
        tx.execute(
            "INSERT INTO entry_tombstones (entry_id, parent_id, revision, deleted_at) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (entry_id, parent_id) DO UPDATE SET revision = excluded.revision, "
            "deleted_at = excluded.deleted_at",
            (entry_id, parent_id, revision, now),
        )

    def _get_entry(self, tx: Tx, entry_id: str) -> RegistrationEntry | None:
        rows = tx.query(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id = ?", (entry_id,))
        return _entry_from_row(rows[0]) if rows else None

    def _insert_entry(self, tx: Tx, entry: RegistrationEntry, now: int) -> RegistrationEntry:
        """Inserts one entry (the caller holds the entries lock); raises AlreadyExists before writing anything."""
        selectors = normalize(entry.selectors)
        entry_id = entry.id or str(uuid.uuid4())
        identity = _identity_hash(entry.spiffe_id, entry.parent_id, selectors)
        existing = self._find_identity(tx, identity)
        if existing is not None:
            raise AlreadyExists(
                f"an entry with spiffe_id {entry.spiffe_id}, parent_id {entry.parent_id} and the same selectors "
                f"already exists (id {existing})"
            )
        if tx.query("SELECT 1 FROM entries WHERE id = ?", (entry_id,)):
            raise AlreadyExists(f"an entry with id {entry_id} already exists")
        revision = self._bump(tx, "entries")
        stored = _as_stored(entry, entry_id, selectors, revision, entry.created_at or now)
        tx.execute(
            f"INSERT INTO entries ({_ENTRY_COLUMNS}, selector_count, identity_hash, updated_at) "
            f"VALUES ({_placeholders(18)})",
            (*self._entry_values(stored), len(selectors), identity, now),
        )
        self._write_selectors(tx, entry_id, selectors)
        if stored.node:
            tx.execute("UPDATE revisions SET value = ? WHERE name = 'node_aliases'", (revision,))
        return stored

    def create_entry(self, entry: RegistrationEntry) -> RegistrationEntry:
        now = self._now()
        with self._transaction(write=True) as tx:
            self._lock(tx, "entries")
            return self._insert_entry(tx, entry, now)

    def create_entries(self, entries: Sequence[RegistrationEntry]) -> list[RegistrationEntry | AlreadyExists]:
        if len(entries) > MAX_PAGE_SIZE:
            raise ValueError(f"at most {MAX_PAGE_SIZE} entries per batch, got {len(entries)}")
        now = self._now()
        results: list[RegistrationEntry | AlreadyExists] = []
        with self._transaction(write=True) as tx:
            self._lock(tx, "entries")
            for entry in entries:
                try:
                    results.append(self._insert_entry(tx, entry, now))
                except AlreadyExists as exc:  # refused before any write for this entry: the batch goes on
                    results.append(exc)
        return results

    @staticmethod
    def _entry_values(e: RegistrationEntry) -> tuple[Any, ...]:
        return (
            e.id,
            e.spiffe_id,
            e.parent_id,
            _selectors_json(e.selectors),
            e.x509_svid_ttl,
            e.jwt_svid_ttl,
            json.dumps(list(e.dns_names)),
            e.hint,
            int(e.admin),
            int(e.downstream),
            int(e.node),
            json.dumps(list(e.federates_with)),
            e.expires_at,
            e.revision,
            e.created_at,
        )

    def get_entry(self, entry_id: str) -> RegistrationEntry:
        with self._transaction(write=False) as tx:
            entry = self._get_entry(tx, entry_id)
        if entry is None:
            raise NotFound(f"no registration entry with id {entry_id!r}")
        return entry

    def get_entries(self, entry_ids: Sequence[str]) -> dict[str, RegistrationEntry]:
        ids = list(dict.fromkeys(entry_ids))
        found: dict[str, RegistrationEntry] = {}
        with self._transaction(write=False) as tx:
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                rows = tx.query(
                    f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE id IN ({_placeholders(len(chunk))})", chunk
                )
                for row in rows:
                    entry = _entry_from_row(row)
                    found[entry.id] = entry
        return found

    def update_entry(self, entry: RegistrationEntry, *, expected_revision: int | None = None) -> RegistrationEntry:
        selectors = normalize(entry.selectors)
        identity = _identity_hash(entry.spiffe_id, entry.parent_id, selectors)
        now = self._now()
        with self._transaction(write=True) as tx:
            self._lock(tx, "entries")
            old = self._get_entry(tx, entry.id)
            if old is None:
                raise NotFound(f"no registration entry with id {entry.id!r}")
            if expected_revision is not None and old.revision != expected_revision:
                raise RevisionConflictError(
                    f"entry {entry.id} is at revision {old.revision}, not {expected_revision}: it changed meanwhile; "
                    "read it again and retry"
                )
            existing = self._find_identity(tx, identity)
            if existing is not None and existing != entry.id:
                raise AlreadyExists(
                    f"an entry with spiffe_id {entry.spiffe_id}, parent_id {entry.parent_id} and the same selectors "
                    f"already exists (id {existing})"
                )
            revision = self._bump(tx, "entries")
            stored = _as_stored(entry, old.id, selectors, revision, old.created_at)
            tx.execute(
                "UPDATE entries SET spiffe_id = ?, parent_id = ?, selectors = ?, x509_svid_ttl = ?, jwt_svid_ttl = ?, "
                "dns_names = ?, hint = ?, admin = ?, downstream = ?, node = ?, federates_with = ?, expires_at = ?, "
                "revision = ?, selector_count = ?, identity_hash = ?, updated_at = ? WHERE id = ?",
                (*self._entry_values(stored)[1:13], revision, len(selectors), identity, now, old.id),
            )
            if selectors != old.selectors:
                tx.execute("DELETE FROM entry_selectors WHERE entry_id = ?", (old.id,))
                self._write_selectors(tx, old.id, selectors)
            if old.parent_id != stored.parent_id:
                self._tombstone(tx, old.id, old.parent_id, revision, now)
            if old.node or stored.node:
                tx.execute("UPDATE revisions SET value = ? WHERE name = 'node_aliases'", (revision,))
        return stored

    def _delete_entry(self, tx: Tx, entry: RegistrationEntry, now: int) -> None:
        revision = self._bump(tx, "entries")
        tx.execute("DELETE FROM entry_selectors WHERE entry_id = ?", (entry.id,))
        tx.execute("DELETE FROM entries WHERE id = ?", (entry.id,))
        self._tombstone(tx, entry.id, entry.parent_id, revision, now)
        if entry.node:
            tx.execute("UPDATE revisions SET value = ? WHERE name = 'node_aliases'", (revision,))

    def delete_entry(self, entry_id: str) -> RegistrationEntry:
        now = self._now()
        with self._transaction(write=True) as tx:
            self._lock(tx, "entries")
            entry = self._get_entry(tx, entry_id)
            if entry is None:
                raise NotFound(f"no registration entry with id {entry_id!r}")
            self._delete_entry(tx, entry, now)
        return entry

    def prune_expired_entries(self, now: int) -> list[str]:
        with self._transaction(write=True) as tx:
            self._lock(tx, "entries")
            rows = tx.query(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE expires_at IS NOT NULL AND expires_at <= ? ORDER BY id",
                (now,),
            )
            expired = [_entry_from_row(r) for r in rows]
            for entry in expired:
                self._delete_entry(tx, entry, now)
        return [e.id for e in expired]

    def _filter_sql(self, f: EntryFilter | None) -> tuple[str, str, list[Any]]:
        """(join clause, where conditions joined by AND (or ""), params) for an entry filter over ``entries e``."""
        if f is None:
            return "", "", []
        join = ""
        conditions: list[str] = []
        join_params: list[Any] = []
        params: list[Any] = []
        if f.selectors is not None:
            selectors = normalize(f.selectors)
            if not selectors:
                if f.selector_match in (SelectorMatch.EXACT, SelectorMatch.SUBSET):
                    conditions.append("e.selector_count = 0")
            else:
                clause, join_params = _selector_match_clause(selectors)
                if f.selector_match is SelectorMatch.SUBSET:
                    # Every selector of the entry is among the given ones.
                    join = (
                        f"JOIN (SELECT s.entry_id AS entry_id, COUNT(*) AS n FROM entry_selectors s WHERE {clause} "
                        "GROUP BY s.entry_id) m ON m.entry_id = e.id AND m.n = e.selector_count"
                    )
                else:
                    join = (
                        f"JOIN (SELECT s.entry_id AS entry_id FROM entry_selectors s WHERE {clause} "
                        "GROUP BY s.entry_id HAVING COUNT(*) = ?) m ON m.entry_id = e.id"
                    )
                    join_params = [*join_params, len(selectors)]
                    if f.selector_match is SelectorMatch.EXACT:
                        conditions.append("e.selector_count = ?")
                        params.append(len(selectors))
        if f.spiffe_id is not None:
            conditions.append("e.spiffe_id = ?")
            params.append(f.spiffe_id)
        if f.parent_id is not None:
            conditions.append("e.parent_id = ?")
            params.append(f.parent_id)
        if f.node is not None:
            conditions.append("e.node = ?")
            params.append(int(f.node))
        return join, " AND ".join(conditions), join_params + params

    def list_entries(
        self,
        entry_filter: EntryFilter | None = None,
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[RegistrationEntry]:
        _check_page_size(page_size)
        after, pinned = _decode_token("entries", page_token) if page_token else ("", 0)
        join, where, params = self._filter_sql(entry_filter)
        conditions = [where] if where else []
        if page_token:
            conditions.append("e.id > ?")
            params.append(after)
        sql = f"SELECT {_E_ENTRY_COLUMNS} FROM entries e {join}"
        if conditions:
            sql += " WHERE " + " AND ".join(conditions)
        sql += " ORDER BY e.id LIMIT ?"
        params.append(page_size + 1)
        with self._transaction(write=False) as tx:
            revision = pinned if page_token else self._counters(tx)["entries"]
            rows = tx.query(sql, params)
        return self._page(rows, page_size, "entries", revision)

    @staticmethod
    def _page(rows: list[Row], page_size: int, kind: str, revision: int) -> Page[RegistrationEntry]:
        entries = [_entry_from_row(r) for r in rows[:page_size]]
        token = _encode_token(kind, entries[-1].id, revision) if len(rows) > page_size else ""
        return Page(items=entries, next_page_token=token, revision=revision)

    def count_entries(self, entry_filter: EntryFilter | None = None) -> int:
        join, where, params = self._filter_sql(entry_filter)
        sql = f"SELECT COUNT(*) FROM entries e {join}" + (f" WHERE {where}" if where else "")
        with self._transaction(write=False) as tx:
            return int(tx.query(sql, params)[0][0])

    # ---- sync ---------------------------------------------------------------------------------------------

    def entries_changed_since(
        self,
        parent_ids: Sequence[str],
        revision: int,
        *,
        max_changes: int | None = None,
    ) -> EntryChanges:
        parents = list(dict.fromkeys(parent_ids))
        with self._transaction(write=False) as tx:
            counters = self._counters(tx)
            current = counters["entries"]
            if revision == current:
                return EntryChanges(revision=current)
            if revision > current or revision < counters["tombstone_horizon"]:
                return EntryChanges(revision=current, full_sync_required=True)
            if not parents:
                return EntryChanges(revision=current)
            marks = _placeholders(len(parents))
            limit = "" if max_changes is None else f" LIMIT {int(max_changes) + 1}"
            rows = tx.query(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE parent_id IN ({marks}) AND revision > ? "
                f"ORDER BY revision{limit}",
                (*parents, revision),
            )
            removed_rows = tx.query(
                f"SELECT entry_id FROM entry_tombstones WHERE parent_id IN ({marks}) AND revision > ? "
                f"ORDER BY revision{limit}",
                (*parents, revision),
            )
        if max_changes is not None and len(rows) + len(removed_rows) > max_changes:
            return EntryChanges(revision=current, full_sync_required=True)
        upserts = [_entry_from_row(r) for r in rows]
        upserted = {e.id for e in upserts}
        removed = [i for i in dict.fromkeys(str(r[0]) for r in removed_rows) if i not in upserted]
        return EntryChanges(upserts=upserts, removed_ids=removed, revision=current)

    def entries_for_parents(
        self,
        parent_ids: Sequence[str],
        *,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[RegistrationEntry]:
        _check_page_size(page_size)
        parents = list(dict.fromkeys(parent_ids))
        after, pinned = _decode_token("sync", page_token) if page_token else ("", 0)
        with self._transaction(write=False) as tx:
            revision = pinned if page_token else self._counters(tx)["entries"]
            if not parents:
                return Page(items=[], revision=revision)
            rows = tx.query(
                f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE parent_id IN ({_placeholders(len(parents))}) AND id > ? "
                "ORDER BY id LIMIT ?",
                (*parents, after, page_size + 1),
            )
        return self._page(rows, page_size, "sync", revision)

    def node_alias_entries_matching(self, agent_selectors: Sequence[Selector]) -> list[RegistrationEntry]:
        # Every agent's sync asks this, so the alias entries are cached, keyed by the node-alias revision
        # (bumped by every change touching an alias, on any server sharing the store): while it is unchanged the
        # answer costs one counter read and no entry rows.
        available = frozenset(agent_selectors)
        if not available:
            return []
        with self._transaction(write=False) as tx:
            revision = self._counters(tx)["node_aliases"]
            cache = self._alias_cache
            if cache is None or cache.revision != revision:
                rows = tx.query(f"SELECT {_ENTRY_COLUMNS} FROM entries WHERE node = 1 ORDER BY id")
                cache = _AliasIndex(revision, [_entry_from_row(r) for r in rows])
                self._alias_cache = cache
        return cache.matching(available)

    def prune_tombstones(self, before: int) -> int:
        with self._transaction(write=True) as tx:
            self._lock(tx, "entries")
            rows = tx.query("SELECT MAX(revision), COUNT(*) FROM entry_tombstones WHERE deleted_at < ?", (before,))
            newest, count = rows[0]
            if not count:
                return 0
            tx.execute("DELETE FROM entry_tombstones WHERE deleted_at < ?", (before,))
            tx.execute(
                "UPDATE revisions SET value = ? WHERE name = 'tombstone_horizon' AND value < ?",
                (int(newest), int(newest)),
            )
        return int(count)

    # ---- agents -------------------------------------------------------------------------------------------

    def _get_agent(self, tx: Tx, spiffe_id: str) -> AttestedAgent | None:
        rows = tx.query(f"SELECT {_AGENT_COLUMNS} FROM agents WHERE spiffe_id = ?", (spiffe_id,))
        return _agent_from_row(rows[0]) if rows else None

    def upsert_agent(self, agent: AttestedAgent) -> AttestedAgent:
        now = self._now()
        selectors = normalize(agent.selectors)
        with self._transaction(write=True) as tx:
            # One statement, so a concurrent ban can never be overwritten: the update only applies while the
            # row is not banned (and a banned row reports 0 rows changed).
            changed = tx.execute(
                f"INSERT INTO agents ({_AGENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, 0, ?, ?, ?) "
                "ON CONFLICT (spiffe_id) DO UPDATE SET attestor = excluded.attestor, selectors = excluded.selectors, "
                "serial = excluded.serial, expires_at = excluded.expires_at, reattestable = excluded.reattestable, "
                "updated_at = excluded.updated_at WHERE agents.banned = 0",
                (
                    agent.spiffe_id,
                    agent.attestor,
                    _selectors_json(selectors),
                    agent.serial,
                    agent.expires_at,
                    int(agent.reattestable),
                    agent.created_at or now,
                    now,
                ),
            )
            if changed == 0:
                raise AgentBannedError(
                    f"agent {agent.spiffe_id} is banned; an operator must evict it before it can attest again"
                )
            stored = self._get_agent(tx, agent.spiffe_id)
        assert stored is not None
        return stored

    def get_agent(self, spiffe_id: str) -> AttestedAgent:
        with self._transaction(write=False) as tx:
            agent = self._get_agent(tx, spiffe_id)
        if agent is None:
            raise NotFound(f"no attested agent {spiffe_id!r}")
        return agent

    def list_agents(
        self,
        *,
        banned: bool | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        page_token: str = "",
    ) -> Page[AttestedAgent]:
        _check_page_size(page_size)
        after, _ = _decode_token("agents", page_token) if page_token else ("", 0)
        conditions = ["spiffe_id > ?"]
        params: list[Any] = [after]
        if banned is not None:
            conditions.append("banned = ?")
            params.append(int(banned))
        params.append(page_size + 1)
        with self._transaction(write=False) as tx:
            rows = tx.query(
                f"SELECT {_AGENT_COLUMNS} FROM agents WHERE {' AND '.join(conditions)} ORDER BY spiffe_id LIMIT ?",
                params,
            )
        agents = [_agent_from_row(r) for r in rows[:page_size]]
        token = _encode_token("agents", agents[-1].spiffe_id, 0) if len(rows) > page_size else ""
        return Page(items=agents, next_page_token=token)

    def count_agents(self, *, banned: bool | None = None) -> int:
        sql, params = "SELECT COUNT(*) FROM agents", []
        if banned is not None:
            sql += " WHERE banned = ?"
            params.append(int(banned))
        with self._transaction(write=False) as tx:
            return int(tx.query(sql, params)[0][0])

    def evict_agent(self, spiffe_id: str) -> None:
        with self._transaction(write=True) as tx:
            if tx.execute("DELETE FROM agents WHERE spiffe_id = ?", (spiffe_id,)) == 0:
                raise NotFound(f"no attested agent {spiffe_id!r}")

    def ban_agent(self, spiffe_id: str) -> AttestedAgent:
        now = self._now()
        with self._transaction(write=True) as tx:
            if (
                tx.execute(
                    "UPDATE agents SET banned = 1, serial = '', updated_at = ? WHERE spiffe_id = ?", (now, spiffe_id)
                )
                == 0
            ):
                raise NotFound(f"no attested agent {spiffe_id!r}")
            agent = self._get_agent(tx, spiffe_id)
        assert agent is not None
        return agent

    def set_agent_serial(
        self,
        spiffe_id: str,
        serial: str,
        expires_at: int,
        *,
        expected_serial: str | None = None,
    ) -> AttestedAgent:
        now = self._now()
        sql = "UPDATE agents SET serial = ?, expires_at = ?, updated_at = ? WHERE spiffe_id = ? AND banned = 0"
        params: list[Any] = [serial, expires_at, now, spiffe_id]
        if expected_serial is not None:
            sql += " AND serial = ?"
            params.append(expected_serial)
        with self._transaction(write=True) as tx:
            changed = tx.execute(sql, params)
            agent = self._get_agent(tx, spiffe_id)
        if agent is None:
            raise NotFound(f"no attested agent {spiffe_id!r}")
        if changed == 0:
            if agent.banned:
                raise AgentBannedError(f"agent {spiffe_id} is banned")
            raise RevisionConflictError(
                f"agent {spiffe_id}'s SVID serial is no longer {expected_serial}: it was renewed meanwhile"
            )
        return agent

    # ---- join tokens --------------------------------------------------------------------------------------

    def create_join_token(self, token: str, expires_at: int, *, spiffe_id: str | None = None) -> JoinToken:
        if not token:
            raise ValueError("a join token must not be empty")
        stored = JoinToken(
            id=str(uuid.uuid4()),
            token_hash=hash_join_token(token),
            expires_at=expires_at,
            spiffe_id=spiffe_id,
            created_at=self._now(),
        )
        with self._transaction(write=True) as tx:
            if tx.query("SELECT 1 FROM join_tokens WHERE token_hash = ?", (stored.token_hash,)):
                raise AlreadyExists("this join token is already registered; generate a new random token")
            tx.execute(
                f"INSERT INTO join_tokens ({_TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                (stored.id, stored.token_hash, stored.expires_at, stored.spiffe_id, stored.created_at),
            )
        return stored

    def consume_join_token(self, token: str, *, now: int | None = None) -> JoinToken:
        at = self._now() if now is None else now
        token_hash = hash_join_token(token)
        found: JoinToken | None = None
        with self._transaction(write=True) as tx:
            rows = tx.query(f"SELECT {_TOKEN_COLUMNS} FROM join_tokens WHERE token_hash = ?", (token_hash,))
            # The DELETE decides the race: with concurrent consumers only one deletes the row.
            if rows and tx.execute("DELETE FROM join_tokens WHERE token_hash = ?", (token_hash,)) == 1:
                found = _token_from_row(rows[0])
        if found is None:
            raise NotFound("join token is unknown or was already used")
        if found.expires_at <= at:
            raise JoinTokenExpiredError(f"join token {found.id} expired at {found.expires_at} (unix time)")
        return found

    def list_join_tokens(self) -> list[JoinToken]:
        with self._transaction(write=False) as tx:
            rows = tx.query(f"SELECT {_TOKEN_COLUMNS} FROM join_tokens ORDER BY expires_at, id")
        return [_token_from_row(r) for r in rows]

    def delete_join_token(self, token_id: str) -> None:
        with self._transaction(write=True) as tx:
            if tx.execute("DELETE FROM join_tokens WHERE id = ?", (token_id,)) == 0:
                raise NotFound(f"no join token with id {token_id!r}")

    def prune_join_tokens(self, now: int) -> int:
        with self._transaction(write=True) as tx:
            return tx.execute("DELETE FROM join_tokens WHERE expires_at <= ?", (now,))

    # ---- bundles ------------------------------------------------------------------------------------------

    def get_bundle(self, trust_domain: str) -> Bundle:
        with self._transaction(write=False) as tx:
            rows = tx.query(
                "SELECT trust_domain, document, revision FROM bundles WHERE trust_domain = ?", (trust_domain,)
            )
        if not rows:
            raise NotFound(f"no bundle for trust domain {trust_domain!r}")
        return Bundle(rows[0][0], bytes(rows[0][1]), int(rows[0][2]))

    def list_bundles(self) -> list[Bundle]:
        with self._transaction(write=False) as tx:
            rows = tx.query("SELECT trust_domain, document, revision FROM bundles ORDER BY trust_domain")
        return [Bundle(r[0], bytes(r[1]), int(r[2])) for r in rows]

    def set_bundle(self, trust_domain: str, document: bytes, *, expected_revision: int | None = None) -> Bundle:
        with self._transaction(write=True) as tx:
            self._lock(tx, "bundles")
            rows = tx.query("SELECT revision FROM bundles WHERE trust_domain = ?", (trust_domain,))
            current = int(rows[0][0]) if rows else 0
            if expected_revision is not None and current != expected_revision:
                state = f"is at revision {current}" if rows else "does not exist"
                raise RevisionConflictError(
                    f"bundle of {trust_domain} {state}, not revision {expected_revision}: it changed meanwhile"
                )
            revision = self._bump(tx, "bundles")
            if rows:
                tx.execute(
                    "UPDATE bundles SET document = ?, revision = ? WHERE trust_domain = ?",
                    (bytes(document), revision, trust_domain),
                )
            else:
                tx.execute(
                    "INSERT INTO bundles (trust_domain, document, revision) VALUES (?, ?, ?)",
                    (trust_domain, bytes(document), revision),
                )
        return Bundle(trust_domain, bytes(document), revision)

    def delete_bundle(self, trust_domain: str) -> None:
        with self._transaction(write=True) as tx:
            self._lock(tx, "bundles")
            if tx.execute("DELETE FROM bundles WHERE trust_domain = ?", (trust_domain,)) == 0:
                raise NotFound(f"no bundle for trust domain {trust_domain!r}")
            self._bump(tx, "bundles")

    # ---- CA journal ---------------------------------------------------------------------------------------

    def get_ca_journal(self, server_id: str) -> bytes | None:
        with self._transaction(write=False) as tx:
            rows = tx.query("SELECT data FROM ca_journals WHERE server_id = ?", (server_id,))
        return bytes(rows[0][0]) if rows else None

    def set_ca_journal(self, server_id: str, data: bytes) -> None:
        with self._transaction(write=True) as tx:
            tx.execute(
                "INSERT INTO ca_journals (server_id, data, updated_at) VALUES (?, ?, ?) "
                "ON CONFLICT (server_id) DO UPDATE SET data = excluded.data, updated_at = excluded.updated_at",
                (server_id, bytes(data), self._now()),
            )

    # ---- federation relationships -------------------------------------------------------------------------

    @staticmethod
    def _relationship_from_row(row: Row) -> FederationRelationship:
        return FederationRelationship(
            trust_domain=row[0],
            bundle_endpoint_url=row[1],
            profile=row[2],
            endpoint_spiffe_id=row[3],
            last_refresh=int(row[4]),
            next_refresh=int(row[5]),
            last_error=row[6],
            created_at=int(row[7]),
            updated_at=int(row[8]),
        )

    def create_federation_relationship(self, relationship: FederationRelationship) -> FederationRelationship:
        now = self._now()
        stored = FederationRelationship(
            relationship.trust_domain,
            relationship.bundle_endpoint_url,
            relationship.profile,
            relationship.endpoint_spiffe_id,
            relationship.last_refresh,
            relationship.next_refresh,
            relationship.last_error,
            now,
            now,
        )
        with self._transaction(write=True) as tx:
            if tx.query("SELECT 1 FROM federation_relationships WHERE trust_domain = ?", (stored.trust_domain,)):
                raise AlreadyExists(f"a federation relationship with {stored.trust_domain} already exists")
            tx.execute(
                f"INSERT INTO federation_relationships ({_FED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    stored.trust_domain,
                    stored.bundle_endpoint_url,
                    stored.profile,
                    stored.endpoint_spiffe_id,
                    stored.last_refresh,
                    stored.next_refresh,
                    stored.last_error,
                    stored.created_at,
                    stored.updated_at,
                ),
            )
        return stored

    def get_federation_relationship(self, trust_domain: str) -> FederationRelationship:
        with self._transaction(write=False) as tx:
            rows = tx.query(
                f"SELECT {_FED_COLUMNS} FROM federation_relationships WHERE trust_domain = ?", (trust_domain,)
            )
        if not rows:
            raise NotFound(f"no federation relationship with trust domain {trust_domain!r}")
        return self._relationship_from_row(rows[0])

    def list_federation_relationships(self) -> list[FederationRelationship]:
        with self._transaction(write=False) as tx:
            rows = tx.query(f"SELECT {_FED_COLUMNS} FROM federation_relationships ORDER BY trust_domain")
        return [self._relationship_from_row(r) for r in rows]

    def update_federation_relationship(self, relationship: FederationRelationship) -> FederationRelationship:
        now = self._now()
        r = relationship
        with self._transaction(write=True) as tx:
            changed = tx.execute(
                "UPDATE federation_relationships SET bundle_endpoint_url = ?, profile = ?, endpoint_spiffe_id = ?, "
                "last_refresh = ?, next_refresh = ?, last_error = ?, updated_at = ? WHERE trust_domain = ?",
                (
                    r.bundle_endpoint_url,
                    r.profile,
                    r.endpoint_spiffe_id,
                    r.last_refresh,
                    r.next_refresh,
                    r.last_error,
                    now,
                    r.trust_domain,
                ),
            )
            if changed == 0:
                raise NotFound(f"no federation relationship with trust domain {r.trust_domain!r}")
            rows = tx.query(
                f"SELECT {_FED_COLUMNS} FROM federation_relationships WHERE trust_domain = ?", (r.trust_domain,)
            )
        return self._relationship_from_row(rows[0])

    def delete_federation_relationship(self, trust_domain: str) -> None:
        with self._transaction(write=True) as tx:
            self._lock(tx, "bundles")
            if tx.execute("DELETE FROM federation_relationships WHERE trust_domain = ?", (trust_domain,)) == 0:
                raise NotFound(f"no federation relationship with trust domain {trust_domain!r}")
            if tx.execute("DELETE FROM bundles WHERE trust_domain = ?", (trust_domain,)):
                self._bump(tx, "bundles")

    # ---- issued and revoked X509-SVIDs --------------------------------------------------------------------

    def record_issued_svids(self, svids: Sequence[IssuedSvid]) -> None:
        if not svids:
            return
        with self._transaction(write=True) as tx:
            for v in svids:
                tx.execute(
                    f"INSERT INTO issued_svids ({_ISSUED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?) "
                    "ON CONFLICT (serial) DO UPDATE SET issuer_key_id = excluded.issuer_key_id, "
                    "spiffe_id = excluded.spiffe_id, entry_id = excluded.entry_id, agent_id = excluded.agent_id, "
                    "issued_at = excluded.issued_at, expires_at = excluded.expires_at",
                    (v.serial, v.issuer_key_id, v.spiffe_id, v.entry_id, v.agent_id, v.issued_at, v.expires_at),
                )

    def list_issued_svids(
        self,
        *,
        serial: str | None = None,
        entry_id: str | None = None,
        agent_id: str | None = None,
        issuer_key_id: str | None = None,
        unexpired_at: int | None = None,
    ) -> list[IssuedSvid]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("serial", serial),
            ("entry_id", entry_id),
            ("agent_id", agent_id),
            ("issuer_key_id", issuer_key_id),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if unexpired_at is not None:
            clauses.append("expires_at > ?")
            params.append(unexpired_at)
        where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        with self._transaction(write=False) as tx:
            rows = tx.query(f"SELECT {_ISSUED_COLUMNS} FROM issued_svids{where} ORDER BY issued_at, serial", params)
        return [IssuedSvid(r[0], r[1], r[2], r[3], r[4], int(r[5]), int(r[6])) for r in rows]

    def revoke_certificates(self, revoked: Sequence[RevokedCertificate]) -> list[RevokedCertificate]:
        added: list[RevokedCertificate] = []
        if not revoked:
            return added
        with self._transaction(write=True) as tx:
            self._lock(tx, "bundles")
            for r in revoked:
                if tx.query("SELECT 1 FROM revoked_certificates WHERE serial = ?", (r.serial,)):
                    continue
                tx.execute(
                    f"INSERT INTO revoked_certificates ({_REVOKED_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                    (r.serial, r.issuer_key_id, r.spiffe_id, r.expires_at, r.revoked_at),
                )
                added.append(r)
            if added:
                self._bump(tx, "bundles")
        return added

    def list_revoked_certificates(self, *, unexpired_at: int | None = None) -> list[RevokedCertificate]:
        where, params = ("", []) if unexpired_at is None else (" WHERE expires_at > ?", [unexpired_at])
        with self._transaction(write=False) as tx:
            rows = tx.query(
                f"SELECT {_REVOKED_COLUMNS} FROM revoked_certificates{where} ORDER BY issuer_key_id, serial", params
            )
        return [RevokedCertificate(r[0], r[1], r[2], int(r[3]), int(r[4])) for r in rows]

    def set_crls(self, crls: Sequence[Crl], *, delete_issuers: Sequence[str] = ()) -> None:
        if not crls and not delete_issuers:
            return
        with self._transaction(write=True) as tx:
            self._lock(tx, "bundles")
            for c in crls:
                tx.execute(
                    "INSERT INTO crls (issuer_key_id, crl, next_update, updated_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT (issuer_key_id) DO UPDATE SET crl = excluded.crl, "
                    "next_update = excluded.next_update, updated_at = excluded.updated_at",
                    (c.issuer_key_id, bytes(c.crl), c.next_update, c.updated_at),
                )
            for issuer in delete_issuers:
                tx.execute("DELETE FROM crls WHERE issuer_key_id = ?", (issuer,))
            self._bump(tx, "bundles")

    def list_crls(self) -> list[Crl]:
        with self._transaction(write=False) as tx:
            rows = tx.query("SELECT issuer_key_id, crl, next_update, updated_at FROM crls ORDER BY issuer_key_id")
        return [Crl(r[0], bytes(r[1]), int(r[2]), int(r[3])) for r in rows]

    def prune_issued_and_revoked(self, now: int) -> int:
        with self._transaction(write=True) as tx:
            gone = tx.execute("DELETE FROM issued_svids WHERE expires_at <= ?", (now,))
            gone += tx.execute("DELETE FROM revoked_certificates WHERE expires_at <= ?", (now,))
        return gone
