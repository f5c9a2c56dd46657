"""A private, throw-away PostgreSQL cluster for tests and benchmarks.

``initdb`` + ``pg_ctl`` in a short temp dir under /tmp, listening only on a Unix socket there (no TCP), trust
authentication for one superuser. Tuned for tests (no fsync), never for data anyone keeps. When the process
runs as root (initdb refuses root), the cluster runs as ``nobody`` with the directory chowned to it.

Missing binaries are an error with instructions, never a skip: CI installs them (scripts/system-deps.sh).
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from urllib.parse import quote

from support.procs import as_user

SUPERUSER = "tessera"


class PostgresUnavailable(RuntimeError):
    """The PostgreSQL server binaries are not installed, or the cluster would not start."""


def find_bin_dir() -> Path:
    """The directory holding initdb and pg_ctl: on PATH, else the newest /usr/lib/postgresql/*/bin."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(os.path.realpath(on_path)).parent
    candidates = [Path(p).parent for p in glob.glob("/usr/lib/postgresql/*/bin/initdb")]

    def version(path: Path) -> tuple[int, ...]:
        text = path.parent.name
        return tuple(int(x) for x in text.split(".") if x.isdigit()) or (0,)

    for bin_dir in sorted(candidates, key=version, reverse=True):
        if (bin_dir / "pg_ctl").exists():
            return bin_dir
    raise PostgresUnavailable(
        "PostgreSQL server binaries (initdb, pg_ctl) were not found on PATH or under /usr/lib/postgresql/*/bin; "
        "install them with scripts/system-deps.sh (Debian: apt-get install postgresql)"
    )


class PgCluster:
    """One running cluster; ``create_database()`` hands out a fresh, empty database URL each call."""

    def __init__(self, *, max_connections: int = 300, fsync: bool = False) -> None:
        self.bin_dir = find_bin_dir()
        self.base = Path(tempfile.mkdtemp(prefix="tpg", dir="/tmp"))  # short: the socket path is base/.s.PGSQL.5432
        self.data = self.base / "data"
        self.log = self.base / "postgres.log"
        self._run_as: tuple[int, int] | None = None
        self._counter = itertools.count(1)
        self._lock = threading.Lock()
        self._started = False
        self.max_connections = max_connections
        self.fsync = fsync
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            self._run_as = (nobody.pw_uid, nobody.pw_gid)
            os.chown(self.base, nobody.pw_uid, nobody.pw_gid)

    # ---- lifecycle ----------------------------------------------------------------------------------------

    def _run(self, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
        uid, gid = self._run_as if self._run_as is not None else (None, None)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        demote = [] if uid is None else as_user(uid, gid)
        return subprocess.run(
            [*demote, str(self.bin_dir / args[0]), *args[1:]],
            cwd=self.base,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self) -> PgCluster:
        init = self._run(
            "initdb", "-D", str(self.data), "-U", SUPERUSER, "-A", "trust", "-E", "UTF8", "--no-locale",
            "--no-sync", "--no-instructions",
        )  # fmt: skip
        if init.returncode != 0:
            self.cleanup()
            raise PostgresUnavailable(f"initdb failed ({init.returncode}): {init.stderr.strip() or init.stdout}")
        try:
            self.start_server()
        except PostgresUnavailable:
            self.cleanup()
            raise
        return self

    def start_server(self) -> None:
        """Starts (or restarts) the server on the existing data directory."""
        settings = [
            f"-k {self.base}",
            "-c listen_addresses=''",
            f"-c max_connections={self.max_connections}",
            "-c shared_buffers=64MB",
            "-c dynamic_shared_memory_type=mmap",
        ]
        if not self.fsync:  # commits still reach the OS before returning; only a machine crash could lose them
            settings += ["-c fsync=off", "-c full_page_writes=off"]
        started = self._run(
            "pg_ctl", "start", "-D", str(self.data), "-w", "-t", "60", "-l", str(self.log), "-o", " ".join(settings)
        )
        if started.returncode != 0:
            detail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
            raise PostgresUnavailable(f"pg_ctl start failed: {started.stderr.strip()}\n{detail}")
        self._started = True

    def stop_server(self) -> None:
        """Stops at once (``-m immediate``, like a crash: nothing here is worth a checkpoint)."""
        if self._started:
            self._started = False
            self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "immediate", "-w", "-t", "30", timeout=60)

    def stop(self) -> None:
        """Stops the server and removes the directory."""
        self.stop_server()
        self.cleanup()

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- databases ----------------------------------------------------------------------------------------

    def url(self, dbname: str) -> str:
        return f"postgresql://{SUPERUSER}@/{dbname}?host={quote(str(self.base), safe='')}"

    def create_database(self, prefix: str = "t") -> str:
        """Creates an empty database (from template0, so nothing leaks between tests) and returns its URL."""
        import psycopg

        with self._lock:
            name = f"{prefix}_{os.getpid()}_{next(self._counter)}"
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" TEMPLATE template0')
        return self.url(name)

    def drop_database(self, url: str) -> None:
        import psycopg

        name = url.split("/")[3].split("?")[0]
        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
