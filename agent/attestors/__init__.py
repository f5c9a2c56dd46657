"""Workload attestors: kernel facts about a Workload API caller turned into selectors."""

from __future__ import annotations

from tessera.agent.attestors.base import (
    PeerCredentials,
    ProcessInfo,
    WorkloadAttestor,
    attest,
    process_for,
    read_start_time,
)
from tessera.agent.attestors.cgroup import CgroupAttestor
from tessera.agent.attestors.unix import DigestCache, UnixAttestor


def default_attestors(proc_root: str = "/proc") -> list[WorkloadAttestor]:
    return [UnixAttestor(proc_root), CgroupAttestor(proc_root)]


__all__ = [
    "CgroupAttestor",
    "DigestCache",
    "PeerCredentials",
    "ProcessInfo",
    "UnixAttestor",
    "WorkloadAttestor",
    "attest",
    "default_attestors",
    "process_for",
    "read_start_time",
]
