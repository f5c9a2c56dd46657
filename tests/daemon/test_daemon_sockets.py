"""tessera._daemon.sockets: the rules on facts (pure), and the claim itself on real directories.

The directories of other users are made here by chown (this process runs as root); the attacks by a real
unprivileged process against running daemons are in tests/hardening/test_trust_sockets.py.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.procs import NOBODY, short_dir

from tessera._daemon.errors import SocketClaimError
from tessera._daemon.sockets import (
    MAX_PATH_BYTES,
    PRIVATE_DIR_MODE,
    PRIVATE_SOCKET_MODE,
    PUBLIC_DIR_MODE,
    PUBLIC_SOCKET_MODE,
    STAGING_OVERHEAD,
    ancestor_problem,
    begin_claim,
    claim_socket,
    path_length_problem,
    socket_dir_problem,
    socket_owner_problem,
)

ME = os.geteuid()
DIR = stat.S_IFDIR
LINK = stat.S_IFLNK
SOCK = stat.S_IFSOCK


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned sticky directory like /tmp (fine *above* a socket directory, never as one)."""
    path = short_dir("tds-")
    os.chmod(path, 0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def listener() -> tuple[socket.socket, Callable[[str], None]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def bind(path: str) -> None:
        sock.bind(path)
        sock.listen()

    return sock, bind


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ----------------------------------------------------------------------------------------------- pure rules


def test_socket_directory_must_be_a_real_directory_of_ours_that_nobody_else_writes() -> None:
    assert socket_dir_problem("/d", DIR | 0o755, ME, ME) is None
    assert socket_dir_problem("/d", DIR | 0o700, ME, ME) is None
    owned = socket_dir_problem("/d", DIR | 0o700, NOBODY, 0)
    assert owned == (
        "socket directory /d is owned by uid 65534 (nobody), not by this daemon (uid 0); "
        "remove it or choose another --socket"
    )
    for mode in (0o775, 0o757, 0o1777):  # sticky does not help: others could create the socket's name first
        problem = socket_dir_problem("/d", DIR | mode, ME, ME)
        assert problem is not None and "writable by other users" in problem and f"{mode:04o}" in problem
    assert "symbolic link" in (socket_dir_problem("/d", LINK | 0o777, ME, ME) or "")
    assert "not a directory" in (socket_dir_problem("/d", stat.S_IFREG | 0o600, ME, ME) or "")


def test_ancestors_are_roots_or_ours_and_writable_by_others_only_when_sticky() -> None:
    assert ancestor_problem("/a/d", "/a", DIR | 0o755, 0, 1000) is None
    assert ancestor_problem("/a/d", "/a", DIR | 0o700, 1000, 1000) is None
    assert ancestor_problem("/a/d", "/a", DIR | 0o1777, 0, 1000) is None  # /tmp
    problem = ancestor_problem("/a/d", "/a", DIR | 0o755, NOBODY, 0)
    assert problem is not None and "its parent /a is owned by uid 65534 (nobody)" in problem
    assert "/a/d" in problem
    problem = ancestor_problem("/a/d", "/a", DIR | 0o777, 0, 0)
    assert problem is not None and "without the sticky bit (mode 0777)" in problem and "uid 0 (root)" in problem
    assert ancestor_problem("/a/d", "/a", DIR | 0o775, 0, 0) is not None  # group-writable too
    # a symlink is judged by its owner (its target on the resolved path)
    assert ancestor_problem("/a/d", "/a", LINK | 0o777, 0, 0) is None
    assert ancestor_problem("/a/d", "/a", LINK | 0o777, NOBODY, 0) is not None
    assert "not a directory" in (ancestor_problem("/a/d", "/a", stat.S_IFREG | 0o644, 0, 0) or "")


def test_a_client_talks_only_to_a_socket_of_root_or_its_own() -> None:
    assert socket_owner_problem("s", SOCK | 0o600, 0, 1000) is None
    assert socket_owner_problem("s", SOCK | 0o600, 1000, 1000) is None
    problem = socket_owner_problem("s", SOCK | 0o777, NOBODY, 0)
    assert problem is not None and "owned by uid 65534 (nobody)" in problem and problem.count("\n") == 0
    assert "not a socket" in (socket_owner_problem("s", LINK | 0o777, 0, 0) or "")


def test_path_length_counts_the_staging_path() -> None:
    assert path_length_problem("/run/tessera-agent/public/api.sock") is None
    longest = "/" + "d" * (MAX_PATH_BYTES - STAGING_OVERHEAD - 1)
    assert path_length_problem(longest + "/s") is None
    problem = path_length_problem(longest + "x/s")
    assert problem is not None and ".XXXXXXXX/s" in problem
    assert "longer than the 107" in (path_length_problem("/x/" + "n" * 110) or "")


# ------------------------------------------------------------------------------------------------ the claim


@pytest.mark.parametrize("umask", [0o000, 0o077, 0o777])
def test_missing_directories_are_made_with_exact_modes_and_the_socket_has_its_mode_at_once(
    base: Path, umask: int
) -> None:
    sock, bind = listener()
    old = os.umask(umask)
    try:
        public = claim_socket(f"{base}/a/pub/api.sock", bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
        admin_sock, admin_bind = listener()
        admin = claim_socket(
            f"{base}/a/adm/api.sock", admin_bind, dir_mode=PRIVATE_DIR_MODE, socket_mode=PRIVATE_SOCKET_MODE
        )
    finally:
        os.umask(old)
    try:
        assert mode_of(base / "a") == 0o755 and os.lstat(base / "a").st_uid == ME
        assert mode_of(base / "a" / "pub") == 0o755
        assert mode_of(base / "a" / "adm") == 0o700
        assert stat.S_ISSOCK(os.lstat(base / "a" / "pub" / "api.sock").st_mode)
        assert mode_of(base / "a" / "pub" / "api.sock") == 0o777
        assert mode_of(base / "a" / "adm" / "api.sock") == 0o600
        assert os.listdir(base / "a" / "pub") == ["api.sock"]  # the staging directory is gone
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(f"{base}/a/pub/api.sock")  # the renamed socket is the listening one
    finally:
        public.release()
        admin.release()
        sock.close()
        admin_sock.close()
    assert os.listdir(base / "a" / "pub") == [] and os.listdir(base / "a" / "adm") == []


def test_restart_in_our_own_directory_replaces_a_stale_socket_but_never_a_live_one(base: Path) -> None:
    (base / "own").mkdir(mode=0o755)
    path = f"{base}/own/api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()
    stale_inode = os.lstat(path).st_ino
    sock, bind = listener()
    claimed = claim_socket(path, bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    try:
        assert os.lstat(path).st_ino != stale_inode
        with pytest.raises(SocketClaimError, match="is in use: another process is listening"):
            claim_socket(path, listener()[1], dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
        assert sorted(os.listdir(base / "own")) == ["api.sock"]
    finally:
        claimed.release()
        sock.close()


def test_something_else_at_the_name_is_refused_and_left_alone(base: Path) -> None:
    (base / "own").mkdir(mode=0o700)
    (base / "own" / "api.sock").write_text("data")
    with pytest.raises(SocketClaimError, match="exists and is not a socket"):
        claim_socket(f"{base}/own/api.sock", listener()[1], dir_mode=PRIVATE_DIR_MODE, socket_mode=PRIVATE_SOCKET_MODE)
    (base / "own" / "api.sock").unlink()
    (base / "own" / "api.sock").symlink_to("/etc/passwd")
    with pytest.raises(SocketClaimError, match="exists and is not a socket"):
        claim_socket(f"{base}/own/api.sock", listener()[1], dir_mode=PRIVATE_DIR_MODE, socket_mode=PRIVATE_SOCKET_MODE)
    assert os.readlink(base / "own" / "api.sock") == "/etc/passwd"


def test_release_removes_only_the_socket_it_created(base: Path) -> None:
    sock, bind = listener()
    claimed = claim_socket(f"{base}/d/api.sock", bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    os.unlink(f"{base}/d/api.sock")
    other = socket.socket(socket.AF_UNIX)
    other.bind(f"{base}/d/api.sock")  # someone trusted (root) put another socket at the name meanwhile
    try:
        claimed.release()
        assert stat.S_ISSOCK(os.lstat(f"{base}/d/api.sock").st_mode)
        claimed.release()  # idempotent
    finally:
        other.close()
        sock.close()


def test_a_failed_bind_leaves_no_staging_directory(base: Path) -> None:
    def bind(path: str) -> None:
        raise OSError("no")

    with pytest.raises(OSError, match="no"):
        claim_socket(f"{base}/d/api.sock", bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    assert os.listdir(base / "d") == []


def test_the_staging_directory_is_private_and_inside_the_socket_directory(base: Path) -> None:
    pending = begin_claim(f"{base}/d/api.sock", dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    try:
        staging = Path(pending.bind_path).parent
        assert staging.parent == base / "d" and staging.name.startswith(".")
        assert mode_of(staging) == 0o700 and os.lstat(staging).st_uid == ME
        assert len(pending.bind_path) == len(f"{base}/d") + STAGING_OVERHEAD
    finally:
        pending.abort()
    assert os.listdir(base / "d") == []


@pytest.mark.parametrize(
    ("setup", "named", "owner"),
    [
        # another user's socket directory (even 0700: the squatter)
        (lambda b: (os.mkdir(b / "d", 0o700), os.chown(b / "d", NOBODY, NOBODY)), "/d ", "uid 65534 (nobody)"),
        # our own directory, but everyone may write in it (no sticky bit)
        (lambda b: (os.mkdir(b / "d"), os.chmod(b / "d", 0o777)), "/d ", "uid 0 (root)"),
        # sticky is no better for the socket's own directory: /tmp itself is refused
        (lambda b: (os.mkdir(b / "d"), os.chmod(b / "d", 0o1777)), "/d ", "uid 0 (root)"),
        # a parent another user owns: they can rename our directory away and put theirs in its place
        (
            lambda b: (os.mkdir(b / "p"), os.chown(b / "p", NOBODY, NOBODY), os.mkdir(b / "p" / "d")),
            "/p ",
            "uid 65534 (nobody)",
        ),
        # a parent everyone may write without the sticky bit
        (lambda b: (os.mkdir(b / "p"), os.chmod(b / "p", 0o777), os.mkdir(b / "p" / "d")), "/p ", "uid 0 (root)"),
    ],
    ids=["nobody-owns-dir", "dir-0777", "dir-sticky", "nobody-owns-parent", "parent-0777"],
)
def test_unsafe_directories_are_refused_in_one_line_naming_directory_and_owner(
    base: Path, setup: Callable[[Path], object], named: str, owner: str
) -> None:
    setup(base)
    path = f"{base}/p/d/api.sock" if (base / "p").exists() else f"{base}/d/api.sock"
    with pytest.raises(SocketClaimError) as info:
        claim_socket(path, listener()[1], dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    message = str(info.value)
    assert "\n" not in message and f"{base}{named}" in message and owner in message
    assert not os.path.lexists(path)


def test_symlinks_on_the_way_count_for_where_they_lead(base: Path) -> None:
    # a trusted symlink between trusted directories (Debian's /var/run -> /run) is fine
    (base / "real").mkdir()
    (base / "run").symlink_to(base / "real")
    sock, bind = listener()
    claimed = claim_socket(f"{base}/run/d/api.sock", bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    try:
        assert stat.S_ISSOCK(os.lstat(base / "real" / "d" / "api.sock").st_mode)
    finally:
        claimed.release()
        sock.close()
    # the socket directory itself a symlink (root's own) into nobody's directory
    (base / "theirs").mkdir()
    os.chown(base / "theirs", NOBODY, NOBODY)
    (base / "sock-dir").symlink_to(base / "theirs")
    link_into_theirs = r"is a symbolic link \(owned by uid 0 \(root\)\) to .*/theirs \(owned by uid 65534 \(nobody\)\)"
    with pytest.raises(SocketClaimError, match=link_into_theirs):
        claim_socket(f"{base}/sock-dir/api.sock", bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    # a symlinked parent leading into nobody's directory: the resolved path is checked too
    (base / "theirs" / "d").mkdir()
    (base / "via").symlink_to(base / "theirs")
    with pytest.raises(SocketClaimError, match=r"its parent .*/theirs is owned by uid 65534 \(nobody\)"):
        claim_socket(f"{base}/via/d/api.sock", bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    # a symlink another user planted in the sticky directory is refused for its owner alone
    os.symlink(base / "real", base / "planted")
    os.chown(base / "planted", NOBODY, NOBODY, follow_symlinks=False)
    with pytest.raises(SocketClaimError, match=r"its parent .*/planted is owned by uid 65534 \(nobody\)"):
        claim_socket(f"{base}/planted/d/api.sock", bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=PUBLIC_SOCKET_MODE)
    assert os.listdir(base / "theirs" / "d") == []
