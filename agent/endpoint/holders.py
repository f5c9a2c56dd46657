"""Refuses a Workload API connection whose client end is held by any process but the one that connected.

- Capturing the caller's facts at accept is not enough: a process can connect, fork (or pass the socket over
  SCM_RIGHTS), and exec a binary an entry selects *before* the agent accepts, so that the facts describe the
  binary while another process speaks on the connection. The agent therefore looks for the client end's
  socket inode (``socket:[N]``, found through sock_diag) among the descriptors in /proc/<pid>/fd: the
  connecting process must hold it, and no other process may.
- Processes running entirely as root or as the agent's own uid are trusted (ARCHITECTURE: the trust
  boundary) and not scanned; every other process is, whatever its uid: an attacker with two uids could
  otherwise hand the socket to the second one. A process's uids come from /proc/<pid>/status, never from the
  owner of /proc/<pid> (a non-dumpable process's directory belongs to root).
- The scan is only worth its cost when some entry selects by executable (``unix:path`` / ``unix:sha256``);
  the guard asks before each use, and skips callers whose executable the agent could not see (they get no
  such selector). It runs at accept and again at every call (a descriptor can be received after accept), in
  a worker thread, at most ``per_uid`` at a time per caller uid. Only an agent running as root can read
  every process's descriptors; one that cannot read another process's ``fd`` directory does not see it.

What it cannot see: a descriptor in flight inside an SCM_RIGHTS message (held by no process until received),
and a same-uid process that copies the descriptor with pidfd_getfd or ptrace at the right moment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tessera.agent.attestors.process import ProcessInfo
from tessera.agent.attestors.procfs import parse_status
from tessera.agent.endpoint.sockdiag import peer_inode
from tessera.agent.errors import CallerRefused
from tessera.agent.limits import KeyedGate

log = logging.getLogger(__name__)

DEFAULT_SCANS_PER_UID = 2
NOT_HELD = "the process that connected no longer holds the connection"
CLOSED = "the client end of the connection is closed"
SHARED_PREFIX = "the connection is also held by process"


def shared_message(pid: int, uid: int) -> str:
    return (
        f"{SHARED_PREFIX} {pid} (uid {uid}), not only by the process that connected: "
        "a Workload API connection must be opened and used by the workload itself"
    )


@dataclass(frozen=True, slots=True)
class Holder:
    pid: int
    uid: int  # real uid


def _holds(fd_dir: str, link: str) -> bool:
    try:
        with os.scandir(fd_dir) as entries:
            for entry in entries:
                try:
                    if os.readlink(entry.path) == link:
                        return True
                except OSError:
                    continue  # closed while we looked
    except OSError:
        return False
    return False


def _uids(proc_root: str, pid: str) -> tuple[int, ...] | None:
    try:
        with open(f"{proc_root}/{pid}/status") as f:
            return parse_status(f.read()).uids
    except (OSError, ValueError):
        return None  # exited


def find_other_holder(
    inode: int, proc_root: str, *, skip_pids: Iterable[int], trusted_uids: frozenset[int]
) -> Holder | None:
    """The first process (other than ``skip_pids`` and fully trusted ones) holding socket ``inode``."""
    link = f"socket:[{inode}]"
    skip = {str(pid) for pid in skip_pids}
    try:
        names = os.listdir(proc_root)
    except OSError:
        return None
    for name in names:
        if not name.isdigit() or name in skip:
            continue
        uids = _uids(proc_root, name)
        if uids is None or all(uid in trusted_uids for uid in uids):
            continue
        if _holds(f"{proc_root}/{name}/fd", link):
            return Holder(int(name), uids[0])
    return None


def connection_verdict(
    process: ProcessInfo, proc_root: str = "/proc", *, trusted_uids: frozenset[int], self_pid: int
) -> str | None:
    """Why the connection is refused (None: only the connecting process holds its client end). Blocking I/O."""
    peer = peer_inode(process.socket_inode)
    if peer is None:
        return CLOSED
    if not _holds(f"{proc_root}/{process.pid}/fd", f"socket:[{peer}]"):
        return NOT_HELD
    other = find_other_holder(peer, proc_root, skip_pids=(process.pid, self_pid), trusted_uids=trusted_uids)
    return None if other is None else shared_message(other.pid, other.uid)


class ConnectionGuard:
    """Runs :func:`connection_verdict` at accept and at each call while ``enabled()`` (an entry selects by
    executable); raises CallerRefused with the reason."""

    def __init__(
        self,
        proc_root: str = "/proc",
        enabled: Callable[[], bool] | None = None,
        *,
        per_uid: int = DEFAULT_SCANS_PER_UID,
        trusted_uids: Iterable[int] | None = None,
    ) -> None:
        self.proc_root = proc_root
        self._enabled = enabled or (lambda: True)
        self.gate = KeyedGate(per_uid)
        self.trusted_uids = frozenset(trusted_uids if trusted_uids is not None else {0, os.geteuid()})
        self._at_accept: dict[int, asyncio.Task[str | None]] = {}
        self._warned_at = float("-inf")
        self.scans = 0

    @property
    def enabled(self) -> bool:
        return self._enabled()

    def _applies(self, process: ProcessInfo) -> bool:
        # A caller whose executable the agent cannot see gets no unix:path / unix:sha256 selector to protect.
        return process.exe is not None and self._enabled()

    def accepted(self, process: ProcessInfo) -> None:
        """At accept: starts the first scan in the background (its verdict is awaited by the first call)."""
        if not process.socket_inode or not self._applies(process):
            return
        task = asyncio.get_running_loop().create_task(self._scan(process))
        self._at_accept[process.socket_inode] = task

    def closed(self, process: ProcessInfo) -> None:
        task = self._at_accept.pop(process.socket_inode, None)
        if task is not None and not task.done():
            task.cancel()

    async def verify(self, process: ProcessInfo) -> None:
        if not self._applies(process):
            return
        if not process.socket_inode:
            raise CallerRefused("the connection could not be identified; reconnect")
        at_accept = self._at_accept.get(process.socket_inode)
        if at_accept is not None:
            reason = await asyncio.shield(at_accept)
            if reason:
                raise CallerRefused(reason)
        reason = await self._scan(process)
        if reason:
            raise CallerRefused(reason)

    async def _scan(self, process: ProcessInfo) -> str | None:
        async with self.gate.slot(process.uid):
            self.scans += 1
            try:
                return await asyncio.to_thread(
                    connection_verdict,
                    process,
                    self.proc_root,
                    trusted_uids=self.trusted_uids,
                    self_pid=os.getpid(),
                )
            except (OSError, ValueError) as exc:
                # Fail closed: without the kernel's answer nobody can say who holds the connection.
                if time.monotonic() - self._warned_at >= 60.0:
                    self._warned_at = time.monotonic()
                    log.warning("cannot check who holds a Workload API connection (refusing it): %s", exc)
                return f"cannot check who holds the connection ({exc})"


__all__ = [
    "CLOSED",
    "NOT_HELD",
    "SHARED_PREFIX",
    "ConnectionGuard",
    "Holder",
    "connection_verdict",
    "find_other_holder",
    "shared_message",
]
