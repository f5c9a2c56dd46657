"""Pure logic: rotation schedule, backoff, entry matching, the LRU soft cap, JWT cache, change fan-out."""

from __future__ import annotations

import asyncio
import random
import time

import pytest
from agent_testlib import add, bundle_of, entry, issue, make_cache

from tessera.agent.cache import CachedJwt, CachedSvid, EntryRecord, WorkloadCache
from tessera.agent.rotation import backoff_delay, jwt_reusable_until, rotate_at
from tessera.proto import node_pb2 as npb
from tessera.sdk.testing import TestCA


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_rotation_at_half_life_with_ten_percent_jitter() -> None:
    assert rotate_at(0, 100, lambda: 0.5) == 50
    assert rotate_at(0, 100, lambda: 0.0) == pytest.approx(45)
    assert rotate_at(0, 100, lambda: 0.999999) == pytest.approx(55, abs=1e-3)
    rng = random.Random(7)
    values = [rotate_at(1000, 4600, rng.random) for _ in range(1000)]
    assert min(values) >= 1000 + 1800 * 0.9 and max(values) <= 1000 + 1800 * 1.1
    assert max(values) - min(values) > 300  # actually spread, not lockstep
    assert rotate_at(10, 5) == 10  # degenerate validity never schedules before not_before


def test_jwt_reuse_window_and_backoff() -> None:
    assert jwt_reusable_until(100, 400) == 250
    assert backoff_delay(0, 5, 300) == 5
    delays = [backoff_delay(n, 5, 300, lambda: 1.0) for n in range(1, 10)]
    assert delays[:4] == [5, 10, 20, 40]
    assert delays[-1] == 300
    assert backoff_delay(3, 5, 300, lambda: 0.0) == 10  # jitter floor: half the delay


def test_entry_from_proto_and_matching() -> None:
    proto = npb.Entry(
        id="e",
        spiffe_id="spiffe://example.org/x",
        selectors=[npb.Selector(type="unix", value="uid:0"), npb.Selector(type="unix", value="gid:0")],
        federates_with=["b.test"],
        dns_names=["x.local"],
    )
    e = EntryRecord.from_proto(proto)
    assert e.selectors == {"unix:uid:0", "unix:gid:0"}
    assert e.federates_with == ("spiffe://b.test",)
    assert e.matches(frozenset({"unix:uid:0", "unix:gid:0", "unix:user:root"}))
    assert not e.matches(frozenset({"unix:uid:0"}))  # all selectors must match
    assert not EntryRecord("n", "spiffe://example.org/n", frozenset()).matches(frozenset({"unix:uid:0"}))


def test_removed_or_changed_entries_drop_svids_and_jwts() -> None:
    ca = TestCA()
    cache = make_cache(ca)
    a, b = entry("a", ca, "/a", ["unix:uid:1"]), entry("b", ca, "/b", ["unix:uid:1"])
    add(cache, ca, a, b)
    cache.put_jwt("a", frozenset({"x"}), CachedJwt("t", time.time(), time.time() + 300))
    assert set(cache.svids) == {"a", "b"}
    v = cache.version
    cache.apply_entries([], ["a"])
    assert set(cache.svids) == {"b"} and not cache.jwts and cache.version > v
    # same entry again: nothing changes, no wake-up
    v = cache.version
    assert not cache.apply_entries([b])
    assert cache.version == v
    # SPIFFE ID change: the SVID no longer matches what the server would sign
    cache.apply_entries([EntryRecord("b", "spiffe://example.org/b2", b.selectors)])
    assert "b" not in cache.svids
    # full sync replaces everything
    cache.apply_entries([a], full=True)
    assert set(cache.entries) == {"a"}


def test_entitlement_default_first_federation_and_memo() -> None:
    ca, fed = TestCA(), TestCA("b.test")
    cache = make_cache(ca, fed)
    first = entry("z", ca, "/first", ["unix:uid:1"], created_at=1, federates_with=["spiffe://b.test"])
    second = entry("a", ca, "/second", ["unix:uid:1"], created_at=2)
    add(cache, ca, second, first)
    sel = frozenset({"unix:uid:1"})
    ent = cache.entitlement(sel)
    assert ent.x509 is not None
    assert [s.spiffe_id for s in ent.x509.svids] == ["spiffe://example.org/first", "spiffe://example.org/second"]
    assert set(ent.x509.federated_bundles) == {"spiffe://b.test"}
    assert cache.entitlement(sel) is ent  # memoized while nothing changed
    cache.set_bundles({bundle_of(ca).trust_domain_id: bundle_of(ca)})
    ent2 = cache.entitlement(sel)
    assert ent2 is not ent and not ent2.x509.federated_bundles  # type: ignore[union-attr]
    assert not cache.entitlement(frozenset({"unix:uid:2"})).has_identity


def test_expired_entries_and_svids_are_not_served() -> None:
    ca = TestCA()
    clock = Clock(time.time())
    cache = make_cache(ca, clock=clock)
    e = entry("e", ca, "/e", ["unix:uid:1"])
    add(cache, ca, e, ttl=60)
    sel = frozenset({"unix:uid:1"})
    assert cache.entitlement(sel).x509 is not None
    clock.now += 120
    cache._bump()
    ent = cache.entitlement(sel)
    assert ent.has_identity and ent.x509 is None  # entry still there, SVID expired: nothing to serve
    assert cache.missing_svids(ent.entries) == ["e"]
    assert cache.drop_expired() == 1 and not cache.svids
    cache.apply_entries([EntryRecord("x", "spiffe://example.org/x", sel, expires_at=int(clock.now) - 1)])
    assert [x.id for x in cache.matching_entries(sel)] == ["e"]


def test_rotation_due_and_lru_soft_cap() -> None:
    ca = TestCA()
    clock = Clock(time.time())
    cache = WorkloadCache("spiffe://example.org", clock=clock, max_unwatched_svids=3)
    cache.set_bundles({"spiffe://example.org": bundle_of(ca)})
    entries = [entry(f"e{i}", ca, f"/w{i}", [f"unix:uid:{i}"], created_at=i) for i in range(6)]
    cache.apply_entries(entries)
    # nothing watched: pre-warm only up to the soft cap
    assert [e.id for e in cache.entries_to_sign()] == ["e0", "e1", "e2"]
    cache.put_svids(issue(ca, e, ttl=100) for e in entries[:3])
    assert cache.entries_to_sign() == []
    # a workload watches e5: it is signed even over the cap, and never evicted
    with cache.watch(frozenset({"unix:uid:5"})):
        assert [e.id for e in cache.entries_to_sign()] == ["e5"]
        cache.put_svids([issue(ca, entries[5], ttl=100)])
        assert set(cache.svids) == {"e0", "e1", "e2", "e5"}  # watched SVIDs do not count against the cap
        # a workload asks for e3 (not pre-warmed): signed on request, and the LRU unwatched one goes
        cache.touch([entries[0]])  # e0 recently served: e1 is now least recently used
        cache.request(["e3"])
        assert cache.sign_wanted.is_set()
        assert [e.id for e in cache.entries_to_sign()] == ["e3"]
        cache.put_svids([issue(ca, entries[3], ttl=100)])
        assert set(cache.svids) == {"e0", "e2", "e3", "e5"}
    # time passes: everything is due for rotation at about half life
    clock.now += 56
    assert {e.id for e in cache.entries_to_sign()} == {"e0", "e2", "e3", "e5"}


def test_tainted_authority_forces_rotation() -> None:
    ca = TestCA()
    cache = make_cache(ca)
    e = entry("e", ca, "/e", ["unix:uid:1"])
    add(cache, ca, e)
    svid: CachedSvid = cache.svids["e"]
    assert svid.authority_key_id
    assert cache.drop_svids_signed_by(["00"]) == 0
    assert cache.drop_svids_signed_by([svid.authority_key_id.upper()]) == 1
    assert cache.svids["e"].rotate_at == 0 and [x.id for x in cache.entries_to_sign()] == ["e"]


def test_jwt_cache_per_entry_and_audience_set_until_half_life() -> None:
    ca = TestCA()
    clock = Clock(1000.0)
    cache = make_cache(ca, clock=clock)
    cache.apply_entries([entry("e", ca, "/e", ["unix:uid:1"])])
    aud = frozenset({"a", "b"})
    cache.put_jwt("e", aud, CachedJwt("tok", 1000.0, 1300.0))
    assert cache.cached_jwt("e", frozenset({"b", "a"})) is not None
    assert cache.cached_jwt("e", frozenset({"a"})) is None
    clock.now = 1149.0
    assert cache.cached_jwt("e", aud) is not None
    clock.now = 1150.0
    assert cache.cached_jwt("e", aud) is None
    cache.put_jwt("gone", aud, CachedJwt("tok", 1000.0, 1300.0))
    assert ("gone", aud) not in cache.jwts


def test_fan_out_wakes_a_thousand_waiters_with_one_change() -> None:
    ca = TestCA()
    cache = make_cache(ca)

    async def main() -> None:
        woke = 0

        async def waiter() -> None:
            nonlocal woke
            await cache.changed().wait()
            woke += 1

        tasks = [asyncio.create_task(waiter()) for _ in range(1000)]
        await asyncio.sleep(0)
        cache.apply_entries([entry("e", ca, "/e", ["unix:uid:1"])])
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        assert woke == 1000

    asyncio.run(main())


def test_selector_types_in_use_follow_the_entries() -> None:
    """What attestation may skip (hashing) or must add (who holds the connection) follows the entries."""
    ca = TestCA("example.org")
    cache = make_cache(ca)
    assert not cache.uses_selector_type("unix")
    cache.apply_entries([entry("a", ca, "/a", ["unix:uid:1000"])])
    assert cache.uses_selector_type("unix") and cache.uses_selector_type("unix:uid")
    assert not cache.uses_selector_type("unix:sha256") and not cache.uses_selector_type("unix:path")
    cache.apply_entries([entry("b", ca, "/b", ["unix:sha256:" + "ab" * 32, "unix:path:/usr/bin/x:y"])])
    assert cache.uses_selector_type("unix:sha256") and cache.uses_selector_type("unix:path")
    node = EntryRecord("n", "spiffe://example.org/node", frozenset({"k8s:pod-uid:1"}), node=True)
    cache.apply_entries([node])
    assert not cache.uses_selector_type("k8s")  # node entries are never matched against a workload
    cache.apply_entries([], ["b"])
    assert not cache.uses_selector_type("unix:sha256") and cache.uses_selector_type("unix:uid")
    cache.apply_entries([], full=True)
    assert not cache.uses_selector_type("unix")
