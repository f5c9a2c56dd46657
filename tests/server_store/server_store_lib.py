"""Backends for the datastore test suite: every behavioural test runs against each name in BACKENDS.

A backend gives tests a way to open the *same* database several times (restart, second server) with an
injected clock. "postgresql" runs against a fresh database of the session's private cluster (tests/conftest.py,
tests/pgcluster.py); the tests do not change.
"""

from __future__ import annotations

from pathlib import Path

from tessera.server.datastore import Datastore
from tessera.server.datastore.postgres import PostgresDatastore
from tessera.server.datastore.sqlite import SqliteDatastore

BACKENDS = ["sqlite", "postgresql"]

TD = "example.org"
SERVER_ID = "spiffe://example.org/tessera/server"


class FakeClock:
    """A settable clock (unix seconds) for stores and validation."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Backend:
    def __init__(self, name: str, tmp_path: Path, url: str = "") -> None:
        self.name = name
        self.url = url  # the test's database, for "postgresql"
        self.tmp_path = tmp_path
        self.clock = FakeClock()
        self._open: list[Datastore] = []

    def open(self) -> Datastore:
        """Opens (another handle to) this test's database; closed automatically at teardown."""
        if self.name == "sqlite":
            store: Datastore = SqliteDatastore(self.tmp_path / "store" / "datastore.sqlite3", clock=self.clock)
        elif self.name == "postgresql":
            store = PostgresDatastore(self.url, pool_size=4, clock=self.clock)
        else:  # pragma: no cover - only names in BACKENDS are used
            raise AssertionError(f"unknown backend {self.name}")
        self._open.append(store)
        return store

    def close_all(self) -> None:
        for store in self._open:
            store.close()
        self._open.clear()
