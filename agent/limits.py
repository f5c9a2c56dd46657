"""Limits on what one local caller may hold open on the Workload API: pure logic, no I/O.

Each open stream (FetchX509SVID, FetchX509Bundles, FetchJWTBundles) costs the agent a task, a socket and a
place in the fan-out of every rotation. A workload that opens streams in a loop (a bug, or a hostile process
on the host) would otherwise exhaust file descriptors for every other workload. The caller is its kernel
uid: processes of one user can cooperate to get around a per-process cap, but not a per-user one.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from contextlib import contextmanager

DEFAULT_MAX_STREAMS_PER_CALLER = 1024


class StreamLimitExceeded(Exception):
    def __init__(self, key: Hashable, limit: int) -> None:
        super().__init__(f"caller {key} already holds {limit} open Workload API streams (the per-caller limit)")
        self.key = key
        self.limit = limit


class ConcurrencyLimiter:
    """Counts open streams per key; ``limit <= 0`` means unlimited (counting still happens, for metrics)."""

    def __init__(self, limit: int = DEFAULT_MAX_STREAMS_PER_CALLER) -> None:
        self.limit = limit
        self._open: dict[Hashable, int] = {}

    def open_count(self, key: Hashable) -> int:
        return self._open.get(key, 0)

    @property
    def total(self) -> int:
        return sum(self._open.values())

    def acquire(self, key: Hashable) -> None:
        current = self._open.get(key, 0)
        if self.limit > 0 and current >= self.limit:
            raise StreamLimitExceeded(key, self.limit)
        self._open[key] = current + 1

    def release(self, key: Hashable) -> None:
        current = self._open.get(key, 0)
        if current <= 1:
            self._open.pop(key, None)
        else:
            self._open[key] = current - 1

    @contextmanager
    def hold(self, key: Hashable) -> Iterator[None]:
        self.acquire(key)
        try:
            yield
        finally:
            self.release(key)


__all__ = ["DEFAULT_MAX_STREAMS_PER_CALLER", "ConcurrencyLimiter", "StreamLimitExceeded"]
