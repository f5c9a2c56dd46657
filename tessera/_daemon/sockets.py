"""Claiming a Unix socket path so that no other local user can squat it, swap it or turn it against root.

Three facts shape this module (issue 12; ARCHITECTURE.md, "The trust boundary"):

* A socket is only as trustworthy as the directory it sits in: whoever can write there can put their own
  socket at the name (a fake Workload API handing out their SVIDs, a listener collecting admin requests). So
  the socket's directory must be a real directory owned by the daemon and writable by nobody else, and every
  directory above it must be owned by root or the daemon and not writable by others, unless it is sticky (then
  others cannot rename or delete what the daemon made in it: ``/tmp`` is fine *above* the socket directory).
  A directory the daemon needs and does not find, it makes itself (never "exist_ok" into someone else's).
* ``chmod(path)`` after ``bind()`` follows whatever the path names by then: with a writable directory an
  attacker swaps in a symlink and root makes any file world-writable. So the socket is bound inside a fresh
  staging directory the daemon just made (nobody else can enter it), given its mode there by a no-follow
  ``fchmodat`` relative to that directory's descriptor, and renamed onto its final name, which is atomic and
  replaces a stale socket. No path-based chmod or chown is ever made.
* On stop the name is removed only if it still holds the socket this claim created (same device and inode).

Every refusal is a :class:`SocketClaimError` whose message is one line naming the directory and its owner.
The checks on facts (``*_problem`` functions) are pure; the walk that gathers them works on directory
descriptors opened with ``O_NOFOLLOW`` one component at a time, so what is checked is what is used.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
from collections.abc import Callable

from tessera._daemon.errors import SocketClaimError
from tessera.sdk.files import describe_uid

log = logging.getLogger(__name__)

MAX_PATH_BYTES = 107
"""The longest path ``bind``/``connect`` accept for a Unix socket on Linux (``sun_path`` is 108 with its NUL)."""

PUBLIC_DIR_MODE = 0o755
"""The Workload API's directory: every local user must reach the socket (who they are is decided per call)."""
PUBLIC_SOCKET_MODE = 0o777
PRIVATE_DIR_MODE = 0o700
"""The admin API's directory: only the server's own user (and root) may talk to it."""
PRIVATE_SOCKET_MODE = 0o600
PARENT_DIR_MODE = 0o755
"""Missing directories above the socket's directory are made like ``mkdir -p`` would, owned by the daemon."""

_STAGED_NAME = "s"
_STAGING_TOKEN_BYTES = 4  # 8 hex characters
STAGING_OVERHEAD = len("/." + "x" * 2 * _STAGING_TOKEN_BYTES + "/" + _STAGED_NAME)
"""Bytes the staging path ``<socket dir>/.XXXXXXXX/s`` adds to the socket's directory."""

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# ---------------------------------------------------------------------------------------------- pure checks


def path_length_problem(path: str) -> str | None:
    """Why ``path`` cannot be bound as a Unix socket (itself or its staging path too long), or None."""
    absolute = os.path.abspath(path)
    size = len(absolute.encode())
    if size > MAX_PATH_BYTES:
        return f"path {absolute} is {size} bytes, longer than the {MAX_PATH_BYTES} a Unix socket allows"
    staging = len(os.path.dirname(absolute).encode()) + STAGING_OVERHEAD
    if staging > MAX_PATH_BYTES:
        return (
            f"path {absolute}: the socket is first bound at {os.path.dirname(absolute)}/.XXXXXXXX/s, "
            f"{staging} bytes, longer than the {MAX_PATH_BYTES} a Unix socket allows; use a shorter directory"
        )
    return None


def _writable_by_others(mode: int) -> bool:
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH))


def socket_dir_problem(directory: str, st_mode: int, st_uid: int, euid: int) -> str | None:
    """The refusal for a socket directory with these (l)stat facts, or None when the daemon may serve in it.

    It must be a real directory (not a symlink) owned by the daemon's euid and writable by nobody else: a
    sticky bit does not help here, since others could still create the socket's name before the daemon does.
    """
    owner = describe_uid(st_uid)
    if stat.S_ISLNK(st_mode):
        return (
            f"socket directory {directory} is a symbolic link (owned by {owner}); give --socket a path in a real "
            f"directory owned by this daemon (uid {euid})"
        )
    if not stat.S_ISDIR(st_mode):
        return (
            f"socket directory {directory} (owned by {owner}) is not a directory; remove it or choose another --socket"
        )
    if st_uid != euid:
        return (
            f"socket directory {directory} is owned by {owner}, not by this daemon (uid {euid}); "
            "remove it or choose another --socket"
        )
    if _writable_by_others(st_mode):
        return (
            f"socket directory {directory} (owned by {owner}) is writable by other users "
            f"(mode {stat.S_IMODE(st_mode):04o}); make it writable by its owner only or choose another --socket"
        )
    return None


def ancestor_problem(directory: str, ancestor: str, st_mode: int, st_uid: int, euid: int) -> str | None:
    """The refusal for a directory (or symlink) above the socket's directory, or None when it is safe.

    Owned by root or the daemon; a directory must not be writable by others unless it is sticky (``/tmp``).
    A symlink is judged by its owner here; the directory holding it was judged one step earlier, and where it
    leads is judged on the resolved path.
    """
    owner = describe_uid(st_uid)
    hint = f"choose a --socket whose parent directories only root or uid {euid} can change"
    if st_uid not in (0, euid):
        return (
            f"socket directory {directory} is unsafe: its parent {ancestor} is owned by {owner}, not by root or "
            f"this daemon (uid {euid}); {hint}"
        )
    if stat.S_ISLNK(st_mode):
        return None
    if not stat.S_ISDIR(st_mode):
        return f"socket directory {directory} is unsafe: its parent {ancestor} (owned by {owner}) is not a directory"
    if _writable_by_others(st_mode) and not st_mode & stat.S_ISVTX:
        return (
            f"socket directory {directory} is unsafe: its parent {ancestor} (owned by {owner}) is writable by "
            f"other users without the sticky bit (mode {stat.S_IMODE(st_mode):04o}); {hint}"
        )
    return None


def socket_owner_problem(path: str, st_mode: int, st_uid: int, euid: int) -> str | None:
    """For a client about to send secrets: the socket must be a socket (lstat: not a link to one) and owned by
    root or by the caller itself, or whoever owns it is not the daemon the caller means to talk to."""
    if not stat.S_ISSOCK(st_mode):
        return f"{path} is not a socket (owned by {describe_uid(st_uid)}); refusing to send anything to it"
    if st_uid not in (0, euid):
        return (
            f"{path} is owned by {describe_uid(st_uid)}, not by root or you (uid {euid}); refusing to send "
            "anything to it (run the command as the server's user, or check who created that socket)"
        )
    return None


# ------------------------------------------------------------------------------------------ directory walk


def _prefixes(directory: str) -> list[str]:
    """``/a/b`` -> ``["/", "/a", "/a/b"]``."""
    parts = [p for p in directory.split("/") if p]
    return ["/"] + ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _check_written_path(directory: str, euid: int) -> None:
    """The path as the operator wrote it, symlinks and all (lstat): each parent that exists, and the socket
    directory itself when it exists (it must not be a symlink, wherever it points)."""
    *parents, _ = _prefixes(directory)
    for ancestor in parents:
        try:
            st = os.lstat(ancestor)
        except FileNotFoundError:
            return  # the rest is created below, by the daemon
        except OSError as exc:
            raise SocketClaimError(f"socket directory {directory}: cannot inspect {ancestor}: {exc.strerror}") from None
        problem = ancestor_problem(directory, ancestor, st.st_mode, st.st_uid, euid)
        if problem:
            raise SocketClaimError(problem)
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SocketClaimError(f"socket directory {directory}: cannot inspect it: {exc.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        target = os.path.realpath(directory)
        try:
            where = f"{target} (owned by {describe_uid(os.stat(directory).st_uid)})"
        except OSError:
            where = f"{target} (which does not exist)"
        raise SocketClaimError(
            f"socket directory {directory} is a symbolic link (owned by {describe_uid(st.st_uid)}) to {where}; "
            f"give --socket a path in a real directory owned by this daemon (uid {euid})"
        )


def _open_child(parent_fd: int, name: str, path: str, directory: str, mode: int, euid: int) -> int:
    """Opens ``name`` under ``parent_fd`` without following a link, making it first (``mode``, owned by this
    daemon) when it does not exist; whoever made it, the caller judges what it opened."""
    created = False
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise _not_a_directory(exc, parent_fd, name, path, directory) from None
    try:
        os.mkdir(name, mode, dir_fd=parent_fd)  # the umask can only narrow it; fchmod below sets it exactly
        created = True
    except FileExistsError:
        pass  # someone made it meanwhile: it is judged below like any directory that was already there
    except OSError as exc:
        raise SocketClaimError(f"socket directory {directory}: cannot create {path}: {exc.strerror}") from None
    try:
        fd = os.open(name, _DIR_FLAGS, dir_fd=parent_fd)
    except OSError as exc:
        raise _not_a_directory(exc, parent_fd, name, path, directory) from None
    if created:
        st = os.fstat(fd)
        if st.st_uid != euid:  # cannot happen for a directory this process just made; never trust that
            os.close(fd)
            raise SocketClaimError(f"socket directory {directory}: {path} changed hands while being created")
        os.fchmod(fd, mode)
        log.info("created %s (mode %04o)", path, mode)
    return fd


def _not_a_directory(exc: OSError, parent_fd: int, name: str, path: str, directory: str) -> SocketClaimError:
    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
        try:
            st = os.stat(name, dir_fd=parent_fd, follow_symlinks=False)
        except OSError:
            return SocketClaimError(f"socket directory {directory}: {path} is not a directory")
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        return SocketClaimError(
            f"socket directory {directory}: {path} is {kind} (owned by {describe_uid(st.st_uid)}); "
            "choose another --socket"
        )
    return SocketClaimError(f"socket directory {directory}: cannot open {path}: {exc.strerror}")


def open_socket_dir(directory: str, dir_mode: int, euid: int | None = None) -> int:
    """A descriptor on the socket's directory, made (``dir_mode``) with any missing parents if needed, after
    checking the path as written and the resolved path component by component. Raises SocketClaimError."""
    euid = os.geteuid() if euid is None else euid
    directory = os.path.normpath(os.path.abspath(directory))
    _check_written_path(directory, euid)
    resolved = os.path.realpath(directory)
    chain = _prefixes(resolved)
    fd = os.open("/", _DIR_FLAGS)
    try:
        for index, path in enumerate(chain):
            last = index == len(chain) - 1
            if index > 0:
                mode = dir_mode if last else PARENT_DIR_MODE
                child = _open_child(fd, os.path.basename(path), path, directory, mode, euid)
                os.close(fd)
                fd = child
            st = os.fstat(fd)
            if last:
                problem = socket_dir_problem(directory, st.st_mode, st.st_uid, euid)
            else:
                problem = ancestor_problem(directory, path, st.st_mode, st.st_uid, euid)
            if problem:
                raise SocketClaimError(problem)
        return fd
    except BaseException:
        os.close(fd)
        raise


# ------------------------------------------------------------------------------------------------ the claim


class ClaimedSocket:
    """A socket this daemon created at ``path``; :meth:`release` removes it if the name still holds it."""

    def __init__(self, path: str, dir_fd: int, name: str, identity: tuple[int, int]) -> None:
        self.path = path
        self._dir_fd = dir_fd
        self._name = name
        self._identity = identity

    def release(self) -> None:
        """Removes the socket unless another one took its name since (never following a link); idempotent."""
        if self._dir_fd < 0:
            return
        try:
            st = os.stat(self._name, dir_fd=self._dir_fd, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self._name, dir_fd=self._dir_fd)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove socket %s: %s", self.path, exc.strerror)
        finally:
            os.close(self._dir_fd)
            self._dir_fd = -1


class PendingSocket:
    """A socket path being claimed: bind at :attr:`bind_path` (in a private staging directory), then
    :meth:`commit`; :meth:`abort` if binding failed. :func:`claim_socket` does all three."""

    def __init__(
        self, path: str, dir_fd: int, name: str, staging: tuple[str, int], bind_path: str, socket_mode: int
    ) -> None:
        self.path = path
        self.bind_path = bind_path
        self._dir_fd = dir_fd
        self._name = name
        self._staging, self._staging_fd = staging
        self._mode = socket_mode

    def commit(self) -> ClaimedSocket:
        """Gives the bound socket its mode where nobody else can reach it, then renames it into place."""
        try:
            st = os.stat(_STAGED_NAME, dir_fd=self._staging_fd, follow_symlinks=False)
        except FileNotFoundError:
            raise SocketClaimError(f"socket {self.path}: nothing was bound at {self.bind_path}") from None
        if not stat.S_ISSOCK(st.st_mode):
            raise SocketClaimError(f"socket {self.path}: {self.bind_path} is not a socket")
        try:
            # fchmodat(AT_SYMLINK_NOFOLLOW) relative to the staging directory's descriptor: a name in a
            # directory only this process can write, and never a link followed. Not a chmod by path.
            os.chmod(_STAGED_NAME, self._mode, dir_fd=self._staging_fd, follow_symlinks=False)
        except (OSError, NotImplementedError) as exc:
            raise SocketClaimError(f"socket {self.path}: cannot set its mode: {exc}") from None
        st = os.stat(_STAGED_NAME, dir_fd=self._staging_fd, follow_symlinks=False)
        identity = (st.st_dev, st.st_ino)
        os.rename(_STAGED_NAME, self._name, src_dir_fd=self._staging_fd, dst_dir_fd=self._dir_fd)
        self._remove_staging()
        claimed = ClaimedSocket(self.path, self._dir_fd, self._name, identity)
        self._dir_fd = -1  # now the claimed socket's
        return claimed

    def _remove_staging(self) -> None:
        if self._staging_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(_STAGED_NAME, dir_fd=self._staging_fd)
            os.close(self._staging_fd)
            self._staging_fd = -1
        if self._staging and self._dir_fd >= 0:
            with contextlib.suppress(FileNotFoundError):
                os.rmdir(self._staging, dir_fd=self._dir_fd)
            self._staging = ""

    def abort(self) -> None:
        """Removes the staging directory (and whatever was bound in it); the final name is left alone."""
        with contextlib.suppress(OSError):
            self._remove_staging()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1


def _refuse_taken(dir_fd: int, name: str, path: str) -> None:
    """A non-socket at the name, or a socket some live process answers on, is not ours to replace. A socket
    nobody answers on is stale: the rename in :meth:`PendingSocket.commit` replaces it atomically."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketClaimError(f"{path} exists and is not a socket; remove it or choose another --socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(path)  # the directory is ours (checked above): the name cannot be swapped under us
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            log.info("replacing stale socket %s", path)
            return
        raise SocketClaimError(f"cannot check whether {path} is in use: {exc.strerror or exc}") from None
    finally:
        probe.close()
    raise SocketClaimError(
        f"socket {path} is in use: another process is listening on it; stop it or choose another --socket"
    )


def _make_staging_dir(dir_fd: int, path: str) -> tuple[str, int]:
    """A fresh ``.XXXXXXXX`` directory (0700, ours) inside the socket's directory, and a descriptor on it."""
    for _ in range(16):
        name = "." + secrets.token_hex(_STAGING_TOKEN_BYTES)
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise SocketClaimError(f"socket {path}: cannot create a staging directory: {exc.strerror}") from None
        fd = os.open(name, _DIR_FLAGS, dir_fd=dir_fd)
        os.fchmod(fd, 0o700)  # the umask may have narrowed it past what binding needs
        return name, fd
    raise SocketClaimError(f"socket {path}: no free staging directory name after 16 tries")


def begin_claim(path: str, *, dir_mode: int, socket_mode: int) -> PendingSocket:
    """Checks and prepares ``path`` (its directories made or verified, nothing live at the name) and returns
    where to bind. Raises SocketClaimError with the one line to show the operator."""
    path = os.path.normpath(os.path.abspath(path))
    problem = path_length_problem(path)
    if problem:
        raise SocketClaimError(problem)
    directory, name = os.path.split(path)
    dir_fd = open_socket_dir(directory, dir_mode)
    try:
        _refuse_taken(dir_fd, name, path)
        staging = _make_staging_dir(dir_fd, path)
    except BaseException:
        os.close(dir_fd)
        raise
    bind_path = f"{os.path.realpath(directory).rstrip('/')}/{staging[0]}/{_STAGED_NAME}"
    pending = PendingSocket(path, dir_fd, name, staging, bind_path, socket_mode)
    if len(bind_path.encode()) > MAX_PATH_BYTES:  # the resolved directory can be longer than the one written
        pending.abort()
        raise SocketClaimError(f"socket {path}: its staging path {bind_path} is longer than {MAX_PATH_BYTES} bytes")
    return pending


def claim_socket(path: str, bind: Callable[[str], object], *, dir_mode: int, socket_mode: int) -> ClaimedSocket:
    """Claims ``path``: ``bind(staging_path)`` binds the listening socket (the agent's own ``socket.bind``,
    gRPC's ``add_insecure_port``), which then gets ``socket_mode`` and its final name."""
    pending = begin_claim(path, dir_mode=dir_mode, socket_mode=socket_mode)
    try:
        bind(pending.bind_path)
        return pending.commit()
    except BaseException:
        pending.abort()
        raise
