"""Opening a datastore from the server's ``--datastore`` setting (a path or a URL)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from tessera.server.datastore.base import Datastore
from tessera.server.errors import DatastoreError

DEFAULT_SQLITE_FILE = "datastore.sqlite3"


def open_datastore(
    spec: str | None,
    *,
    data_dir: str | Path,
    clock: Callable[[], float] = time.time,
) -> Datastore:
    """Opens (creating and migrating as needed) the datastore named by ``spec``.

    ``spec`` is empty/None (SQLite file ``datastore.sqlite3`` in ``data_dir``), ``sqlite:///abs/path``,
    ``sqlite:relative/path`` (relative to ``data_dir``), a plain file path, or a ``postgresql://`` URL (a
    database several servers share; see :class:`~tessera.server.datastore.postgres.PostgresDatastore`).
    """
    from tessera.server.datastore.sqlite import SqliteDatastore

    base = Path(data_dir)
    if not spec:
        return SqliteDatastore(base / DEFAULT_SQLITE_FILE, clock=clock)
    if spec.startswith(("postgresql://", "postgres://")):
        from tessera.server.datastore.postgres import PostgresDatastore

        return PostgresDatastore(spec, clock=clock)
    if spec.startswith("sqlite:"):
        rest = spec[len("sqlite:") :]
        if rest.startswith("//"):
            rest = rest[2:]
            if not rest.startswith("/"):
                raise DatastoreError(f"datastore URL {spec!r}: write sqlite:///absolute/path or sqlite:relative/path")
        if not rest:
            raise DatastoreError(f"datastore URL {spec!r} names no file")
        spec = rest
    elif "://" in spec:
        scheme = spec.split("://", 1)[0]
        raise DatastoreError(f"datastore URL scheme {scheme!r} is not supported (use a file path or sqlite:///path)")
    path = Path(spec)
    return SqliteDatastore(path if path.is_absolute() else base / path, clock=clock)
