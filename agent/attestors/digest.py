"""SHA-256 of the executable a caller runs (``unix:sha256``), bounded so that no caller can make it expensive.

- Hashing is the one attestation step whose cost the caller chooses: anyone can run a 4 GiB sparse file.
  Measured before these bounds: 8 x 4 GiB sparse binaries connecting in parallel slowed another workload's
  fetch from 0.38 s to 2.55 s. So a file is hashed only when some entry uses ``unix:sha256`` (the attestor
  asks), never above ``max_bytes`` (no selector then, and a log line at most once per executable per few
  minutes), and at most ``per_uid`` files at a time per caller uid: one uid's giant binaries queue behind
  each other, not in front of another uid's fetch.
- The digest must be of the inode the process ran when it connected: the file is opened through
  /proc/<pid>/exe and hashed only when that descriptor's (device, inode) is the captured one; else the
  process exec'd since and the call is refused.
- A digest is cached by (device, inode, size, mtime): hashed once per binary, again only when rewritten.
  A hash whose caller went away stops at the next chunk instead of running to the end.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from tessera.agent.attestors.process import EXECED, EXITED, ProcessInfo
from tessera.agent.errors import CallerRefused
from tessera.agent.limits import KeyedGate

log = logging.getLogger("tessera.agent.attestors.digest")

DEFAULT_MAX_HASH_BYTES = 256 * 1024 * 1024
DEFAULT_HASHES_PER_UID = 2
OVERSIZE_LOG_INTERVAL = 300.0
OVERSIZE_LOG_BUDGET = 20  # lines per interval across all executables (many distinct giant files cost nothing)
_CHUNK = 1 << 20

_FileKey = tuple[int, int, int, int]  # (st_dev, st_ino, st_size, st_mtime_ns)


class DigestCache:
    """SHA-256 of executables keyed by (device, inode, size, mtime): a binary is hashed once, and again
    only when it is replaced or rewritten. Bounded (LRU) so a host running many binaries stays small."""

    def __init__(self, max_entries: int = 4096) -> None:
        self._max = max_entries
        self._digests: OrderedDict[_FileKey, str] = OrderedDict()
        self.computed = 0  # how many times a file was actually hashed (observable in tests and metrics)

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


class OversizeLog:
    """Says once per executable per ``interval`` (and at most ``budget`` times per interval overall) that a
    file was too large to hash. Pure: the clock is injected; :meth:`admit` only decides."""

    def __init__(
        self,
        interval: float = OVERSIZE_LOG_INTERVAL,
        budget: int = OVERSIZE_LOG_BUDGET,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 4096,
    ) -> None:
        self.interval = interval
        self.budget = budget
        self._clock = clock
        self._max_keys = max_keys
        self._last: OrderedDict[Hashable, float] = OrderedDict()
        self._window_start = float("-inf")
        self._window_count = 0
        self.suppressed = 0  # events not logged since the last line that was

    def admit(self, key: Hashable) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return False
        if now - self._window_start >= self.interval:
            self._window_start, self._window_count = now, 0
        if self._window_count >= self.budget:
            self.suppressed += 1
            return False
        self._window_count += 1
        self._last[key] = now
        self._last.move_to_end(key)
        while len(self._last) > self._max_keys:
            self._last.popitem(last=False)
        return True


def _sha256_fd(fd: int, stop: threading.Event) -> tuple[str, os.stat_result] | None:
    """Hashes the open file ``fd`` (and closes it); None when told to stop. Runs in a worker thread."""
    try:
        h = hashlib.sha256()
        offset = 0
        while not stop.is_set():
            chunk = os.pread(fd, _CHUNK, offset)
            if not chunk:
                return h.hexdigest(), os.fstat(fd)
            h.update(chunk)
            offset += len(chunk)
        return None
    finally:
        os.close(fd)


class ExecutableHasher:
    """Digests of callers' executables within the bounds above; counts what it did for the metrics."""

    def __init__(
        self,
        cache: DigestCache | None = None,
        *,
        max_bytes: int = DEFAULT_MAX_HASH_BYTES,
        per_uid: int = DEFAULT_HASHES_PER_UID,
        oversize_log: OversizeLog | None = None,
    ) -> None:
        self.cache = cache or DigestCache()
        self.max_bytes = max_bytes
        self.gate = KeyedGate(per_uid)
        self._oversize = oversize_log or OversizeLog()
        self.bytes_hashed = 0
        self.too_large = 0  # executables not hashed for their size (each time one was asked for)

    async def digest(self, process: ProcessInfo, proc_root: str = "/proc") -> str | None:
        """SHA-256 of the executable captured for ``process``; None when it may not be hashed (too large, not a
        regular file). CallerRefused when /proc/<pid>/exe is no longer the captured inode."""
        exe = process.exe
        if exe is None:
            return None
        try:
            fd = os.open(f"{proc_root}/{process.pid}/exe", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as exc:
            raise CallerRefused(EXITED) from exc
        except OSError as exc:
            log.debug("cannot open the executable of process %d: %s", process.pid, exc)
            return None
        handed_over = False
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (exe.dev, exe.ino):
                raise CallerRefused(EXECED)
            if not stat.S_ISREG(st.st_mode):
                return None
            key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            cached = self.cache.get(key)
            if cached is not None:
                return cached
            if st.st_size > self.max_bytes:
                self._refuse_size(exe.path, st)
                return None
            async with self.gate.slot(process.uid):
                cached = self.cache.get(key)  # hashed by another caller while this one waited its turn
                if cached is not None:
                    return cached
                stop = threading.Event()
                work = asyncio.get_running_loop().run_in_executor(None, _sha256_fd, fd, stop)
                handed_over = True
                try:
                    result = await work
                except asyncio.CancelledError:
                    stop.set()  # the caller went away: the thread stops at its next chunk
                    raise
        finally:
            if not handed_over:
                os.close(fd)
        if result is None:
            return None
        digest, after = result
        self.cache.computed += 1
        self.bytes_hashed += after.st_size
        if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            return None  # rewritten while we read it: this digest describes neither version
        self.cache.put(key, digest)
        return digest

    def _refuse_size(self, path: str, st: os.stat_result) -> None:
        self.too_large += 1
        if self._oversize.admit((st.st_dev, st.st_ino)):
            more = self._oversize.suppressed
            self._oversize.suppressed = 0
            log.warning(
                "not hashing the executable %s: %d bytes is above workload_attestor_max_hash_bytes (%d); "
                "callers running it get no unix:sha256 selector%s",
                path or f"(deleted, inode {st.st_ino})",
                st.st_size,
                self.max_bytes,
                f" ({more} similar messages suppressed)" if more else "",
            )


__all__ = [
    "DEFAULT_HASHES_PER_UID",
    "DEFAULT_MAX_HASH_BYTES",
    "DigestCache",
    "ExecutableHasher",
    "OversizeLog",
]
