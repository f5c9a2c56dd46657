"""Selectors from the caller's cgroup: systemd unit, container id and Kubernetes pod UID.

The cgroup text is the one captured when the connection was accepted. Which paths prove anything is the pure
decision of :mod:`tessera.agent.attestors.cgroup_layout` (root-owned all the way, and the runtime's own
layout from the root); this module only supplies the I/O: the cgroup mounts of the agent's mount namespace
(from /proc/self/mountinfo, re-read at most every ``mounts_ttl`` seconds) and the owner of each directory on
the path, looked up only for paths whose layout names something.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Sequence

from tessera.agent.attestors.cgroup_layout import cgroup_selectors, hierarchy_dirs
from tessera.agent.attestors.process import ProcessInfo
from tessera.agent.attestors.procfs import CgroupLine, Mount, parse_cgroup, parse_mountinfo


def directory_owners(dirs: Sequence[str]) -> tuple[int, ...] | None:
    """The owner uid of each directory (never following a link); None when one is missing or not a directory."""
    owners = []
    for path in dirs:
        try:
            st = os.lstat(path)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        owners.append(st.st_uid)
    return tuple(owners)


class CgroupAttestor:
    """systemd unit, container id and pod UID, only from root-owned cgroups laid out by the runtime."""

    name = "cgroup"

    def __init__(
        self,
        proc_root: str = "/proc",
        *,
        mountinfo: str | None = None,
        mounts_ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._mountinfo = mountinfo or os.path.join(proc_root, "self", "mountinfo")
        self._ttl = mounts_ttl
        self._clock = clock
        self._mounts: list[Mount] = []
        self._mounts_read = float("-inf")

    def mounts(self) -> list[Mount]:
        now = self._clock()
        if now - self._mounts_read >= self._ttl:
            try:
                with open(self._mountinfo) as f:
                    text = f.read()
            except OSError:
                text = ""
            self._mounts = [m for m in parse_mountinfo(text) if m.fstype in ("cgroup", "cgroup2")]
            self._mounts_read = now
        return self._mounts

    def owners(self, line: CgroupLine) -> tuple[int, ...] | None:
        dirs = hierarchy_dirs(line, self.mounts())
        return None if dirs is None else directory_owners(dirs)

    async def attest(self, process: ProcessInfo) -> Sequence[str]:
        if not process.cgroup:
            return ()
        try:
            lines = parse_cgroup(process.cgroup)
        except ValueError:
            return ()
        return cgroup_selectors(lines, self.owners)


__all__ = ["CgroupAttestor", "directory_owners"]
