"""What only the SQLite backend has: the file, its modes, and refusing files it must not touch."""

from __future__ import annotations

import os
import sqlite3
import stat
from pathlib import Path

import pytest
from server_store_lib import FakeClock

from tessera.server.datastore import RegistrationEntry, Selector, open_datastore
from tessera.server.datastore import sqlite as sqlite_backend
from tessera.server.datastore.schema import SCHEMA_VERSION
from tessera.server.datastore.sqlite import SqliteDatastore
from tessera.server.errors import DatastoreError

AGENT = "spiffe://example.org/tessera/agent/join_token/a"


def make(path: Path, **kw: object) -> SqliteDatastore:
    return SqliteDatastore(path, clock=FakeClock(), **kw)  # type: ignore[arg-type]


def populate(path: Path, n: int = 200) -> None:
    with make(path) as store:
        for i in range(n):
            store.create_entry(
                RegistrationEntry(
                    "", f"spiffe://example.org/w{i}", AGENT, (Selector("unix", f"uid:{i}"),), hint="x" * 200
                )
            )


def test_new_file_is_private_wal_with_foreign_keys(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "ds.sqlite3"
    store = make(path)
    store.set_ca_journal("s", b"x")  # a write, so the WAL and shared-memory files exist
    for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        assert stat.S_IMODE(companion.stat().st_mode) == 0o600, companion
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    # foreign keys are enforced on the store's own connections.
    with store._transaction(write=True) as tx:
        assert tx.query("PRAGMA foreign_keys")[0][0] == 1
    store.close()


def test_random_bytes_are_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "ds.sqlite3"
    junk = os.urandom(8192)
    path.write_bytes(junk)
    with pytest.raises(DatastoreError, match="not a SQLite database or is corrupt"):
        make(path)
    assert path.read_bytes() == junk


def test_damaged_pages_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ds.sqlite3"
    populate(path)
    data = bytearray(path.read_bytes())
    assert len(data) > 8 * 4096
    page_size = int.from_bytes(data[16:18], "big")
    # Scribble over a b-tree page in the middle of the file (not the header page).
    middle = (len(data) // page_size // 2) * page_size
    data[middle : middle + page_size] = b"\xa5" * page_size
    path.write_bytes(bytes(data))
    with pytest.raises(DatastoreError, match=r"integrity check|corrupt"):
        make(path)
    assert path.read_bytes() == bytes(data)


def test_foreign_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.db"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE customers (id INTEGER)")
    conn.commit()
    conn.close()
    with pytest.raises(DatastoreError, match="not a Tessera datastore"):
        make(path)
    conn = sqlite3.connect(path)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert tables == {"customers"}


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ds.sqlite3"
    make(path).close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION + 1,))
    conn.commit()
    conn.close()
    with pytest.raises(DatastoreError, match="newer than this Tessera supports"):
        make(path)


def test_damaged_schema_version_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "ds.sqlite3"
    make(path).close()
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO schema_version (version) VALUES (1)")
    conn.commit()
    conn.close()
    with pytest.raises(DatastoreError, match="2 rows"):
        make(path)


def test_unusable_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(DatastoreError, match="not a directory"):
        make(a_file / "ds.sqlite3")
    with pytest.raises(DatastoreError, match="not a regular file"):
        make(tmp_path)
    with pytest.raises(DatastoreError, match="must be a file path"):
        make(Path(":memory:"))
    monkeypatch.setattr(os, "access", lambda *_a, **_k: False)
    with pytest.raises(DatastoreError, match="not writable"):
        make(tmp_path / "new" / "ds.sqlite3")


def test_locked_by_another_process_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "ds.sqlite3"
    store = make(path, busy_timeout=0.2)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(DatastoreError, match="locked by another process"):
            store.set_ca_journal("s", b"x")
        store.get_ca_journal("s")  # WAL: readers are not blocked by the writer
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    store.set_ca_journal("s", b"x")
    store.close()


def test_unchanged_sync_reads_no_entry_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = make(tmp_path / "ds.sqlite3")
    for i in range(5):
        store.create_entry(RegistrationEntry("", f"spiffe://example.org/w{i}", AGENT, (Selector("a", str(i)),)))
    statements: list[str] = []
    real_query = sqlite_backend._SqliteTx.query

    def spy(self: sqlite_backend._SqliteTx, sql: str, params: object = ()) -> list[tuple[object, ...]]:
        statements.append(sql)
        return real_query(self, sql, params)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite_backend._SqliteTx, "query", spy)
    store.create_entry(
        RegistrationEntry(
            "", "spiffe://example.org/nodes/n", "spiffe://example.org/tessera/server", (Selector("x", "1"),), node=True
        )
    )
    assert [e.spiffe_id for e in store.node_alias_entries_matching((Selector("x", "1"),))] == [
        "spiffe://example.org/nodes/n"
    ]
    statements.clear()
    current = store.revisions().entries
    # What a sync of an unchanged agent asks: its aliases (warm cache), then the changes since its revision.
    aliases = store.node_alias_entries_matching((Selector("x", "1"), Selector("y", "2")))
    assert [e.spiffe_id for e in aliases] == ["spiffe://example.org/nodes/n"]
    changes = store.entries_changed_since([AGENT], current)
    assert changes.upserts == [] and changes.revision == current
    assert statements, "the spy saw nothing"
    assert not [s for s in statements if "entries" in s.replace("revisions", "") or "tombstones" in s]
    statements.clear()
    store.entries_changed_since([AGENT], current - 1)
    assert any("FROM entries" in s for s in statements)  # the spy does see entry reads
    store.close()


def test_join_token_secret_never_reaches_the_file(tmp_path: Path) -> None:
    path = tmp_path / "ds.sqlite3"
    secret = "very-secret-join-token-4f1c2a"
    with make(path) as store:
        store.create_join_token(secret, 1_900_000_000)
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.is_file())
    assert secret.encode() not in raw


def test_calls_after_close_fail_clearly(tmp_path: Path) -> None:
    store = make(tmp_path / "ds.sqlite3")
    store.close()
    with pytest.raises(DatastoreError, match="closed"):
        store.revisions()


def test_open_datastore_specs(tmp_path: Path) -> None:
    with open_datastore(None, data_dir=tmp_path) as store:
        assert isinstance(store, SqliteDatastore) and store.path == tmp_path / "datastore.sqlite3"
    with open_datastore(f"sqlite://{tmp_path}/abs.db", data_dir=tmp_path / "x") as store:
        assert isinstance(store, SqliteDatastore) and store.path == tmp_path / "abs.db"
    with open_datastore("sqlite:rel/ds.db", data_dir=tmp_path) as store:
        assert isinstance(store, SqliteDatastore) and store.path == tmp_path / "rel" / "ds.db"
    with open_datastore("plain.db", data_dir=tmp_path) as store:
        assert isinstance(store, SqliteDatastore) and store.path == tmp_path / "plain.db"
    with pytest.raises(DatastoreError, match="PostgreSQL"):
        open_datastore("postgresql://u@localhost/db", data_dir=tmp_path)
    with pytest.raises(DatastoreError, match="not supported"):
        open_datastore("mysql://x", data_dir=tmp_path)
    with pytest.raises(DatastoreError, match="sqlite:///"):
        open_datastore("sqlite://relative", data_dir=tmp_path)
