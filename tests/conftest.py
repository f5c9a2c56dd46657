"""Suite-wide fixtures. Only the private PostgreSQL cluster lives here (see tests/pgcluster.py): started once per
session by the first test that asks for it, stopped at session end whether tests passed or not."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from pgcluster import PgCluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    """A running cluster; missing binaries fail the test with install instructions (never a silent skip)."""
    cluster = PgCluster().start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def pg_url(pg_cluster: PgCluster) -> str:
    """A fresh, empty database of the session cluster, for one test."""
    return pg_cluster.create_database()
