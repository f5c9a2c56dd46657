"""Workload attestors: kernel facts about a Workload API caller turned into selectors."""

from __future__ import annotations

from tessera.agent.attestors.base import (
    ExeIdentity,
    PeerCredentials,
    ProcessInfo,
    WorkloadAttestor,
    attest,
    check_unchanged,
    process_for,
    read_start_time,
)
from tessera.agent.attestors.cgroup import CgroupAttestor
from tessera.agent.attestors.digest import DEFAULT_MAX_HASH_BYTES, DigestCache, ExecutableHasher
from tessera.agent.attestors.unix import SelectorInUse, UnixAttestor


def default_attestors(
    proc_root: str = "/proc",
    *,
    selector_in_use: SelectorInUse | None = None,
    hasher: ExecutableHasher | None = None,
) -> list[WorkloadAttestor]:
    """The unix and cgroup attestors. ``selector_in_use`` (the agent passes its cache's) lets the unix
    attestor hash executables only while some entry selects by ``unix:sha256``; without it, always.
    ``hasher`` carries the bounds on hashing (default: :data:`DEFAULT_MAX_HASH_BYTES`)."""
    return [UnixAttestor(proc_root, hasher, selector_in_use=selector_in_use), CgroupAttestor(proc_root)]


__all__ = [
    "DEFAULT_MAX_HASH_BYTES",
    "CgroupAttestor",
    "DigestCache",
    "ExeIdentity",
    "ExecutableHasher",
    "PeerCredentials",
    "ProcessInfo",
    "SelectorInUse",
    "UnixAttestor",
    "WorkloadAttestor",
    "attest",
    "check_unchanged",
    "default_attestors",
    "process_for",
    "read_start_time",
]
