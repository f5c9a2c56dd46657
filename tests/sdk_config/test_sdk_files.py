from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tessera.sdk.errors import UnsafeDirectoryError
from tessera.sdk.files import ensure_owned_dir, ensure_private_dir, write_atomic, write_private_file


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_write_atomic_sets_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        write_atomic(tmp_path / "cert.pem", b"one", 0o644)
    finally:
        os.umask(old)
    assert mode(tmp_path / "cert.pem") == 0o644
    os.umask(0)
    try:
        write_private_file(tmp_path / "key.pem", b"secret")
    finally:
        os.umask(old)
    assert mode(tmp_path / "key.pem") == 0o600


def test_replacement_is_whole_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    target = tmp_path / "svid.pem"
    write_atomic(target, b"old")
    inode = os.stat(target).st_ino
    write_atomic(target, b"new" * 1000)
    assert target.read_bytes() == b"new" * 1000
    assert os.stat(target).st_ino != inode  # renamed into place, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svid.pem"]


def test_a_symlink_target_is_replaced_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    link = tmp_path / "key.pem"
    link.symlink_to(victim)
    write_private_file(link, b"secret")
    assert victim.read_bytes() == b"keep"
    assert not link.is_symlink() and link.read_bytes() == b"secret"


def test_failed_write_leaves_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f"
    write_atomic(target, b"old")
    with pytest.raises(TypeError):
        write_atomic(target, "not bytes")  # type: ignore[arg-type]
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]


def test_private_dir_is_tightened_and_symlinks_refused(tmp_path: Path) -> None:
    loose = tmp_path / "keys"
    loose.mkdir(mode=0o755)
    os.chmod(loose, 0o755)
    ensure_private_dir(loose)
    assert mode(loose) == 0o700
    (tmp_path / "link").symlink_to(loose)
    with pytest.raises(UnsafeDirectoryError, match="is a symbolic link"):
        ensure_private_dir(tmp_path / "link")


def test_owned_dir_is_made_with_its_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        ensure_owned_dir(tmp_path / "a" / "keys")
        ensure_owned_dir(tmp_path / "certs", 0o755)
    finally:
        os.umask(old)
    assert mode(tmp_path / "a" / "keys") == 0o700
    assert mode(tmp_path / "a") == 0o755  # a missing parent: mkdir -p, never wider than 0755
    assert mode(tmp_path / "certs") == 0o755
    os.umask(0o777)
    try:
        ensure_owned_dir(tmp_path / "tight")
    finally:
        os.umask(old)
    assert mode(tmp_path / "tight") == 0o700


def test_an_existing_owned_dir_keeps_its_mode_and_an_unsafe_one_is_refused(tmp_path: Path) -> None:
    mine = tmp_path / "mine"
    mine.mkdir()
    os.chmod(mine, 0o750)
    ensure_owned_dir(mine)
    assert mode(mine) == 0o750
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    os.chown(theirs, 65534, 65534)
    with pytest.raises(UnsafeDirectoryError, match=r"owned by uid 65534 \(nobody\), not by you \(uid 0\)"):
        ensure_owned_dir(theirs)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o1777)
    with pytest.raises(UnsafeDirectoryError, match=r"writable by other users \(mode 1777\)"):
        ensure_owned_dir(open_dir)
    (tmp_path / "link").symlink_to(mine)
    with pytest.raises(UnsafeDirectoryError, match="is a symbolic link"):
        ensure_owned_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(UnsafeDirectoryError, match="is not a directory"):
        ensure_owned_dir(tmp_path / "file")
