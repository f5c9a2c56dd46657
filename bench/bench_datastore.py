"""Datastore benchmark: entry creation rate, a 10,000-entry first sync, and the cost of an unchanged sync.

Usage:
    .venv/bin/python bench/bench_datastore.py                 # 20,000 entries (SQLite, synchronous=FULL)
    .venv/bin/python bench/bench_datastore.py --large         # 100,000 entries
    .venv/bin/python bench/bench_datastore.py --entries 5000 --synchronous NORMAL --dir /var/tmp

Entries are created one call each, as the admin API does (one transaction per entry). One agent ("big") is the
parent of --parent-entries of them; the rest are spread over 100 other agents. Figures are printed, not asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tessera.proto import node_pb2
from tessera.server.datastore import Datastore, EntryFilter, RegistrationEntry, Selector
from tessera.server.datastore.sqlite import SqliteDatastore

TD = "bench.example"
BIG_AGENT = f"spiffe://{TD}/tessera/agent/join_token/big"
SERVER_ID = f"spiffe://{TD}/tessera/server"


def agent_id(i: int) -> str:
    return f"spiffe://{TD}/tessera/agent/join_token/a{i:03d}"


def to_proto(e: RegistrationEntry) -> node_pb2.Entry:
    return node_pb2.Entry(
        id=e.id,
        spiffe_id=e.spiffe_id,
        parent_id=e.parent_id,
        selectors=[node_pb2.Selector(type=s.type, value=s.value) for s in e.selectors],
        x509_svid_ttl=e.x509_svid_ttl,
        jwt_svid_ttl=e.jwt_svid_ttl,
        dns_names=list(e.dns_names),
        hint=e.hint,
        admin=e.admin,
        downstream=e.downstream,
        federates_with=list(e.federates_with),
        expires_at=e.expires_at or 0,
        revision=e.revision,
        created_at=e.created_at,
        node=e.node,
    )


def micro(samples: list[float]) -> str:
    s = sorted(samples)
    p99 = s[min(len(s) - 1, int(len(s) * 0.99))]
    return f"mean {statistics.fmean(s) * 1e6:8.1f} us   p50 {s[len(s) // 2] * 1e6:8.1f} us   p99 {p99 * 1e6:8.1f} us"


def create_entries(store: Datastore, total: int, big: int) -> None:
    print(f"-- creating {total:,} entries ({big:,} for one agent), one transaction each")
    marks = sorted({m for m in (1000, 5000, 10_000, 20_000, 50_000, 100_000, total) if m <= total})
    start = last_t = time.perf_counter()
    last_n = 0
    for i in range(total):
        parent = BIG_AGENT if i < big else agent_id(i % 100)
        store.create_entry(
            RegistrationEntry(
                id="",
                spiffe_id=f"spiffe://{TD}/svc/s{i}",
                parent_id=parent,
                selectors=(Selector("unix", f"uid:{1000 + i % 5000}"), Selector("k8s", f"ns:team{i % 50}")),
                dns_names=(f"s{i}.svc.{TD}",),
            )
        )
        n = i + 1
        if n in marks:
            now = time.perf_counter()
            print(
                f"   {n:>8,} entries: {(n - last_n) / (now - last_t):8.0f} entries/s over the last {n - last_n:,} "
                f"({n / (now - start):7.0f}/s overall)"
            )
            last_t, last_n = now, n


def create_batched(store: Datastore, count: int, batch: int, offset: int) -> None:
    start = time.perf_counter()
    for first in range(offset, offset + count, batch):
        results = store.create_entries(
            [
                RegistrationEntry(
                    id="",
                    spiffe_id=f"spiffe://{TD}/bulk/b{i}",
                    parent_id=agent_id(i % 100),
                    selectors=(Selector("unix", f"uid:{1000 + i % 5000}"), Selector("k8s", f"ns:team{i % 50}")),
                )
                for i in range(first, min(first + batch, offset + count))
            ]
        )
        assert all(isinstance(r, RegistrationEntry) for r in results)
    elapsed = time.perf_counter() - start
    print(f"-- bulk create of {count:,} more entries in batches of {batch}: {count / elapsed:8.0f} entries/s")


def full_sync(store: Datastore, page_size: int) -> int:
    print(f"-- first (full) sync of the big agent, pages of {page_size:,}")
    start = time.perf_counter()
    token = ""
    entries = 0
    proto_bytes = 0
    pages = 0
    while True:
        page = store.entries_for_parents([BIG_AGENT], page_size=page_size, page_token=token)
        pages += 1
        entries += len(page.items)
        proto_bytes += node_pb2.SyncResponse(entries=[to_proto(e) for e in page.items]).ByteSize()
        token = page.next_page_token
        if not token:
            break
    elapsed = time.perf_counter() - start
    print(
        f"   {entries:,} entries in {pages} pages: {elapsed:.3f} s including protobuf conversion, "
        f"{proto_bytes / 1e6:.2f} MB on the wire ({proto_bytes // max(pages, 1):,} bytes per page)"
    )
    return page.revision


def unchanged_sync(store: Datastore, revision: int, calls: int) -> None:
    print(f"-- unchanged incremental sync check, {calls:,} calls")
    checks: list[float] = []
    changes: list[float] = []
    for _ in range(calls):
        t0 = time.perf_counter()
        rev = store.revisions()
        t1 = time.perf_counter()
        result = store.entries_changed_since([BIG_AGENT], rev.entries)
        t2 = time.perf_counter()
        assert not result.upserts and rev.node_aliases <= revision
        checks.append(t1 - t0)
        changes.append(t2 - t1)
    print(f"   revisions()                      {micro(checks)}")
    print(f"   entries_changed_since(unchanged) {micro(changes)}")


def small_change_sync(store: Datastore, calls: int) -> None:
    victim = store.entries_for_parents([BIG_AGENT], page_size=1).items[0]
    samples: list[float] = []
    for i in range(calls):
        before = store.revisions().entries
        store.update_entry(
            RegistrationEntry(victim.id, victim.spiffe_id, victim.parent_id, victim.selectors, hint=f"h{i}")
        )
        t0 = time.perf_counter()
        result = store.entries_changed_since([BIG_AGENT], before)
        samples.append(time.perf_counter() - t0)
        assert len(result.upserts) == 1
    print(f"-- incremental sync after one change   {micro(samples)}")


def admin_queries(store: Datastore, total: int) -> None:
    target = f"spiffe://{TD}/svc/s{total // 2}"
    t0 = time.perf_counter()
    shown = store.list_entries(EntryFilter(spiffe_id=target), page_size=100).items
    t1 = time.perf_counter()
    count = store.count_entries()
    t2 = time.perf_counter()
    walked = 0
    token = ""
    while True:
        page = store.list_entries(page_size=1000, page_token=token)
        walked += len(page.items)
        token = page.next_page_token
        if not token:
            break
    t3 = time.perf_counter()
    print(f"-- entry show --spiffe-id over {count:,} entries: {len(shown)} found in {(t1 - t0) * 1e3:.2f} ms")
    print(f"-- count_entries: {(t2 - t1) * 1e3:.2f} ms; listing all {walked:,} in pages of 1,000: {t3 - t2:.2f} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=20_000, help="entries to create (default 20,000)")
    parser.add_argument("--large", action="store_true", help="create 100,000 entries")
    parser.add_argument("--bulk", type=int, default=10_000, help="extra entries created in batches of 500")
    parser.add_argument("--parent-entries", type=int, default=10_000, help="entries of the one big agent")
    parser.add_argument("--sync-calls", type=int, default=2_000, help="unchanged sync calls to time")
    parser.add_argument("--page-size", type=int, default=1_000, help="full sync page size")
    parser.add_argument("--synchronous", choices=["FULL", "NORMAL"], default="FULL", help="SQLite durability")
    parser.add_argument("--dir", type=Path, default=None, help="directory for the database (default: a temp dir)")
    args = parser.parse_args()
    total = 100_000 if args.large else args.entries
    big = min(args.parent_entries, total)

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "bench.sqlite3"
        print(f"SQLite datastore at {path} (synchronous={args.synchronous})")
        store = SqliteDatastore(path, synchronous=args.synchronous)
        try:
            create_entries(store, total, big)
            if args.bulk:
                create_batched(store, args.bulk, 500, total)
            revision = full_sync(store, args.page_size)
            unchanged_sync(store, revision, args.sync_calls)
            small_change_sync(store, 200)
            admin_queries(store, total)
        finally:
            store.close()
        t0 = time.perf_counter()
        SqliteDatastore(path).close()
        print(f"-- reopen with integrity check: {time.perf_counter() - t0:.2f} s")
        print(f"   file size {path.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
