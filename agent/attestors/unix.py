"""``unix`` selectors: uid, gid, user, group, supplementary groups, executable path and digest."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import pwd
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO

from tessera.agent.attestors.base import ProcessInfo
from tessera.agent.attestors.procfs import parse_status

log = logging.getLogger(__name__)

_FileKey = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)


class DigestCache:
    """SHA-256 of executables keyed by (device, inode, size, mtime): a binary is hashed once, and again
    only when it is replaced or rewritten. Bounded (LRU) so a host running many binaries stays small."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._digests: OrderedDict[_FileKey, str] = OrderedDict()
        self.computed = 0  # how many times a file was actually hashed (observable in tests)

    def get(self, key: _FileKey) -> str | None:
        digest = self._digests.get(key)
        if digest is not None:
            self._digests.move_to_end(key)
        return digest

    def put(self, key: _FileKey, digest: str) -> None:
        self._digests[key] = digest
        self._digests.move_to_end(key)
        while len(self._digests) > self._max:
            self._digests.popitem(last=False)

    async def digest(self, path: str) -> str | None:
        """Digest of the file ``path`` (normally /proc/<pid>/exe, which opens the very inode executed)."""
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self.get(key)
            if cached is not None:
                return cached
            digest = await asyncio.to_thread(_sha256_file, f)
        self.computed += 1
        self.put(key, digest)
        return digest


def _sha256_file(f: BinaryIO) -> str:
    h = hashlib.sha256()
    while True:
        chunk = f.read(1 << 20)
        if not chunk:
            break
        h.update(chunk)
    return h.hexdigest()


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

    def __init__(self, proc_root: str = "/proc", digests: DigestCache | None = None, with_digest: bool = True) -> None:
        self._proc = Path(proc_root)
        self.digests = digests or DigestCache()
        self._with_digest = with_digest

    async def attest(self, process: ProcessInfo) -> Sequence[str]:
        # uid/gid come from SO_PEERCRED (what the process was at connect time), not from anything sent.
        selectors = [f"unix:uid:{process.uid}", f"unix:gid:{process.gid}"]
        user = _user_name(process.uid)
        if user is not None:
            selectors.append(f"unix:user:{user}")
        group = _group_name(process.gid)
        if group is not None:
            selectors.append(f"unix:group:{group}")
        proc_dir = self._proc / str(process.pid)
        try:
            status = parse_status((proc_dir / "status").read_text())
        except FileNotFoundError:
            return selectors  # the process is gone: the pipeline's start-time check refuses it
        for gid in status.groups:
            selectors.append(f"unix:supplementary_gid:{gid}")
            name = _group_name(gid)
            if name is not None:
                selectors.append(f"unix:supplementary_group:{name}")
        exe = proc_dir / "exe"
        try:
            target = os.readlink(exe)
        except OSError as exc:  # kernel threads, or no permission to look
            log.debug("cannot read %s: %s", exe, exc)
            return selectors
        if target.endswith(" (deleted)"):
            # The binary was replaced on disk; the path no longer names what runs. Still hash what runs.
            target = ""
        if target:
            selectors.append(f"unix:path:{target}")
        if self._with_digest:
            try:
                digest = await self.digests.digest(str(exe))
            except OSError as exc:
                log.debug("cannot hash %s: %s", exe, exc)
                digest = None
            if digest:
                selectors.append(f"unix:sha256:{digest}")
        return selectors
