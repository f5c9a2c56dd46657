"""The PostgreSQL backend: one database shared by several servers (high availability).

Every query, revision rule and migration lives in :mod:`tessera.server.datastore.sql`; this module only supplies
transactions from a connection pool (``psycopg`` 3 + ``psycopg_pool``) and the dialect facts that module's
docstring lists:

* read transactions are ``REPEATABLE READ READ ONLY`` (one snapshot, so a sync reads the revision counter and
  the rows it implies together); write transactions are ``READ COMMITTED`` and serialize on the counter row's
  lock, which the portable SQL takes first;
* ``?`` placeholders become ``%s``; statements are prepared automatically by psycopg after a few executions,
  so the hot sync queries are parsed once per connection;
* unique violations become :class:`~tessera.server.errors.AlreadyExists`, everything else a
  :class:`~tessera.server.errors.DatastoreError` whose message names the database (never its password);
* servers starting together migrate once, under ``pg_advisory_lock``.

Connections are checked before each use, so a database restart or fail-over costs the next call nothing more
than a reconnect rather than an error.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tessera.server.datastore.sql import Row, SqlDatastore, Tx
from tessera.server.errors import AlreadyExists, DatastoreError, ServerError

try:  # the driver is a declared dependency, but say clearly what is missing if it was left out
    import psycopg
    from psycopg import errors as pg_errors
    from psycopg_pool import ConnectionPool, PoolTimeout
except ImportError as _exc:  # pragma: no cover - exercised only in a broken install
    raise DatastoreError(
        f"the PostgreSQL datastore needs the psycopg 3 driver ({_exc}); install 'psycopg[binary]' and 'psycopg-pool'"
    ) from None

DEFAULT_POOL_SIZE = 10
"""Connections per server; a server's concurrent datastore calls beyond this wait for a free connection."""

DEFAULT_CONNECT_TIMEOUT = 10.0
"""Seconds to wait for the database when opening, and for a free pooled connection on each call."""

RECONNECT_WINDOW = 5.0
"""Seconds one reconnection attempt keeps retrying (with backoff) before giving up; the next call that needs a
connection starts a fresh attempt at once. Short, so a database back after a long outage is used within
seconds instead of after the driver's exponential backoff has grown to minutes."""

MIGRATION_LOCK_KEY = 0x7E55E7A
"""The ``pg_advisory_lock`` key under which servers sharing the database run migrations one at a time."""

_POOL_PARAMS = {"pool_size": "pool_size", "pool_timeout": "pool_timeout"}
"""Query parameters of a ``postgresql://`` URL that configure Tessera's pool (libpq would refuse them)."""


@functools.lru_cache(maxsize=512)
def _to_pyformat(sql: str) -> str:
    # The portable SQL never contains a literal '?' or '%' (sql.py's contract), so this rewrite is exact.
    return sql.replace("?", "%s")


class _PgTx:
    __slots__ = ("_cur",)

    def __init__(self, cur: psycopg.Cursor[Row]) -> None:
        self._cur = cur

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        self._cur.execute(_to_pyformat(sql), params or None)
        return self._cur.fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(_to_pyformat(sql), params or None)
        return self._cur.rowcount


def split_url(url: str) -> tuple[str, dict[str, str]]:
    """Separates Tessera's pool options (``pool_size``, ``pool_timeout``) from the libpq connection URL."""
    parts = urlsplit(url)
    ours: dict[str, str] = {}
    kept: list[tuple[str, str]] = []
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key in _POOL_PARAMS:
            ours[key] = value
        else:
            kept.append((key, value))
    return urlunsplit(parts._replace(query=urlencode(kept))), ours


def describe_url(url: str) -> str:
    """The URL without its password, wherever it was written (for messages and logs)."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, host = netloc.rsplit("@", 1)
        netloc = f"{userinfo.split(':', 1)[0]}:***@{host}"
    query = [(k, "***" if k == "password" else v) for k, v in parse_qsl(parts.query, keep_blank_values=True)]
    return urlunsplit(parts._replace(netloc=netloc, query=urlencode(query, safe="/*")))


class PostgresDatastore(SqlDatastore):
    """A :class:`~tessera.server.datastore.base.Datastore` in a PostgreSQL database, shareable by several servers.

    ``url`` is a libpq URL (``postgresql://user:pass@host:5432/db?sslmode=verify-full``; a Unix socket is
    ``postgresql:///db?host=/run/postgresql``), optionally with ``pool_size`` and ``pool_timeout`` (seconds)
    query parameters. The database must exist and the user must be allowed to create tables in its current
    schema; the schema is created or migrated on open.
    """

    blob_type = "BYTEA"

    def __init__(
        self,
        url: str,
        *,
        pool_size: int | None = None,
        timeout: float | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock=clock)
        conninfo, options = split_url(url)
        self._url = describe_url(url)
        try:
            size = int(options.get("pool_size", pool_size or DEFAULT_POOL_SIZE))
            wait = float(options.get("pool_timeout", timeout or DEFAULT_CONNECT_TIMEOUT))
        except ValueError:
            raise DatastoreError(
                f"datastore URL {self._url}: pool_size must be an integer and pool_timeout seconds"
            ) from None
        if not 1 <= size <= 1000 or not 0 < wait <= 3600:
            raise DatastoreError(f"datastore URL {self._url}: pool_size must be 1..1000 and pool_timeout 0..3600s")
        self._timeout = wait
        self._conninfo = conninfo
        self._closed = False
        self._close_lock = threading.Lock()
        # Connect once directly: the pool retries silently in the background, whereas an operator starting a
        # server wants libpq's own reason (no such database, authentication failed, connection refused) now.
        try:
            probe = psycopg.connect(conninfo, autocommit=True, connect_timeout=max(1, int(wait)))
        except psycopg.Error as exc:
            raise DatastoreError(f"cannot connect to {self._description}: {_first_line(exc)}") from None
        probe.close()
        self._pool: ConnectionPool[psycopg.Connection[Row]] = ConnectionPool(
            conninfo,
            min_size=1,
            max_size=size,
            kwargs={"autocommit": True},
            check=ConnectionPool.check_connection,
            timeout=wait,
            reconnect_timeout=RECONNECT_WINDOW,
            open=False,
            name="tessera-datastore",
        )
        try:
            self._pool.open(wait=True, timeout=wait)
            self._migrate()
        except PoolTimeout:
            self.close()
            raise DatastoreError(f"cannot connect to {self._description} within {wait:g}s") from None
        except BaseException:
            self.close()
            raise

    @property
    def _description(self) -> str:
        return f"PostgreSQL datastore {self._url}"

    def _existing_tables(self, tx: Tx) -> set[str]:
        rows = tx.query(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema() "
            "AND table_type = 'BASE TABLE'"
        )
        return {str(r[0]) for r in rows}

    @contextlib.contextmanager
    def _migration_lock(self) -> Iterator[None]:
        # Session-level advisory lock on a connection outside the pool (so even a pool of one can migrate), held
        # across the per-migration transactions; closing the connection releases it whatever happens.
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True, connect_timeout=max(1, int(self._timeout)))
        except psycopg.Error as exc:
            raise self._map_error(exc) from None
        with conn:
            try:
                conn.execute("SELECT pg_advisory_lock(%s)", (MIGRATION_LOCK_KEY,))
            except psycopg.Error as exc:
                raise self._map_error(exc) from None
            yield

    # ---- transactions -------------------------------------------------------------------------------------

    def _map_error(self, exc: psycopg.Error) -> DatastoreError:
        text = _first_line(exc)
        if isinstance(exc, pg_errors.UniqueViolation):
            return AlreadyExists(f"a record with the same key already exists ({text})")
        if isinstance(exc, pg_errors.InsufficientPrivilege):
            return DatastoreError(f"{self._description}: the database user lacks a privilege: {text}")
        if isinstance(exc, pg_errors.DiskFull):
            return DatastoreError(f"{self._description}: storage failure: {text}")
        if isinstance(exc, psycopg.OperationalError):
            return DatastoreError(f"{self._description} is unreachable or failed: {text}")
        return DatastoreError(f"{self._description}: {type(exc).__name__}: {text}")

    @contextlib.contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Row]]:
        if self._closed:
            raise DatastoreError(f"{self._description} is closed")
        try:
            with self._pool.connection(timeout=self._timeout) as conn:
                yield conn
        except PoolTimeout:
            raise DatastoreError(
                f"{self._description}: no database connection within {self._timeout:g}s (database down, or all "
                "pooled connections busy: raise pool_size in the datastore URL)"
            ) from None

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Tx]:
        with self._connection() as conn:
            try:
                conn.execute("BEGIN" if write else "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            except psycopg.Error as exc:
                raise self._map_error(exc) from None
            try:
                with conn.cursor() as cur:
                    yield _PgTx(cur)
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(psycopg.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, psycopg.Error) and not isinstance(exc, ServerError):
                    raise self._map_error(exc) from None
                raise

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        pool = getattr(self, "_pool", None)
        if pool is not None:
            pool.close(timeout=5.0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
