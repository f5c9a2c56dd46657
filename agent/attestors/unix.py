"""``unix`` selectors: uid, gid, user, group, supplementary groups, executable path and digest.

Every input is a fact captured when the connection was accepted (:class:`ProcessInfo`): uid and gid from
SO_PEERCRED, groups, and the executable's inode and path. The digest is computed lazily (only when some entry
uses ``unix:sha256``) from that same inode, within the bounds of :mod:`tessera.agent.attestors.digest`.
"""

from __future__ import annotations

import grp
import pwd
import time
from collections.abc import Callable, Sequence

from tessera.agent.attestors.digest import DigestCache, ExecutableHasher
from tessera.agent.attestors.process import ProcessInfo

SelectorInUse = Callable[[str], bool]
"""``in_use("unix:sha256")``: whether some registration entry on this agent has a selector of that type."""


def _always(selector_type: str) -> bool:
    return True


class _NameCache:
    """uid/gid -> name, remembered for a minute: NSS lookups (LDAP, sssd) must not run on every call."""

    def __init__(self, lookup: Callable[[int], str], ttl: float = 60.0, max_entries: int = 4096) -> None:
        self._lookup = lookup
        self._ttl = ttl
        self._max = max_entries
        self._names: dict[int, tuple[str | None, float]] = {}

    def __call__(self, number: int) -> str | None:
        now = time.monotonic()
        hit = self._names.get(number)
        if hit is not None and hit[1] > now:
            return hit[0]
        try:
            name: str | None = self._lookup(number)
        except KeyError:
            name = None
        if len(self._names) >= self._max:
            self._names.clear()
        self._names[number] = (name, now + self._ttl)
        return name


_user_name = _NameCache(lambda uid: pwd.getpwuid(uid).pw_name)
_group_name = _NameCache(lambda gid: grp.getgrgid(gid).gr_name)


class UnixAttestor:
    name = "unix"

    def __init__(
        self,
        proc_root: str = "/proc",
        hasher: ExecutableHasher | None = None,
        *,
        selector_in_use: SelectorInUse | None = None,
    ) -> None:
        self._proc = proc_root
        self.hasher = hasher or ExecutableHasher()
        self._in_use = selector_in_use or _always

    @property
    def digests(self) -> DigestCache:
        return self.hasher.cache

    async def attest(self, process: ProcessInfo) -> Sequence[str]:
        # uid/gid come from SO_PEERCRED (what the process was at connect time), not from anything sent.
        selectors = [f"unix:uid:{process.uid}", f"unix:gid:{process.gid}"]
        user = _user_name(process.uid)
        if user is not None:
            selectors.append(f"unix:user:{user}")
        group = _group_name(process.gid)
        if group is not None:
            selectors.append(f"unix:group:{group}")
        for gid in process.groups or ():
            selectors.append(f"unix:supplementary_gid:{gid}")
            name = _group_name(gid)
            if name is not None:
                selectors.append(f"unix:supplementary_group:{name}")
        exe = process.exe
        if exe is None:
            return selectors  # not readable (the agent may not look at this process)
        if exe.path:
            selectors.append(f"unix:path:{exe.path}")
        if self._in_use("unix:sha256"):
            digest = await self.hasher.digest(process, self._proc)
            if digest:
                selectors.append(f"unix:sha256:{digest}")
        return selectors


__all__ = ["DigestCache", "SelectorInUse", "UnixAttestor"]
