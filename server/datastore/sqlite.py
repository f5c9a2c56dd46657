"""The SQLite backend: the default, embedded datastore in the server's data directory.

One file, WAL journal (readers never block the writer), foreign keys on, a busy timeout for other processes.
Connections come from a small pool, so any thread (asyncio's default executor included) can call any method;
writers inside this process are serialized by a lock before ``BEGIN IMMEDIATE``, so threads never spin on
SQLite's busy handler against each other.

Opening is deliberately strict: a file that is not a SQLite database, fails SQLite's quick check, belongs to
another program, or has a newer schema is refused with a message saying so. It is never recreated, because a
recreated datastore silently forgets every entry, ban and consumed join token.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from tessera.server.datastore.sql import Row, SqlDatastore, Tx
from tessera.server.errors import AlreadyExists, DatastoreError, ServerError

DEFAULT_BUSY_TIMEOUT = 10.0
"""Seconds a writer waits for another process's write lock before the call fails as 'locked'."""

SYNCHRONOUS_MODES = ("FULL", "NORMAL")


class _SqliteTx:
    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[Row]:
        return self._conn.execute(sql, params).fetchall()

    def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._conn.execute(sql, params).rowcount


class SqliteDatastore(SqlDatastore):
    """A :class:`~tessera.server.datastore.base.Datastore` in one SQLite file.

    ``synchronous`` is SQLite's durability setting: ``FULL`` (default) syncs the WAL on every commit, so a
    power cut never resurrects a used join token or forgets a ban; ``NORMAL`` is faster and still never
    corrupts the file, but may lose the last commits on power loss. ``check_integrity`` runs SQLite's quick
    check on open (linear in the file size; well under a second at 100,000 entries).
    """

    blob_type = "BLOB"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        synchronous: str = "FULL",
        check_integrity: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(clock=clock)
        if synchronous.upper() not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {SYNCHRONOUS_MODES}, got {synchronous!r}")
        self._path = Path(path)
        self._busy_timeout = busy_timeout
        self._synchronous = synchronous.upper()
        self._pool: queue.SimpleQueue[sqlite3.Connection] = queue.SimpleQueue()
        self._all: list[sqlite3.Connection] = []
        self._pool_lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._closed = False
        self._prepare_file()
        try:
            conn = self._connect()
            self._pool.put(conn)
            if check_integrity:
                self._quick_check(conn)
            self._migrate()
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> Path:
        return self._path

    @property
    def _description(self) -> str:
        return f"SQLite datastore {self._path}"

    # ---- opening ------------------------------------------------------------------------------------------

    def _prepare_file(self) -> None:
        path = self._path
        if str(path) in ("", ":memory:") or str(path).startswith("file:"):
            raise DatastoreError(f"SQLite datastore path {str(path)!r} must be a file path (in-memory is not shared)")
        parent = path.parent
        try:
            parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            raise DatastoreError(
                f"cannot create SQLite datastore {path}: {parent} exists and is not a directory"
            ) from None
        except OSError as exc:
            raise DatastoreError(f"cannot create the directory of SQLite datastore {path}: {exc.strerror}") from None
        if not parent.is_dir():
            raise DatastoreError(f"cannot create SQLite datastore {path}: {parent} is not a directory")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise DatastoreError(
                f"SQLite datastore directory {parent} is not writable by this user (the WAL and lock files live there)"
            )
        try:
            st = path.stat()
        except FileNotFoundError:
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
            except FileExistsError:
                return
            except OSError as exc:
                raise DatastoreError(f"cannot create SQLite datastore {path}: {exc.strerror}") from None
            os.close(fd)
            return
        except OSError as exc:
            raise DatastoreError(f"cannot use SQLite datastore {path}: {exc.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            raise DatastoreError(f"SQLite datastore {path} is not a regular file")
        if not os.access(path, os.R_OK | os.W_OK):
            raise DatastoreError(f"SQLite datastore {path} is not readable and writable by this user")

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(
                self._path,
                timeout=self._busy_timeout,
                isolation_level=None,  # transactions are explicit (BEGIN / COMMIT)
                check_same_thread=False,  # the pool hands a connection to one thread at a time
            )
        except sqlite3.Error as exc:
            raise self._map_error(exc) from None
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout * 1000)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise DatastoreError(
                    f"{self._description}: cannot switch to WAL journal mode (got {mode!r}); "
                    "is the file on a filesystem without shared-memory support?"
                )
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
        except sqlite3.Error as exc:
            conn.close()
            raise self._map_error(exc) from None
        except BaseException:
            conn.close()
            raise
        with self._pool_lock:
            self._all.append(conn)
        return conn

    def _quick_check(self, conn: sqlite3.Connection) -> None:
        try:
            rows = conn.execute("PRAGMA quick_check").fetchall()
        except sqlite3.Error as exc:
            raise self._map_error(exc) from None
        problems = [str(r[0]) for r in rows if str(r[0]) != "ok"]
        if problems:
            raise DatastoreError(
                f"{self._description} failed SQLite's integrity check ({'; '.join(problems[:3])}); refusing to "
                "start: restore it from a backup or move it aside"
            )

    def _existing_tables(self, tx: Tx) -> set[str]:
        rows = tx.query("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        return {str(r[0]) for r in rows}

    # ---- transactions -------------------------------------------------------------------------------------

    def _map_error(self, exc: sqlite3.Error) -> DatastoreError:
        text = str(exc)
        lowered = text.lower()
        if isinstance(exc, sqlite3.IntegrityError) and "unique" in lowered:
            return AlreadyExists(f"a record with the same key already exists ({text})")
        if "not a database" in lowered or "malformed" in lowered or "corrupt" in lowered:
            return DatastoreError(
                f"{self._description} is not a SQLite database or is corrupt ({text}); refusing to use it: restore "
                "it from a backup or move it aside"
            )
        if "locked" in lowered or "busy" in lowered:
            return DatastoreError(
                f"{self._description} is locked by another process (waited {self._busy_timeout:g}s); is another "
                "server using the same data directory?"
            )
        if "readonly" in lowered or "read-only" in lowered:
            return DatastoreError(f"{self._description} is read-only: {text}")
        if "unable to open" in lowered:
            return DatastoreError(f"cannot open {self._description}: {text}")
        if "disk i/o" in lowered or "disk is full" in lowered:
            return DatastoreError(f"{self._description}: storage failure: {text}")
        return DatastoreError(f"{self._description}: {type(exc).__name__}: {text}")

    def _acquire(self) -> sqlite3.Connection:
        if self._closed:
            raise DatastoreError(f"{self._description} is closed")
        try:
            return self._pool.get_nowait()
        except queue.Empty:
            return self._connect()

    def _release(self, conn: sqlite3.Connection) -> None:
        if self._closed:
            conn.close()
        else:
            self._pool.put(conn)

    @contextlib.contextmanager
    def _transaction(self, *, write: bool) -> Iterator[Tx]:
        conn = self._acquire()
        lock = self._write_lock if write else None
        if lock is not None:
            lock.acquire()
        try:
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.Error as exc:
                raise self._map_error(exc) from None
            try:
                yield _SqliteTx(conn)
                conn.execute("COMMIT")
            except BaseException as exc:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error) and not isinstance(exc, ServerError):
                    raise self._map_error(exc) from None
                raise
        finally:
            if lock is not None:
                lock.release()
            self._release(conn)

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def close(self) -> None:
        self._closed = True
        with self._pool_lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
