"""The process that connected: its facts, captured when the connection is accepted, and the check at each call
that the connection still speaks for that same process.

- Reading /proc at call time describes whatever the pid runs *then*. A process can connect, fork, and exec a
  binary an entry selects while its child, still holding the connection, asks for that binary's SVIDs. So the
  facts (uid and gid from SO_PEERCRED, start time, the executable's device and inode and its path, the cgroup,
  the supplementary groups) are taken once at accept and the attestors read those.
- A call is then refused when the connecting pid's start time (it exited; the pid was reused), executable
  (exec) or cgroup (moved) differ from what was captured: the process asking is no longer the one attested.
- SO_PEERCRED names a pid, and a pid can be reused between connect() and accept(). Where the kernel offers
  SO_PEERPIDFD (Linux 6.5+), the pidfd of the very process that connected is checked alive after the facts are
  read: had the pid been reused, the process it named would be gone.
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from tessera.agent.attestors.procfs import parse_stat_start_time, parse_stat_state, parse_status
from tessera.agent.errors import CallerRefused, WorkloadAttestationError

EXITED = "the process that connected has exited"
EXECED = "the process that connected has exec'd a different program since"
MOVED = "the process that connected has moved to another cgroup since"


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """SO_PEERCRED of a Unix socket connection, as the kernel recorded them at connect()."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class ExeIdentity:
    """The executable a process runs: the inode (what is running) and the path it was started from."""

    dev: int
    ino: int
    path: str  # "" when the file was deleted or replaced on disk since (the path no longer names what runs)


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """The caller as the attestors see it: peer credentials plus what /proc said about it at accept."""

    pid: int
    uid: int
    gid: int
    start_time: int  # clock ticks since boot (field 22 of /proc/<pid>/stat)
    exe: ExeIdentity | None = None  # None: not readable (the agent may not look, or a kernel thread)
    cgroup: str | None = None  # the text of /proc/<pid>/cgroup; None: not readable
    groups: tuple[int, ...] | None = None  # supplementary groups; None: not readable
    socket_inode: int = 0  # inode of the agent's end of the connection (its peer is the client's end)


def _read(path: str) -> bytes:
    """A whole /proc file, without the cost of text I/O (these run on every connection and call)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_start_time(pid: int, proc_root: str = "/proc") -> int:
    try:
        return parse_stat_start_time(_read(f"{proc_root}/{pid}/stat").decode(errors="replace"))
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise WorkloadAttestationError(f"process {pid} has exited") from exc
    except (OSError, ValueError) as exc:
        raise WorkloadAttestationError(f"cannot read /proc/{pid}/stat: {exc}") from exc


def _start_time(pid: int, proc_root: str) -> int:
    """The start time of a live process; CallerRefused when it has exited (a zombie or dead one counts)."""
    try:
        text = _read(f"{proc_root}/{pid}/stat").decode(errors="replace")
        state, start = parse_stat_state(text), parse_stat_start_time(text)
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise CallerRefused(EXITED) from exc
    except (OSError, ValueError) as exc:
        raise WorkloadAttestationError(f"cannot read /proc/{pid}/stat: {exc}") from exc
    if state in ("Z", "X", "x"):
        raise CallerRefused(EXITED)
    return start


def _exe_key(pid: int, proc_root: str) -> tuple[int, int] | None:
    """(device, inode) of what ``pid`` runs: stat follows /proc/<pid>/exe to the very inode executed."""
    try:
        st = os.stat(f"{proc_root}/{pid}/exe")
    except OSError:
        return None  # exited (the start-time check says so), a kernel thread, or not ours to look at
    return st.st_dev, st.st_ino


def read_exe(pid: int, proc_root: str = "/proc") -> ExeIdentity | None:
    """Device, inode and path of what ``pid`` runs."""
    key = _exe_key(pid, proc_root)
    if key is None:
        return None
    try:
        target = os.readlink(f"{proc_root}/{pid}/exe")
    except OSError:
        target = ""
    if target.endswith(" (deleted)"):
        target = ""
    return ExeIdentity(key[0], key[1], target)


def _read_optional(path: str) -> str | None:
    try:
        return _read(path).decode(errors="replace")
    except FileNotFoundError as exc:
        raise CallerRefused(EXITED) from exc
    except OSError:
        return None


def _check_alive(pidfd: int) -> None:
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except ProcessLookupError as exc:
        raise CallerRefused(EXITED) from exc
    except PermissionError:
        pass  # it exists (the kernel looks the process up before it checks permission)


def process_for(
    creds: PeerCredentials, proc_root: str = "/proc", *, pidfd: int | None = None, socket_inode: int = 0
) -> ProcessInfo:
    """Called right after accept(): captures the facts about the process that connected.

    The start time and executable are read before and after the rest. A process that exec'd while we looked
    is looked at again (an exec racing the capture is an exec before accept: the facts describe what it runs
    now, and another process holding the connection is what gives such a caller away); one that exited is
    refused.
    """
    if creds.pid <= 0:
        raise WorkloadAttestationError("peer credentials carry no pid (peer in another PID namespace?)")
    for _ in range(_CAPTURE_ATTEMPTS):
        process = _capture(creds, proc_root, socket_inode)
        if process is not None:
            if pidfd is not None:
                _check_alive(pidfd)
            return process
    raise CallerRefused(f"the process that connected kept exec'ing while it was being looked at ({creds.pid})")


_CAPTURE_ATTEMPTS = 3


def _capture(creds: PeerCredentials, proc_root: str, socket_inode: int) -> ProcessInfo | None:
    """One consistent look at the process, or None when it exec'd meanwhile."""
    proc = f"{proc_root}/{creds.pid}"
    start = _start_time(creds.pid, proc_root)
    exe = read_exe(creds.pid, proc_root)
    cgroup = _read_optional(f"{proc}/cgroup")
    status = _read_optional(f"{proc}/status")
    groups: tuple[int, ...] | None = None
    if status is not None:
        with contextlib.suppress(ValueError):
            groups = parse_status(status).groups
    if _start_time(creds.pid, proc_root) != start:
        raise CallerRefused(EXITED)
    if _exe_key(creds.pid, proc_root) != (None if exe is None else (exe.dev, exe.ino)):
        return None
    return ProcessInfo(
        creds.pid, creds.uid, creds.gid, start, exe=exe, cgroup=cgroup, groups=groups, socket_inode=socket_inode
    )


def check_unchanged(process: ProcessInfo, proc_root: str = "/proc") -> None:
    """Raises CallerRefused when the connecting pid no longer runs what was captured at accept.

    The path is not compared: a binary renamed or replaced on disk is still the program that runs. Callers
    check again after reading anything else about the process (the attestation pipeline does), so a pid
    reused in between is noticed.
    """
    start = _start_time(process.pid, proc_root)
    if start != process.start_time:
        raise CallerRefused(EXITED + " (its pid now belongs to another process)")
    captured = None if process.exe is None else (process.exe.dev, process.exe.ino)
    if _exe_key(process.pid, proc_root) != captured:
        if _start_time(process.pid, proc_root) != start:
            raise CallerRefused(EXITED)
        raise CallerRefused(EXECED)
    if process.cgroup is not None and _read_optional(f"{proc_root}/{process.pid}/cgroup") != process.cgroup:
        raise CallerRefused(MOVED)


__all__ = [
    "EXECED",
    "EXITED",
    "MOVED",
    "ExeIdentity",
    "PeerCredentials",
    "ProcessInfo",
    "check_unchanged",
    "process_for",
    "read_exe",
    "read_start_time",
]
