"""Storage faults with real server processes: each ends in one clear line (start-up) or a clear status code
(while running), never a traceback, a hang, or a server that silently starts over with a new CA or an empty
datastore."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from hardening_support import server_proc
from support.inproc import TD
from support.procs import NOBODY, PY, SYSTEM_PYTHON, VENV_SITE, TesseraServer, as_user, run, wait_for

pytestmark = pytest.mark.slow


def _exits_with_one_line(server: TesseraServer, timeout: float = 30) -> str:
    server.start()
    assert server.proc is not None
    try:
        code = server.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        server.stop()
        raise AssertionError("the server did not refuse to start:\n" + server.output()) from None
    assert code != 0
    lines = [line for line in server.output().splitlines() if line.startswith("tessera-server: ")]
    assert len(lines) == 1, server.output()
    assert "Traceback" not in server.output()
    server.proc = None
    return lines[0]


def _fresh_server(root: Path) -> tuple[TesseraServer, str]:
    server = server_proc(root).start_and_wait()
    bundle = server.admin("bundle", "show")
    server.admin(
        "entry", "create", "--spiffe-id", f"spiffe://{TD}/kept", "--parent-id", f"spiffe://{TD}/host/a",
        "--selector", "unix:uid:0",
    )  # fmt: skip
    server.stop()
    return server, bundle


def test_a_data_dir_the_server_user_does_not_own_is_a_clear_error(root: Path) -> None:
    data = root / "readonly"
    data.mkdir(mode=0o755)  # owned by root; the server runs as nobody
    sockets = root / "nobody-sockets"
    sockets.mkdir()
    os.chown(sockets, NOBODY, NOBODY)
    # The venv's interpreter lives under a directory nobody cannot enter: the system Python plus its site dir.
    launcher = (
        f"import sys, site; site.addsitedir({VENV_SITE!r}); from tessera.server.cli import main; sys.exit(main())"
    )
    argv = [
        *as_user(NOBODY), SYSTEM_PYTHON, "-S", "-c", launcher, "run", "--trust-domain", TD, "--data-dir", str(data),
        "--bind-address", "127.0.0.1:0", "--socket", str(sockets / "admin" / "api.sock"),
    ]  # fmt: skip

    out = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/tmp", check=False)
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"tessera-server: error: data_dir: {data} is owned by uid 0 (root), not by you (uid {NOBODY}); "
        "remove it or choose another directory"
    )
    assert not any(data.iterdir())


def test_a_locked_database_is_a_clear_error(root: Path) -> None:
    server, _ = _fresh_server(root)
    holder = sqlite3.connect(server.data_dir / "datastore.sqlite3", isolation_level=None)
    try:
        holder.execute("BEGIN EXCLUSIVE")
        line = _exits_with_one_line(server_proc(root, port=server.port))
        assert "is locked by another process" in line and "another server" in line
    finally:
        holder.close()
    server_proc(root, port=server.port).start_and_wait().stop()  # and it starts once the lock is gone


def test_a_corrupted_database_is_refused(root: Path) -> None:
    server, _ = _fresh_server(root)
    db = server.data_dir / "datastore.sqlite3"
    data = bytearray(db.read_bytes())
    data[100:4096] = os.urandom(3996)
    db.write_bytes(bytes(data))
    line = _exits_with_one_line(server_proc(root, port=server.port))
    assert "corrupt" in line and "refusing to use it" in line


def test_a_removed_database_is_refused_never_an_empty_restart(root: Path) -> None:
    server, bundle = _fresh_server(root)
    (server.data_dir / "datastore.sqlite3").rename(root / "backup.sqlite3")
    line = _exits_with_one_line(server_proc(root, port=server.port))
    assert "datastore.sqlite3 is missing" in line and "restore" in line
    assert not (server.data_dir / "datastore.sqlite3").exists()
    # Restoring the backup brings everything back, with the same CA.
    (root / "backup.sqlite3").rename(server.data_dir / "datastore.sqlite3")
    restarted = server_proc(root, port=server.port).start_and_wait()
    try:
        assert restarted.admin("bundle", "show") == bundle
        assert f"spiffe://{TD}/kept" in restarted.admin("entry", "show")
    finally:
        restarted.stop()


def test_removed_ca_state_is_refused_never_a_silent_new_ca(root: Path) -> None:
    server, bundle = _fresh_server(root)
    shutil.move(server.data_dir / "ca", root / "ca-backup")
    line = _exits_with_one_line(server_proc(root, port=server.port))
    assert "CA state" in line and "missing" in line and "new CA" in line
    shutil.move(root / "ca-backup", server.data_dir / "ca")
    restarted = server_proc(root, port=server.port).start_and_wait()
    try:
        assert restarted.admin("bundle", "show") == bundle
    finally:
        restarted.stop()


def test_a_full_disk_is_a_clear_error_and_the_server_stays_up(root: Path) -> None:
    mount = root / "small"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        server = server_proc(mount, admin_socket=str(root / "admin-full" / "api.sock"), log=root / "server-full.log")
        server.start_and_wait()
        try:
            with open(mount / "filler", "wb") as filler:
                try:
                    while True:
                        filler.write(b"\0" * 65536)
                        filler.flush()
                except OSError:
                    pass
            out = run(
                PY, "-m", "tessera.server", "entry", "create", "--spiffe-id", f"spiffe://{TD}/w",
                "--parent-id", f"spiffe://{TD}/host/a", "--selector", "unix:uid:1", "--socket", server.admin_socket,
            )  # fmt: skip
            assert out.returncode == 1
            assert "database or disk is full" in out.stderr and len(out.stderr.strip().splitlines()) == 1
            assert server.healthy()
            (mount / "filler").unlink()
            created = wait_for(
                lambda: run(
                    PY, "-m", "tessera.server", "entry", "create", "--spiffe-id", f"spiffe://{TD}/w",
                    "--parent-id", f"spiffe://{TD}/host/a", "--selector", "unix:uid:1",
                    "--socket", server.admin_socket,
                ).returncode == 0,
                what="entry creation once space is back",
            )  # fmt: skip
            assert created
        finally:
            server.stop()
    finally:
        for _ in range(20):
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode == 0:
                break
            time.sleep(0.2)
