"""The datastore schema: versioned migrations shared by every SQL backend.

The SQL is written once, in the portable subset SQLite and PostgreSQL both accept: TEXT, BIGINT and
INTEGER columns (flags are INTEGER 0/1 rather than BOOLEAN so comparisons read the same in both), no
autoincrement keys, ``ON CONFLICT ... DO UPDATE`` upserts. The one type that differs, binary data, is the
``{blob}`` placeholder a backend fills in (BLOB / BYTEA).

Migrations only ever append: version N's statements never change once released. A store is brought from its
recorded version to :data:`SCHEMA_VERSION` on start, one migration per transaction; a store whose version is
newer than this code knows is refused rather than guessed at.

Lists inside a row (selectors, DNS names, federated trust domains) are stored as JSON text, because every
read needs them whole; selectors are *also* in ``entry_selectors``, one row each, so filters and node alias
matching can use an index on (type, value).
"""

from __future__ import annotations

from dataclasses import dataclass

SCHEMA_TABLE = "schema_version"


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    description: str
    statements: tuple[str, ...]


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "initial schema: revisions, entries, selectors, tombstones, agents, join tokens, bundles, CA journals",
        (
            # Global counters. 'entries' and 'bundles' are the revisions; 'node_aliases' is the entries revision
            # of the last change touching a node alias; 'tombstone_horizon' is the highest revision of a pruned
            # tombstone (agents older than it need a full sync).
            """CREATE TABLE revisions (
                name TEXT PRIMARY KEY,
                value BIGINT NOT NULL
            )""",
            """INSERT INTO revisions (name, value) VALUES
                ('entries', 0), ('bundles', 0), ('node_aliases', 0), ('tombstone_horizon', 0)""",
            """CREATE TABLE entries (
                id TEXT PRIMARY KEY,
                spiffe_id TEXT NOT NULL,
                parent_id TEXT NOT NULL,
                selectors TEXT NOT NULL,
                selector_count INTEGER NOT NULL,
                identity_hash TEXT NOT NULL,
                x509_svid_ttl INTEGER NOT NULL,
                jwt_svid_ttl INTEGER NOT NULL,
                dns_names TEXT NOT NULL,
                hint TEXT NOT NULL,
                admin INTEGER NOT NULL,
                downstream INTEGER NOT NULL,
                node INTEGER NOT NULL,
                federates_with TEXT NOT NULL,
                expires_at BIGINT,
                revision BIGINT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
            # (spiffe_id, parent_id, selectors) identifies an entry; hashed so the unique index stays small.
            "CREATE UNIQUE INDEX entries_identity ON entries (identity_hash)",
            # Incremental sync: the children of a parent changed after a revision.
            "CREATE INDEX entries_parent_revision ON entries (parent_id, revision)",
            # Full sync and parent-filtered listings, keyset-paged by id.
            "CREATE INDEX entries_parent_id ON entries (parent_id, id)",
            "CREATE INDEX entries_spiffe_id ON entries (spiffe_id, id)",
            "CREATE INDEX entries_node ON entries (node, id)",
            "CREATE INDEX entries_expires_at ON entries (expires_at)",
            """CREATE TABLE entry_selectors (
                entry_id TEXT NOT NULL REFERENCES entries (id) ON DELETE CASCADE,
                type TEXT NOT NULL,
                value TEXT NOT NULL,
                PRIMARY KEY (entry_id, type, value)
            )""",
            "CREATE INDEX entry_selectors_type_value ON entry_selectors (type, value)",
            # One row per (entry, parent it left): deleted entries, and entries moved to another parent.
            """CREATE TABLE entry_tombstones (
                entry_id TEXT NOT NULL,
                parent_id TEXT NOT NULL,
                revision BIGINT NOT NULL,
                deleted_at BIGINT NOT NULL,
                PRIMARY KEY (entry_id, parent_id)
            )""",
            "CREATE INDEX entry_tombstones_parent_revision ON entry_tombstones (parent_id, revision)",
            "CREATE INDEX entry_tombstones_deleted_at ON entry_tombstones (deleted_at)",
            """CREATE TABLE agents (
                spiffe_id TEXT PRIMARY KEY,
                attestor TEXT NOT NULL,
                selectors TEXT NOT NULL,
                serial TEXT NOT NULL,
                expires_at BIGINT NOT NULL,
                banned INTEGER NOT NULL,
                reattestable INTEGER NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
            "CREATE INDEX agents_banned ON agents (banned, spiffe_id)",
            """CREATE TABLE join_tokens (
                id TEXT PRIMARY KEY,
                token_hash TEXT NOT NULL,
                spiffe_id TEXT,
                expires_at BIGINT NOT NULL,
                created_at BIGINT NOT NULL
            )""",
            "CREATE UNIQUE INDEX join_tokens_hash ON join_tokens (token_hash)",
            "CREATE INDEX join_tokens_expires_at ON join_tokens (expires_at)",
            """CREATE TABLE bundles (
                trust_domain TEXT PRIMARY KEY,
                document {blob} NOT NULL,
                revision BIGINT NOT NULL
            )""",
            """CREATE TABLE ca_journals (
                server_id TEXT PRIMARY KEY,
                data {blob} NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
        ),
    ),
)

MIGRATIONS += (
    Migration(
        2,
        "federation relationships, issued X509-SVIDs (for revocation), revoked certificates, CRLs",
        (
            # One row per foreign trust domain this server federates with; the bundle itself is in `bundles`.
            """CREATE TABLE federation_relationships (
                trust_domain TEXT PRIMARY KEY,
                bundle_endpoint_url TEXT NOT NULL,
                profile TEXT NOT NULL,
                endpoint_spiffe_id TEXT NOT NULL,
                last_refresh BIGINT NOT NULL,
                next_refresh BIGINT NOT NULL,
                last_error TEXT NOT NULL,
                created_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
            # Every X509-SVID signed (workload and agent SVIDs; entry_id '' for an agent's own), kept until it
            # expires: what `x509 revoke --entry-id/--agent` revokes and what `ca revoke` waits for.
            """CREATE TABLE issued_svids (
                serial TEXT PRIMARY KEY,
                issuer_key_id TEXT NOT NULL,
                spiffe_id TEXT NOT NULL,
                entry_id TEXT NOT NULL,
                agent_id TEXT NOT NULL,
                issued_at BIGINT NOT NULL,
                expires_at BIGINT NOT NULL
            )""",
            "CREATE INDEX issued_svids_entry ON issued_svids (entry_id, agent_id)",
            "CREATE INDEX issued_svids_agent ON issued_svids (agent_id)",
            "CREATE INDEX issued_svids_issuer ON issued_svids (issuer_key_id)",
            "CREATE INDEX issued_svids_expires_at ON issued_svids (expires_at)",
            # Revoked certificates stay listed until they would have expired anyway.
            """CREATE TABLE revoked_certificates (
                serial TEXT PRIMARY KEY,
                issuer_key_id TEXT NOT NULL,
                spiffe_id TEXT NOT NULL,
                expires_at BIGINT NOT NULL,
                revoked_at BIGINT NOT NULL
            )""",
            "CREATE INDEX revoked_certificates_expires_at ON revoked_certificates (expires_at)",
            # The signed CRLs (DER), one per X.509 authority; written with a bundles-revision bump so agents
            # fetch them with the bundles.
            """CREATE TABLE crls (
                issuer_key_id TEXT PRIMARY KEY,
                crl {blob} NOT NULL,
                next_update BIGINT NOT NULL,
                updated_at BIGINT NOT NULL
            )""",
        ),
    ),
)

SCHEMA_VERSION = MIGRATIONS[-1].version
"""The version this code migrates stores to."""

TABLES: tuple[str, ...] = (
    SCHEMA_TABLE,
    "revisions",
    "entries",
    "entry_selectors",
    "entry_tombstones",
    "agents",
    "join_tokens",
    "bundles",
    "ca_journals",
    "federation_relationships",
    "issued_svids",
    "revoked_certificates",
    "crls",
)


def render(statement: str, *, blob_type: str) -> str:
    """Fills the dialect placeholders of a migration statement."""
    return statement.replace("{blob}", blob_type)


def _check_migrations() -> None:
    versions = [m.version for m in MIGRATIONS]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"datastore migrations must be numbered 1..N without gaps, got {versions}")


_check_migrations()
