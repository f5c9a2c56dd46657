"""Rate limits and connection caps for the node API, as pure logic over an injected clock (no I/O, no threads).

A token bucket per key: ``per_minute`` tokens refill evenly over a minute up to ``burst``; a request costing
``n`` tokens passes when the bucket holds them. The server keys node attestation by source address (a flood
of attestation attempts, each costing signature checks and datastore writes, from one host) and signing by
agent SPIFFE ID (a compromised or buggy agent asking for thousands of SVIDs a second). Both are generous by
default: they exist to bound damage, not to shape normal traffic.

The table of buckets is bounded: when it is full, buckets that have refilled completely carry no state and
are dropped first, then the least recently used, so a spray of source addresses cannot grow memory.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_MAX_KEYS = 100_000


@dataclass(slots=True)
class TokenBucket:
    capacity: float
    refill_per_second: float
    tokens: float
    updated: float

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.refill_per_second)
        self.updated = max(self.updated, now)  # a clock stepping back never mints tokens

    def take(self, cost: float, now: float) -> float:
        """Takes ``cost`` tokens and returns 0, or takes nothing and returns the seconds until it would pass."""
        self._refill(now)
        if cost <= self.tokens:
            self.tokens -= cost
            return 0.0
        if cost > self.capacity or self.refill_per_second <= 0:
            return float("inf")
        return (cost - self.tokens) / self.refill_per_second

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.capacity


class KeyedRateLimiter:
    """One token bucket per key. ``per_minute <= 0`` disables the limit (every call passes)."""

    def __init__(
        self,
        per_minute: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = DEFAULT_MAX_KEYS,
    ) -> None:
        self.per_minute = float(per_minute)
        self.burst = float(burst if burst is not None else per_minute)
        self._clock = clock
        self._max_keys = max(1, max_keys)
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_minute > 0

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, key: str, cost: float = 1.0) -> float:
        """0 when the call may proceed (its cost is taken), else the seconds to wait before retrying."""
        if not self.enabled:
            return 0.0
        now = self._clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = TokenBucket(self.burst, self.per_minute / 60.0, self.burst, now)
            self._buckets[key] = bucket
        else:
            self._buckets.move_to_end(key)
        return bucket.take(cost, now)

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self._max_keys:
            return
        idle = [key for key, bucket in self._buckets.items() if bucket.full(now)]
        for key in idle:
            del self._buckets[key]
        while len(self._buckets) >= self._max_keys:
            self._buckets.popitem(last=False)


class ConnectionGate:
    """Counts the node API connections that have not shown a client certificate, in total and per source
    address, and refuses one more past either cap (``<= 0``: that cap is off).

    Who is counted: every connection from accept until its TLS handshake ends (nobody has proven anything
    yet), and then those that presented no certificate (they may attest and check health, nothing else).
    Agents, once their certificate is verified, leave the count: a flood of anonymous connections can fill
    the gate but never pushes out an agent that already holds its connection.
    """

    def __init__(self, max_total: int, max_per_source: int) -> None:
        self.max_total = max_total
        self.max_per_source = max_per_source
        self._total = 0
        self._by_source: dict[str, int] = {}

    @property
    def total(self) -> int:
        return self._total

    def count(self, source: str) -> int:
        return self._by_source.get(source, 0)

    def admit(self, source: str) -> str | None:
        """Counts a new connection from ``source`` and returns None, or counts nothing and says which cap
        refused it."""
        held = self._by_source.get(source, 0)
        if self.max_per_source > 0 and held >= self.max_per_source:
            return f"{held} connections without a client certificate are open from {source} (the per-source cap)"
        if self.max_total > 0 and self._total >= self.max_total:
            return f"{self._total} connections without a client certificate are open (the cap)"
        self._by_source[source] = held + 1
        self._total += 1
        return None

    def release(self, source: str) -> None:
        """The connection admitted from ``source`` closed, or proved an agent certificate."""
        held = self._by_source.get(source, 0)
        if held <= 0:
            return
        if held == 1:
            del self._by_source[source]
        else:
            self._by_source[source] = held - 1
        self._total -= 1

    def __len__(self) -> int:
        return len(self._by_source)


__all__ = ["DEFAULT_MAX_KEYS", "ConnectionGate", "KeyedRateLimiter", "TokenBucket"]
