"""Careful file writes for identity material, shared by the agent, the server and tessera-helper.

A reader (nginx reloading, a restarting daemon) must see either the old file or the new one, never half of
one, and key bytes must never sit on disk with a wider mode than intended, not even for the instant between
create and chmod. So: a temporary file in the same directory, created exclusively (a planted file or symlink
at that name is refused, not followed) with its final mode set by ``fchmod`` (the umask cannot loosen or
tighten it), flushed to disk, renamed over the target, and the rename made durable.
"""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import secrets
import stat
from pathlib import Path

from tessera.sdk.errors import UnsafeDirectoryError

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def write_atomic(path: str | os.PathLike[str], data: bytes, mode: int = 0o644) -> None:
    """Replaces ``path`` with ``data`` atomically, the file having exactly ``mode``."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, mode & 0o600)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def write_private_file(path: str | os.PathLike[str], data: bytes) -> None:
    """:func:`write_atomic` with mode 0600: for private keys and anything derived from them."""
    write_atomic(path, data, PRIVATE_FILE_MODE)


def ensure_private_dir(path: str | os.PathLike[str]) -> None:
    """:func:`ensure_owned_dir` for a daemon's data and key directories: made 0700 when missing; an existing one
    must be the daemon's own and writable by nobody else, and loses any group or other access (through its
    descriptor, never a chmod by path)."""
    ensure_owned_dir(path, PRIVATE_DIR_MODE, tighten=True)


def describe_uid(uid: int) -> str:
    """``uid 65534 (nobody)``: the number the kernel checks and the name an operator recognises."""
    try:
        return f"uid {uid} ({pwd.getpwuid(uid).pw_name})"
    except KeyError:
        return f"uid {uid}"


def ensure_owned_dir(path: str | os.PathLike[str], mode: int = PRIVATE_DIR_MODE, *, tighten: bool = False) -> None:
    """Makes ``path`` with exactly ``mode`` when it is missing, or checks that the directory there is the
    caller's own and that nobody else can write in it, before key files go into it.

    The new directory's mode is set through its descriptor (``fchmod``), so a permissive umask (000) cannot
    loosen it, and no chmod by path can follow a planted link. Missing parents are made like ``mkdir -p``
    (0755 at most). An existing directory keeps its mode (the operator chose it) unless ``tighten`` asks for
    access beyond ``mode`` to be taken away; a symlink, another user's
    directory, or one that group or others may write is refused with UnsafeDirectoryError, one line naming
    the directory and its owner.
    """
    directory = os.path.abspath(path)
    os.makedirs(os.path.dirname(directory), mode=0o755, exist_ok=True)
    created = False
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, PRIVATE_DIR_MODE)  # the umask can only narrow it; fchmod below sets it exactly
        created = True
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        st = os.lstat(directory)
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UnsafeDirectoryError(
            f"{directory} is {kind} (owned by {describe_uid(st.st_uid)}); give a real directory of your own"
        ) from None
    try:
        st = os.fstat(fd)
        euid = os.geteuid()
        if st.st_uid != euid:
            raise UnsafeDirectoryError(
                f"{directory} is owned by {describe_uid(st.st_uid)}, not by you (uid {euid}); remove it or "
                "choose another directory"
            )
        if created:
            os.fchmod(fd, mode)
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeDirectoryError(
                f"{directory} (owned by {describe_uid(st.st_uid)}) is writable by other users "
                f"(mode {stat.S_IMODE(st.st_mode):04o}); make it writable by you only or choose another directory"
            )
        elif tighten and stat.S_IMODE(st.st_mode) & ~mode:
            os.fchmod(fd, stat.S_IMODE(st.st_mode) & mode)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Makes a rename or unlink in ``path`` durable (a power cut cannot bring back an old key or journal)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
