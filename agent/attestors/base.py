"""The workload attestor interface and the pipeline that runs attestors for one caller.

An attestor turns kernel facts about a caller into selectors (``type:value`` strings such as
``unix:uid:1000``). New attestors (kubelet, Docker API, ...) only implement :class:`WorkloadAttestor`.
Nothing the client sends is ever an input: the pipeline starts from the facts captured when the connection
was accepted (:mod:`tessera.agent.attestors.process`), and refuses a caller that is no longer that process.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from tessera.agent.attestors.process import (
    ExeIdentity,
    PeerCredentials,
    ProcessInfo,
    check_unchanged,
    process_for,
    read_start_time,
)


class WorkloadAttestor(Protocol):
    name: str

    async def attest(self, process: ProcessInfo) -> Sequence[str]:
        """Selectors (``type:value``) for the process; may raise WorkloadAttestationError (CallerRefused)."""
        ...


async def attest(
    process: ProcessInfo,
    attestors: Sequence[WorkloadAttestor],
    proc_root: str = "/proc",
    *,
    verify: Callable[[ProcessInfo], Awaitable[None]] | None = None,
) -> frozenset[str]:
    """Runs every attestor over the captured facts; the pid must still run what was captured, before and after
    (not exited or reused, not exec'd, not moved to another cgroup), else CallerRefused. ``verify`` may refuse
    the caller too, before any attestor runs (the endpoint's: whether another process holds the connection)."""
    check_unchanged(process, proc_root)
    if verify is not None:
        await verify(process)
    selectors: set[str] = set()
    for attestor in attestors:
        selectors.update(await attestor.attest(process))
    check_unchanged(process, proc_root)
    return frozenset(selectors)


__all__ = [
    "ExeIdentity",
    "PeerCredentials",
    "ProcessInfo",
    "WorkloadAttestor",
    "attest",
    "check_unchanged",
    "process_for",
    "read_start_time",
]
