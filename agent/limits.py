"""Limits on what one local caller may hold open on the Workload API: pure logic, no I/O.

Each open stream (FetchX509SVID, FetchX509Bundles, FetchJWTBundles) costs the agent a task, a socket and a
place in the fan-out of every rotation, and each connection up to three descriptors (the caller's, and both
ends of the relay to the internal server). A workload that connects or opens streams in a loop (a bug, or a
hostile process on the host) would otherwise exhaust file descriptors for every other workload: measured
before the connection cap, 9,000 connections from ``nobody`` pinned the agent at its descriptor limit. The
caller is its kernel uid: processes of one user can cooperate to get around a per-process cap, but not a
per-user one.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Hashable, Iterator
from contextlib import asynccontextmanager, contextmanager

from tessera.agent.errors import StreamLimitExceeded

DEFAULT_MAX_STREAMS_PER_CALLER = 1024
DEFAULT_MAX_CONNECTIONS_PER_CALLER = 512
"""Connections one uid may hold open: far above what a workload host's processes of one user hold (an SDK
source holds one, a pool of gRPC channels a few each), far below the agent's descriptor limit."""
DEFAULT_FIRST_REQUEST_TIMEOUT = 10.0
"""A connection that sends nothing this long after it was accepted is closed."""


class ConcurrencyLimiter:
    """Counts what each key holds open (streams; the relay's connections); ``limit <= 0`` means unlimited
    (counting still happens, for metrics)."""

    def __init__(self, limit: int = DEFAULT_MAX_STREAMS_PER_CALLER, what: str = "open Workload API streams") -> None:
        self.limit = limit
        self.what = what
        self._open: dict[Hashable, int] = {}

    def open_count(self, key: Hashable) -> int:
        return self._open.get(key, 0)

    @property
    def total(self) -> int:
        return sum(self._open.values())

    def acquire(self, key: Hashable) -> None:
        current = self._open.get(key, 0)
        if self.limit > 0 and current >= self.limit:
            raise StreamLimitExceeded(key, self.limit, self.what)
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


class KeyedGate:
    """At most ``limit`` holders per key at a time; the others wait their turn (first come, first served).

    For work a caller can make expensive (hashing its executable, scanning /proc for who holds its
    connection): keyed by caller uid, one uid's backlog queues behind itself, never in front of another uid.
    """

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self._active: dict[Hashable, int] = {}
        self._waiting: dict[Hashable, deque[asyncio.Future[None]]] = {}

    def active(self, key: Hashable) -> int:
        return self._active.get(key, 0)

    @asynccontextmanager
    async def slot(self, key: Hashable) -> AsyncIterator[None]:
        if self._active.get(key, 0) >= self.limit or self._waiting.get(key):
            waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue = self._waiting.setdefault(key, deque())
            queue.append(waiter)
            try:
                await waiter  # the releasing holder hands its slot over (the count stays)
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._release(key)  # handed a slot we will not use
                else:
                    queue.remove(waiter)
                    if not queue:
                        self._waiting.pop(key, None)
                raise
        else:
            self._active[key] = self._active.get(key, 0) + 1
        try:
            yield
        finally:
            self._release(key)

    def _release(self, key: Hashable) -> None:
        queue = self._waiting.get(key)
        while queue:
            waiter = queue.popleft()
            if not queue:
                self._waiting.pop(key, None)
            if not waiter.done():
                waiter.set_result(None)
                return
        count = self._active.get(key, 0) - 1
        if count > 0:
            self._active[key] = count
        else:
            self._active.pop(key, None)


__all__ = [
    "DEFAULT_FIRST_REQUEST_TIMEOUT",
    "DEFAULT_MAX_CONNECTIONS_PER_CALLER",
    "DEFAULT_MAX_STREAMS_PER_CALLER",
    "ConcurrencyLimiter",
    "KeyedGate",
    "StreamLimitExceeded",
]
