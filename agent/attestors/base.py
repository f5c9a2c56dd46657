"""The workload attestor interface and the pipeline that runs attestors for one caller.

An attestor turns kernel facts about a caller into selectors (``type:value`` strings such as
``unix:uid:1000``). New attestors (kubelet, Docker API, ...) only implement :class:`WorkloadAttestor`.
Nothing the client sends is ever an input: the pipeline starts from the socket's peer credentials.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tessera.agent.attestors.procfs import parse_stat_start_time
from tessera.agent.errors import AttestationError


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """SO_PEERCRED of a Unix socket connection, as the kernel recorded them at connect()."""

    pid: int
    uid: int
    gid: int


@dataclass(frozen=True, slots=True)
class ProcessInfo:
    """The caller as the attestors see it: peer credentials plus the process start time."""

    pid: int
    uid: int
    gid: int
    start_time: int  # clock ticks since boot (field 22 of /proc/<pid>/stat)


class WorkloadAttestor(Protocol):
    name: str

    async def attest(self, process: ProcessInfo) -> Sequence[str]:
        """Selectors (``type:value``) for the process; may raise AttestationError."""
        ...


def read_start_time(pid: int, proc_root: str = "/proc") -> int:
    try:
        return parse_stat_start_time((Path(proc_root) / str(pid) / "stat").read_text())
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise AttestationError(f"process {pid} has exited") from exc
    except (OSError, ValueError) as exc:
        raise AttestationError(f"cannot read /proc/{pid}/stat: {exc}") from exc


def process_for(creds: PeerCredentials, proc_root: str = "/proc") -> ProcessInfo:
    """Called right after accept(): pins the process start time so a reused PID is noticed later."""
    if creds.pid <= 0:
        raise AttestationError("peer credentials carry no pid (peer in another PID namespace?)")
    return ProcessInfo(creds.pid, creds.uid, creds.gid, read_start_time(creds.pid, proc_root))


async def attest(
    process: ProcessInfo, attestors: Sequence[WorkloadAttestor], proc_root: str = "/proc"
) -> frozenset[str]:
    """Runs every attestor; the PID must belong to the same process before and after (start time)."""
    if read_start_time(process.pid, proc_root) != process.start_time:
        raise AttestationError(f"process {process.pid} is not the process that connected (PID reused)")
    selectors: set[str] = set()
    for attestor in attestors:
        selectors.update(await attestor.attest(process))
    if read_start_time(process.pid, proc_root) != process.start_time:
        raise AttestationError(f"process {process.pid} changed during attestation (PID reused)")
    return frozenset(selectors)
