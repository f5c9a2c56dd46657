"""What only the PostgreSQL backend has: URLs, the pool, servers migrating together, and surviving a database
restart. (The behavioural contract runs on PostgreSQL in test_server_store_datastore.py.)"""

from __future__ import annotations

import glob
import shutil
import threading
import time
from pathlib import Path

import psycopg
import pytest
from pgcluster import PgCluster

from tessera.server.datastore import RegistrationEntry, Selector, open_datastore
from tessera.server.datastore.postgres import PostgresDatastore, describe_url, split_url
from tessera.server.datastore.schema import SCHEMA_VERSION
from tessera.server.errors import DatastoreError


def entry(path: str) -> RegistrationEntry:
    return RegistrationEntry(
        id="",
        spiffe_id=f"spiffe://example.org/{path}",
        parent_id="spiffe://example.org/tessera/agent/a",
        selectors=(Selector("unix", "uid:1000"),),
    )


def test_urls_never_show_passwords_and_pool_options_are_not_sent_to_libpq() -> None:
    assert describe_url("postgresql://tessera:s3cret@db:5432/tessera") == "postgresql://tessera:***@db:5432/tessera"
    assert "s3cret" not in describe_url("postgresql:///tessera?host=/run/pg&password=s3cret")
    assert describe_url("postgresql://db/tessera") == "postgresql://db/tessera"
    conninfo, options = split_url("postgresql://u@db/x?sslmode=require&pool_size=20&pool_timeout=3")
    assert options == {"pool_size": "20", "pool_timeout": "3"}
    assert conninfo == "postgresql://u@db/x?sslmode=require"


def test_open_datastore_opens_postgresql_urls(pg_url: str, tmp_path: Path) -> None:
    with open_datastore(pg_url, data_dir=tmp_path) as store:
        assert isinstance(store, PostgresDatastore)
        assert store.schema_version() == SCHEMA_VERSION
    assert not (tmp_path / "datastore.sqlite3").exists()


def test_unreachable_database_is_one_clear_error_without_the_password(pg_cluster: PgCluster) -> None:
    missing = pg_cluster.url("no_such_db").replace("tessera@", "tessera:hunter2@")
    with pytest.raises(DatastoreError) as info:
        PostgresDatastore(missing, timeout=5)
    message = str(info.value)
    assert "cannot connect to PostgreSQL datastore" in message and "no_such_db" in message
    assert "hunter2" not in message and "\n" not in message


def test_bad_pool_options_are_refused(pg_url: str) -> None:
    with pytest.raises(DatastoreError, match="pool_size"):
        PostgresDatastore(pg_url + "&pool_size=0")
    with pytest.raises(DatastoreError, match="pool_size"):
        PostgresDatastore(pg_url + "&pool_size=many")


def test_a_database_with_foreign_tables_is_refused(pg_url: str) -> None:
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    with pytest.raises(DatastoreError, match="not a Tessera datastore"):
        PostgresDatastore(pg_url)


def test_servers_starting_together_migrate_once(pg_url: str) -> None:
    stores: list[PostgresDatastore] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def start() -> None:
        try:
            s = PostgresDatastore(pg_url, pool_size=2)
            with lock:
                stores.append(s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    try:
        assert not errors, errors
        assert len(stores) == 6
        assert {s.schema_version() for s in stores} == {SCHEMA_VERSION}
        stores[0].create_entry(entry("once"))
        assert stores[5].count_entries() == 1
    finally:
        for s in stores:
            s.close()


def test_pool_serves_more_threads_than_connections(pg_url: str) -> None:
    with PostgresDatastore(pg_url, pool_size=2) as store:
        failures: list[BaseException] = []

        def work(i: int) -> None:
            try:
                for j in range(5):
                    store.create_entry(entry(f"t{i}/{j}"))
                    store.revisions()
            except BaseException as exc:
                failures.append(exc)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not failures, failures
        assert store.count_entries() == 40
        assert store.revisions().entries == 40


def test_calls_after_close_fail_clearly(pg_url: str) -> None:
    store = PostgresDatastore(pg_url)
    store.close()
    store.close()  # idempotent
    with pytest.raises(DatastoreError, match="closed"):
        store.revisions()


def test_store_survives_a_database_restart() -> None:
    # A private cluster: restarting the session's would disturb other tests.
    with PgCluster(max_connections=20) as cluster:
        url = cluster.create_database()
        with PostgresDatastore(url, pool_size=3, timeout=8) as store:
            store.create_entry(entry("before"))
            # Crash-stop (drops every pooled connection), then start again on the same data directory.
            cluster.stop_server()
            with pytest.raises(DatastoreError, match=r"unreachable|no database connection"):
                store.create_entry(entry("while-down"))
            time.sleep(3)  # an outage longer than one call waits: reconnection attempts are under way and backing off
            cluster.start_server()
            store.create_entry(entry("after"))  # broken pooled connections are replaced, not reused
            assert {e.spiffe_id.rsplit("/", 1)[1] for e in store.list_entries().items} == {"before", "after"}


def _entry_table_scans(url: str) -> int:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT COALESCE(SUM(seq_scan), 0) + COALESCE(SUM(idx_scan), 0) FROM pg_stat_user_tables "
            "WHERE relname IN ('entries', 'entry_selectors', 'entry_tombstones')"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _flush_stats(store: PostgresDatastore) -> None:
    # Statistics reach the shared views when a backend goes idle; force it for the store's one connection.
    with store._transaction(write=False) as tx:
        tx.query("SELECT pg_stat_force_next_flush()")


def test_unchanged_sync_scans_no_entry_table(pg_url: str) -> None:
    agent = "spiffe://example.org/tessera/agent/a"
    alias_selectors = (Selector("x", "1"),)
    store = PostgresDatastore(pg_url, pool_size=1)
    try:
        for i in range(20):
            store.create_entry(entry(f"w{i}"))
        store.create_entry(
            RegistrationEntry("", "spiffe://example.org/nodes/n", "spiffe://example.org/tessera/server",
                              alias_selectors, node=True)
        )  # fmt: skip
        store.node_alias_entries_matching(alias_selectors)  # warms the alias cache, as the first sync does
        current = store.revisions().entries
        _flush_stats(store)
        before = _entry_table_scans(pg_url)
        for _ in range(10):  # what Sync asks for an agent holding the current revision
            assert store.node_alias_entries_matching(alias_selectors)
            assert store.entries_changed_since([agent, "spiffe://example.org/nodes/n"], current).upserts == []
        _flush_stats(store)
        assert _entry_table_scans(pg_url) == before
        # the measurement does see entry reads: an agent one revision behind reads its changes
        assert store.entries_changed_since([agent], current - 1).revision == current
        _flush_stats(store)
        assert _entry_table_scans(pg_url) > before
    finally:
        store.close()


def test_missing_postgresql_binaries_fail_with_install_instructions(monkeypatch: pytest.MonkeyPatch) -> None:
    import pgcluster

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.setattr(glob, "glob", lambda pattern: [])
    with pytest.raises(pgcluster.PostgresUnavailable, match=r"system-deps\.sh"):
        pgcluster.find_bin_dir()


def test_binaries_are_found_under_usr_lib_postgresql_when_not_on_path(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import pgcluster

    versions = ("9.6", "16")  # numeric order, not string order: 16 is the newest
    for version in versions:
        (tmp_path / version / "bin").mkdir(parents=True)
        for tool in ("initdb", "pg_ctl"):
            (tmp_path / version / "bin" / tool).touch()
    monkeypatch.setattr(shutil, "which", lambda name: None)
    found = [str(tmp_path / v / "bin" / "initdb") for v in versions]
    monkeypatch.setattr(glob, "glob", lambda pattern: found)
    assert pgcluster.find_bin_dir() == tmp_path / "16" / "bin"
