"""The datastore contract, run against every backend in server_store_lib.BACKENDS."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_store_lib import BACKENDS, SERVER_ID, Backend

from tessera.server.datastore import (
    AttestedAgent,
    Datastore,
    EntryFilter,
    RegistrationEntry,
    Selector,
    SelectorMatch,
)
from tessera.server.datastore.schema import SCHEMA_VERSION
from tessera.server.errors import (
    AgentBannedError,
    AlreadyExists,
    InvalidPageTokenError,
    JoinTokenExpiredError,
    NotFound,
    RevisionConflictError,
)

AGENT_A = "spiffe://example.org/tessera/agent/join_token/a"
AGENT_B = "spiffe://example.org/tessera/agent/join_token/b"
ALIAS = "spiffe://example.org/nodes/web"


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else ""
    b = Backend(request.param, tmp_path, url)
    yield b
    b.close_all()


@pytest.fixture
def store(backend: Backend) -> Datastore:
    return backend.open()


def sel(*texts: str) -> tuple[Selector, ...]:
    return tuple(Selector.parse(t) for t in texts)


def entry(spiffe_path: str, parent: str = AGENT_A, *selectors: str, **kw: object) -> RegistrationEntry:
    return RegistrationEntry(
        id="",
        spiffe_id=f"spiffe://example.org/{spiffe_path}",
        parent_id=parent,
        selectors=sel(*(selectors or ("unix:uid:1000",))),
        **kw,  # type: ignore[arg-type]
    )


def agent(spiffe_id: str = AGENT_A, serial: str = "01", **kw: object) -> AttestedAgent:
    fields: dict[str, object] = {
        "spiffe_id": spiffe_id,
        "attestor": "join_token",
        "selectors": sel("join_token:a"),
        "serial": serial,
        "expires_at": 1_800_003_600,
    }
    fields.update(kw)
    return AttestedAgent(**fields)  # type: ignore[arg-type]


# ---- schema ---------------------------------------------------------------------------------------------------


def test_new_store_is_migrated_to_the_current_schema(backend: Backend) -> None:
    store = backend.open()
    assert store.schema_version() == SCHEMA_VERSION
    rev = store.revisions()
    assert (rev.entries, rev.bundles, rev.node_aliases) == (0, 0, 0)
    store.ping()
    store.close()
    again = backend.open()
    assert again.schema_version() == SCHEMA_VERSION


# ---- entries --------------------------------------------------------------------------------------------------


def test_create_assigns_id_revision_created_at_and_normalizes_selectors(store: Datastore, backend: Backend) -> None:
    created = store.create_entry(entry("web", AGENT_A, "unix:uid:1000", "k8s:ns:default", "unix:uid:1000"))
    assert uuid.UUID(created.id).version == 4
    assert created.revision == 1
    assert created.created_at == int(backend.clock.now)
    assert created.selectors == (Selector("k8s", "ns:default"), Selector("unix", "uid:1000"))
    assert store.get_entry(created.id) == created
    assert store.revisions().entries == 1


def test_all_fields_round_trip(store: Datastore) -> None:
    full = RegistrationEntry(
        id="",
        spiffe_id="spiffe://example.org/db",
        parent_id=AGENT_A,
        selectors=sel("unix:uid:5", "unix:gid:5"),
        x509_svid_ttl=600,
        jwt_svid_ttl=300,
        dns_names=("db.example.org", "*.db.example.org"),
        hint="primary ünïcode",
        admin=True,
        downstream=True,
        federates_with=("a.test", "b.test"),
        expires_at=1_900_000_000,
    )
    created = store.create_entry(full)
    got = store.get_entry(created.id)
    assert got == created
    assert (got.dns_names, got.hint, got.admin, got.downstream, got.federates_with, got.expires_at) == (
        ("db.example.org", "*.db.example.org"),
        "primary ünïcode",
        True,
        True,
        ("a.test", "b.test"),
        1_900_000_000,
    )
    assert (got.x509_svid_ttl, got.jwt_svid_ttl, got.node) == (600, 300, False)


def test_duplicate_identity_is_refused_whatever_the_selector_order(store: Datastore) -> None:
    first = store.create_entry(entry("web", AGENT_A, "a:1", "b:2"))
    with pytest.raises(AlreadyExists, match=first.id):
        store.create_entry(entry("web", AGENT_A, "b:2", "a:1"))
    # Any difference in the identity is a different entry.
    store.create_entry(entry("web", AGENT_A, "a:1"))
    store.create_entry(entry("web", AGENT_B, "a:1", "b:2"))
    store.create_entry(entry("web2", AGENT_A, "a:1", "b:2"))
    assert store.count_entries() == 4
    assert store.revisions().entries == 4  # the refused create bumped nothing


def test_batch_create_refuses_only_the_duplicates(store: Datastore) -> None:
    before = store.create_entry(entry("existing", AGENT_A, "a:1"))
    results = store.create_entries(
        [
            entry("one", AGENT_A, "a:1"),
            entry("existing", AGENT_A, "a:1"),
            entry("two", AGENT_B, "b:2"),
            entry("one", AGENT_A, "a:1"),
        ]
    )
    assert [type(r).__name__ for r in results] == [
        "RegistrationEntry",
        "AlreadyExists",
        "RegistrationEntry",
        "AlreadyExists",
    ]
    assert before.id in str(results[1])
    created = [r for r in results if isinstance(r, RegistrationEntry)]
    assert [r.revision for r in created] == [2, 3]
    assert store.get_entries([c.id for c in created]) == {c.id: c for c in created}
    assert store.count_entries() == 3
    assert store.create_entries([]) == []
    with pytest.raises(ValueError, match="at most"):
        store.create_entries([entry(f"x{i}") for i in range(10_001)])


def test_explicit_id_is_kept_and_must_be_unique(store: Datastore) -> None:
    created = store.create_entry(RegistrationEntry("fixed-id", "spiffe://example.org/x", AGENT_A, sel("a:1")))
    assert created.id == "fixed-id"
    with pytest.raises(AlreadyExists, match="fixed-id"):
        store.create_entry(RegistrationEntry("fixed-id", "spiffe://example.org/y", AGENT_A, sel("a:1")))


def test_get_missing_entry_is_not_found(store: Datastore) -> None:
    with pytest.raises(NotFound, match="nope"):
        store.get_entry("nope")


def test_get_entries_returns_only_existing(store: Datastore) -> None:
    ids = [store.create_entry(entry(f"w{i}")).id for i in range(3)]
    got = store.get_entries([*ids, "missing", ids[0]])
    assert set(got) == set(ids)
    many = store.get_entries([f"x{i}" for i in range(1200)] + [ids[1]])
    assert list(many) == [ids[1]]


def test_update_bumps_revision_and_keeps_id_and_created_at(store: Datastore, backend: Backend) -> None:
    created = store.create_entry(entry("web", AGENT_A, "a:1"))
    backend.clock.advance(100)
    other = store.create_entry(entry("other"))
    updated = store.update_entry(
        RegistrationEntry(created.id, created.spiffe_id, AGENT_A, sel("a:1", "c:3"), x509_svid_ttl=120, hint="h")
    )
    assert updated.revision == other.revision + 1
    assert updated.created_at == created.created_at
    assert updated.selectors == sel("a:1", "c:3")
    assert store.get_entry(created.id) == updated
    # The selector index follows the update.
    assert [
        e.id for e in store.list_entries(EntryFilter(selectors=sel("c:3"), selector_match=SelectorMatch.SUPERSET)).items
    ] == [created.id]
    assert not store.list_entries(EntryFilter(selectors=sel("a:1"), selector_match=SelectorMatch.EXACT)).items


def test_update_compare_and_set(store: Datastore) -> None:
    created = store.create_entry(entry("web"))
    changed = store.update_entry(created, expected_revision=created.revision)
    with pytest.raises(RevisionConflictError, match="changed meanwhile"):
        store.update_entry(created, expected_revision=created.revision)
    assert store.get_entry(created.id).revision == changed.revision


def test_concurrent_compare_and_set_updates_exactly_one_wins(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]
    created = stores[0].create_entry(entry("web"))
    barrier = threading.Barrier(6)
    outcomes: list[str] = []
    lock = threading.Lock()

    def update(n: int) -> None:
        barrier.wait(timeout=30)
        try:
            stores[n % 2].update_entry(
                RegistrationEntry(created.id, created.spiffe_id, AGENT_A, created.selectors, hint=str(n)),
                expected_revision=created.revision,
            )
            result = "won"
        except RevisionConflictError:
            result = "lost"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=update, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(outcomes) == ["lost"] * 5 + ["won"]
    assert stores[1].get_entry(created.id).revision == created.revision + 1


def test_update_into_another_entrys_identity_is_refused(store: Datastore) -> None:
    a = store.create_entry(entry("a", AGENT_A, "x:1"))
    b = store.create_entry(entry("b", AGENT_A, "x:1"))
    with pytest.raises(AlreadyExists, match=a.id):
        store.update_entry(RegistrationEntry(b.id, a.spiffe_id, AGENT_A, sel("x:1")))
    assert store.get_entry(b.id) == b


def test_update_and_delete_missing_entry_are_not_found(store: Datastore) -> None:
    with pytest.raises(NotFound):
        store.update_entry(RegistrationEntry("missing", "spiffe://example.org/x", AGENT_A, sel("a:1")))
    with pytest.raises(NotFound):
        store.delete_entry("missing")
    assert store.revisions().entries == 0


def test_delete_returns_the_entry_and_bumps_revision(store: Datastore) -> None:
    created = store.create_entry(entry("web"))
    deleted = store.delete_entry(created.id)
    assert deleted == created
    assert store.revisions().entries == 2
    with pytest.raises(NotFound):
        store.get_entry(created.id)
    with pytest.raises(NotFound):
        store.delete_entry(created.id)
    # The identity is free again.
    store.create_entry(entry("web"))


def test_list_filters(store: Datastore) -> None:
    e1 = store.create_entry(entry("web", AGENT_A, "unix:uid:1", "unix:gid:1"))
    e2 = store.create_entry(entry("web", AGENT_B, "unix:uid:1"))
    e3 = store.create_entry(entry("db", AGENT_A, "unix:uid:2"))
    alias = store.create_entry(RegistrationEntry("", ALIAS, SERVER_ID, sel("x509pop:san:web"), node=True))

    def ids(f: EntryFilter) -> set[str]:
        listed: set[str] = set()
        token = ""
        while True:  # every page of the listing
            page = store.list_entries(f, page_size=2, page_token=token)
            listed.update(e.id for e in page.items)
            token = page.next_page_token
            if not token:
                break
        assert store.count_entries(f) == len(listed)
        return listed

    assert ids(EntryFilter()) == {e1.id, e2.id, e3.id, alias.id}
    assert ids(EntryFilter(spiffe_id="spiffe://example.org/web")) == {e1.id, e2.id}
    assert ids(EntryFilter(parent_id=AGENT_A)) == {e1.id, e3.id}
    assert ids(EntryFilter(spiffe_id="spiffe://example.org/web", parent_id=AGENT_A)) == {e1.id}
    assert ids(EntryFilter(node=True)) == {alias.id}
    assert ids(EntryFilter(node=False)) == {e1.id, e2.id, e3.id}
    uid1 = sel("unix:uid:1")
    assert ids(EntryFilter(selectors=uid1, selector_match=SelectorMatch.EXACT)) == {e2.id}
    assert ids(EntryFilter(selectors=uid1, selector_match=SelectorMatch.SUPERSET)) == {e1.id, e2.id}
    assert ids(EntryFilter(selectors=uid1, selector_match=SelectorMatch.SUBSET)) == {e2.id}
    both = sel("unix:gid:1", "unix:uid:1", "unix:uid:2")
    assert ids(EntryFilter(selectors=both, selector_match=SelectorMatch.SUBSET)) == {e1.id, e2.id, e3.id}
    assert ids(EntryFilter(selectors=both, selector_match=SelectorMatch.SUPERSET)) == set()
    assert ids(EntryFilter(selectors=sel("unix:gid:1", "unix:uid:1"), selector_match=SelectorMatch.EXACT)) == {e1.id}
    assert ids(EntryFilter(parent_id=AGENT_B, selectors=uid1, selector_match=SelectorMatch.SUPERSET)) == {e2.id}
    assert ids(EntryFilter(selectors=(), selector_match=SelectorMatch.SUPERSET)) == {e1.id, e2.id, e3.id, alias.id}
    assert ids(EntryFilter(selectors=(), selector_match=SelectorMatch.EXACT)) == set()


def test_paging_visits_every_entry_once_in_id_order(store: Datastore) -> None:
    ids = sorted(store.create_entry(entry(f"w{i}")).id for i in range(25))
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = store.list_entries(page_size=7, page_token=token)
        pages += 1
        seen.extend(e.id for e in page.items)
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    assert pages == 4
    # An exact multiple of the page size ends without an empty trailing page.
    assert not store.list_entries(page_size=25).next_page_token


def test_paging_is_stable_while_entries_change(store: Datastore) -> None:
    ids = sorted(store.create_entry(entry(f"w{i}")).id for i in range(30))
    first = store.list_entries(page_size=10)
    seen = [e.id for e in first.items]
    # Meanwhile: delete one already seen, one not yet seen, and create ten more.
    store.delete_entry(seen[0])
    store.delete_entry(ids[20])
    added = {store.create_entry(entry(f"new{i}")).id for i in range(10)}
    token = first.next_page_token
    while token:
        page = store.list_entries(page_size=10, page_token=token)
        seen.extend(e.id for e in page.items)
        token = page.next_page_token
    assert len(seen) == len(set(seen)), "an entry appeared twice"
    survivors = set(ids) - {ids[0], ids[20]}
    assert survivors <= set(seen) | {ids[0]}, "an entry present throughout was skipped"
    assert ids[20] not in seen
    assert set(seen) - set(ids) <= added


def test_bad_page_tokens_and_sizes(store: Datastore) -> None:
    store.upsert_agent(agent(AGENT_A))
    store.upsert_agent(agent(AGENT_B))
    agents_token = store.list_agents(page_size=1).next_page_token
    assert agents_token
    for token in ("garbage", "!!!", agents_token):
        with pytest.raises(InvalidPageTokenError):
            store.list_entries(page_token=token)
    for size in (0, -1, 10_001):
        with pytest.raises(ValueError, match="page_size"):
            store.list_entries(page_size=size)


def test_prune_expired_entries(store: Datastore) -> None:
    soon = store.create_entry(entry("soon", expires_at=1_800_000_100))
    later = store.create_entry(entry("later", expires_at=1_800_000_900))
    never = store.create_entry(entry("never"))
    assert store.prune_expired_entries(1_800_000_100) == [soon.id]
    assert set(store.get_entries([soon.id, later.id, never.id])) == {later.id, never.id}
    changes = store.entries_changed_since([AGENT_A], never.revision)
    assert changes.removed_ids == [soon.id]


def test_concurrent_creates_get_distinct_contiguous_revisions(backend: Backend) -> None:
    stores = [backend.open(), backend.open()]
    results: list[RegistrationEntry] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        try:
            for i in range(15):
                e = stores[n % 2].create_entry(entry(f"t{n}/e{i}"))
                with lock:
                    results.append(e)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(e.revision for e in results) == list(range(1, 91))
    assert stores[0].count_entries() == 90


# ---- incremental sync -----------------------------------------------------------------------------------------


def test_unchanged_revision_returns_nothing(store: Datastore) -> None:
    store.create_entry(entry("web"))
    current = store.revisions().entries
    changes = store.entries_changed_since([AGENT_A], current)
    assert (changes.upserts, changes.removed_ids, changes.revision, changes.full_sync_required) == (
        [],
        [],
        current,
        False,
    )


def test_changes_are_scoped_to_the_parents(store: Datastore) -> None:
    a1 = store.create_entry(entry("a1", AGENT_A))
    b1 = store.create_entry(entry("b1", AGENT_B))
    changes = store.entries_changed_since([AGENT_A], 0)
    assert [e.id for e in changes.upserts] == [a1.id]
    assert changes.revision == 2
    both = store.entries_changed_since([AGENT_A, AGENT_B, AGENT_A], 0)
    assert {e.id for e in both.upserts} == {a1.id, b1.id}
    assert store.entries_changed_since([], 0).upserts == []


def test_changes_carry_updates_and_deletes_since_a_revision(store: Datastore) -> None:
    keep = store.create_entry(entry("keep"))
    edit = store.create_entry(entry("edit"))
    gone = store.create_entry(entry("gone"))
    held = store.revisions().entries
    edited = store.update_entry(RegistrationEntry(edit.id, edit.spiffe_id, AGENT_A, edit.selectors, hint="new"))
    store.delete_entry(gone.id)
    changes = store.entries_changed_since([AGENT_A], held)
    assert changes.upserts == [edited]
    assert changes.removed_ids == [gone.id]
    assert changes.revision == held + 2
    assert keep.id not in {e.id for e in changes.upserts}
    # From before everything, the deleted entry is only a removal.
    from_zero = store.entries_changed_since([AGENT_A], 0)
    assert {e.id for e in from_zero.upserts} == {keep.id, edit.id}
    assert from_zero.removed_ids == [gone.id]


def test_moving_an_entry_to_another_parent_removes_it_from_the_old_one(store: Datastore) -> None:
    moved = store.create_entry(entry("moved", AGENT_A))
    held = store.revisions().entries
    store.update_entry(RegistrationEntry(moved.id, moved.spiffe_id, AGENT_B, moved.selectors))
    a = store.entries_changed_since([AGENT_A], held)
    b = store.entries_changed_since([AGENT_B], held)
    assert (a.upserts, a.removed_ids) == ([], [moved.id])
    assert [e.id for e in b.upserts] == [moved.id] and b.removed_ids == []
    # ...and moving it back makes it an upsert (never both) for an agent that missed the round trip.
    back = store.update_entry(RegistrationEntry(moved.id, moved.spiffe_id, AGENT_A, moved.selectors))
    a2 = store.entries_changed_since([AGENT_A], held)
    assert (a2.upserts, a2.removed_ids) == ([back], [])
    b2 = store.entries_changed_since([AGENT_B], held)
    assert (b2.upserts, b2.removed_ids) == ([], [moved.id])


def test_full_sync_required_when_revision_is_unusable(store: Datastore, backend: Backend) -> None:
    for i in range(5):
        store.create_entry(entry(f"w{i}"))
    assert store.entries_changed_since([AGENT_A], 99).full_sync_required  # from another (restored) database
    too_many = store.entries_changed_since([AGENT_A], 0, max_changes=4)
    assert too_many.full_sync_required and not too_many.upserts
    assert not store.entries_changed_since([AGENT_A], 0, max_changes=5).full_sync_required


def test_pruned_tombstones_force_older_agents_to_full_sync(store: Datastore, backend: Backend) -> None:
    e1 = store.create_entry(entry("one"))
    old_agent = store.revisions().entries
    store.delete_entry(e1.id)
    e2 = store.create_entry(entry("two"))
    up_to_date = store.revisions().entries
    assert store.prune_tombstones(int(backend.clock.now) - 10) == 0
    backend.clock.advance(3600)
    assert store.prune_tombstones(int(backend.clock.now)) == 1
    assert store.entries_changed_since([AGENT_A], old_agent).full_sync_required
    assert not store.entries_changed_since([AGENT_A], up_to_date).full_sync_required
    store.delete_entry(e2.id)
    assert store.entries_changed_since([AGENT_A], up_to_date).removed_ids == [e2.id]


def test_full_sync_pages_are_pinned_to_the_first_revision(store: Datastore) -> None:
    mine = {store.create_entry(entry(f"w{i}", AGENT_A)).id for i in range(25)}
    store.create_entry(entry("not-mine", AGENT_B))
    first = store.entries_for_parents([AGENT_A], page_size=10)
    pinned = first.revision
    assert pinned == store.revisions().entries
    got = {e.id for e in first.items}
    late = store.create_entry(entry("late", AGENT_A))
    token = first.next_page_token
    while token:
        page = store.entries_for_parents([AGENT_A], page_size=10, page_token=token)
        assert page.revision == pinned
        got.update(e.id for e in page.items)
        token = page.next_page_token
    assert mine <= got
    # Whatever the pages missed is picked up incrementally from the pinned revision.
    follow = store.entries_changed_since([AGENT_A], pinned)
    assert late.id in {e.id for e in follow.upserts}
    assert store.entries_for_parents([], page_size=10).items == []
    with pytest.raises(InvalidPageTokenError):
        store.entries_for_parents([AGENT_A], page_token=store.list_entries(page_size=1).next_page_token)


def test_node_alias_matching_and_alias_revision(store: Datastore) -> None:
    alias = store.create_entry(
        RegistrationEntry("", ALIAS, SERVER_ID, sel("x509pop:san:web", "x509pop:ca:1"), node=True)
    )
    other = store.create_entry(
        RegistrationEntry("", "spiffe://example.org/nodes/db", SERVER_ID, sel("x509pop:san:db"), node=True)
    )
    # A workload entry with the same selectors is not an alias.
    store.create_entry(entry("not-alias", AGENT_A, "x509pop:san:web"))
    agent_sel = sel("x509pop:san:web", "x509pop:ca:1", "x509pop:subject:cn:h1")
    assert [e.id for e in store.node_alias_entries_matching(agent_sel)] == [alias.id]
    assert store.node_alias_entries_matching(sel("x509pop:san:web")) == []
    assert [e.id for e in store.node_alias_entries_matching(sel("x509pop:san:db", "x:y"))] == [other.id]
    assert store.node_alias_entries_matching(()) == []

    aliases_rev = store.revisions().node_aliases
    assert aliases_rev == other.revision
    assert aliases_rev > alias.revision  # what sync compares to decide on a full sync
    store.create_entry(entry("workload", ALIAS))
    assert store.revisions().node_aliases == aliases_rev, "a workload change must not look like an alias change"
    updated = store.update_entry(RegistrationEntry(alias.id, ALIAS, SERVER_ID, sel("x509pop:san:web"), node=True))
    assert store.revisions().node_aliases == updated.revision
    assert [e.id for e in store.node_alias_entries_matching(sel("x509pop:san:web"))] == [alias.id]
    store.delete_entry(other.id)
    assert store.revisions().node_aliases == store.revisions().entries
    # Entries parented to the alias sync through it.
    assert [e.spiffe_id for e in store.entries_for_parents([ALIAS]).items] == ["spiffe://example.org/workload"]


# ---- agents ---------------------------------------------------------------------------------------------------


def test_agent_lifecycle(store: Datastore, backend: Backend) -> None:
    created = store.upsert_agent(agent(AGENT_A, serial="aa", reattestable=True))
    assert created.created_at == created.updated_at == int(backend.clock.now)
    assert store.get_agent(AGENT_A) == created
    backend.clock.advance(60)
    again = store.upsert_agent(agent(AGENT_A, serial="bb", selectors=sel("x509pop:san:h")))
    assert (again.serial, again.created_at, again.updated_at) == ("bb", created.created_at, created.updated_at + 60)
    assert again.selectors == sel("x509pop:san:h")
    renewed = store.set_agent_serial(AGENT_A, "cc", 1_800_090_000, expected_serial="bb")
    assert (renewed.serial, renewed.expires_at) == ("cc", 1_800_090_000)
    with pytest.raises(RevisionConflictError):
        store.set_agent_serial(AGENT_A, "dd", 1_800_090_000, expected_serial="bb")
    with pytest.raises(NotFound):
        store.set_agent_serial(AGENT_B, "dd", 1)
    store.evict_agent(AGENT_A)
    with pytest.raises(NotFound):
        store.get_agent(AGENT_A)
    with pytest.raises(NotFound):
        store.evict_agent(AGENT_A)
    store.upsert_agent(agent(AGENT_A))  # may attest again after eviction


def test_banned_agent_is_kept_and_refused_until_evicted(store: Datastore) -> None:
    store.upsert_agent(agent(AGENT_A, serial="aa"))
    banned = store.ban_agent(AGENT_A)
    assert banned.banned and banned.serial == ""
    with pytest.raises(AgentBannedError, match="evict"):
        store.upsert_agent(agent(AGENT_A, serial="bb"))
    with pytest.raises(AgentBannedError):
        store.set_agent_serial(AGENT_A, "bb", 1)
    assert store.get_agent(AGENT_A).banned
    with pytest.raises(NotFound):
        store.ban_agent(AGENT_B)
    store.evict_agent(AGENT_A)
    assert not store.upsert_agent(agent(AGENT_A, serial="cc")).banned


def test_list_and_count_agents(store: Datastore) -> None:
    names = sorted(f"spiffe://example.org/tessera/agent/join_token/n{i:02d}" for i in range(12))
    for name in reversed(names):
        store.upsert_agent(agent(name))
    store.ban_agent(names[3])
    seen: list[str] = []
    token = ""
    while True:
        page = store.list_agents(page_size=5, page_token=token)
        seen.extend(a.spiffe_id for a in page.items)
        token = page.next_page_token
        if not token:
            break
    assert seen == names
    assert [a.spiffe_id for a in store.list_agents(banned=True).items] == [names[3]]
    assert store.count_agents() == 12
    assert store.count_agents(banned=True) == 1
    assert store.count_agents(banned=False) == 11


# ---- join tokens ----------------------------------------------------------------------------------------------


def test_join_token_is_stored_hashed_and_consumed_once(store: Datastore, backend: Backend) -> None:
    secret = "s3cr3t-" + uuid.uuid4().hex
    created = store.create_join_token(secret, 1_800_000_600, spiffe_id="spiffe://example.org/tessera/agent/x")
    assert created.token_hash == hashlib.sha256(secret.encode()).hexdigest()
    assert all(secret not in repr(t) for t in store.list_join_tokens())
    with pytest.raises(AlreadyExists):
        store.create_join_token(secret, 1_800_000_600)
    used = store.consume_join_token(secret)
    assert used.id == created.id and used.spiffe_id == "spiffe://example.org/tessera/agent/x"
    with pytest.raises(NotFound, match="already used"):
        store.consume_join_token(secret)
    with pytest.raises(NotFound):
        store.consume_join_token("never-issued")
    assert store.list_join_tokens() == []


def test_expired_join_token_is_refused_and_deleted(store: Datastore, backend: Backend) -> None:
    store.create_join_token("tok", 1_800_000_060)
    backend.clock.advance(60)
    with pytest.raises(JoinTokenExpiredError):
        store.consume_join_token("tok")
    with pytest.raises(NotFound):
        store.consume_join_token("tok")
    store.create_join_token("tok2", 1_800_000_200)
    with pytest.raises(JoinTokenExpiredError):
        store.consume_join_token("tok2", now=1_800_000_200)


def test_join_token_delete_list_prune(store: Datastore) -> None:
    a = store.create_join_token("a", 1_800_000_100)
    b = store.create_join_token("b", 1_800_000_050)
    c = store.create_join_token("c", 1_800_000_500)
    assert [t.id for t in store.list_join_tokens()] == [b.id, a.id, c.id]
    store.delete_join_token(c.id)
    with pytest.raises(NotFound):
        store.delete_join_token(c.id)
    assert store.prune_join_tokens(1_800_000_100) == 2
    assert store.list_join_tokens() == []


def race_to_consume(stores: list[Datastore], token: str, n: int = 8) -> list[str]:
    """n threads (spread over the store handles) consume one token at the same moment; returns outcomes."""
    barrier = threading.Barrier(n)
    outcomes: list[str] = []
    lock = threading.Lock()

    def consume(i: int) -> None:
        barrier.wait(timeout=30)
        try:
            stores[i % len(stores)].consume_join_token(token)
            result = "won"
        except NotFound:
            result = "lost"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return outcomes


@pytest.mark.parametrize("handles", [1, 2], ids=["one-handle", "two-servers"])
def test_concurrent_consumers_exactly_one_wins(backend: Backend, handles: int) -> None:
    stores = [backend.open() for _ in range(handles)]
    for round_ in range(5):
        token = f"race-{round_}"
        stores[0].create_join_token(token, 1_900_000_000)
        assert sorted(race_to_consume(stores, token)) == ["lost"] * 7 + ["won"]


# ---- bundles --------------------------------------------------------------------------------------------------


def test_bundles_with_revisions_and_compare_and_set(store: Datastore) -> None:
    own = store.set_bundle("example.org", b'{"keys":[]}', expected_revision=0)
    assert own.revision == 1 and store.revisions().bundles == 1
    fed = store.set_bundle("b.test", b'{"keys":[1]}')
    assert fed.revision == 2
    assert store.get_bundle("example.org") == own
    assert [b.trust_domain for b in store.list_bundles()] == ["b.test", "example.org"]
    with pytest.raises(RevisionConflictError, match="revision 1"):
        store.set_bundle("example.org", b"{}", expected_revision=0)
    newer = store.set_bundle("example.org", b'{"keys":[2]}', expected_revision=own.revision)
    assert newer.revision == 3
    with pytest.raises(RevisionConflictError):
        store.set_bundle("example.org", b"{}", expected_revision=own.revision)
    with pytest.raises(RevisionConflictError, match="does not exist"):
        store.set_bundle("c.test", b"{}", expected_revision=5)
    store.delete_bundle("b.test")
    assert store.revisions().bundles == 4
    with pytest.raises(NotFound):
        store.get_bundle("b.test")
    with pytest.raises(NotFound):
        store.delete_bundle("b.test")
    assert store.get_bundle("example.org").document == b'{"keys":[2]}'


def test_bundle_compare_and_set_under_concurrency(backend: Backend) -> None:
    """Several servers adding their CA to the shared bundle: no update is lost."""
    stores = [backend.open(), backend.open()]
    stores[0].set_bundle("example.org", b"")

    def add(n: int) -> None:
        s = stores[n % 2]
        while True:
            current = s.get_bundle("example.org")
            try:
                s.set_bundle("example.org", current.document + b"%d," % n, expected_revision=current.revision)
                return
            except RevisionConflictError:
                continue

    threads = [threading.Thread(target=add, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    parts = stores[0].get_bundle("example.org").document.decode().strip(",").split(",")
    assert sorted(parts) == [str(n) for n in range(6)]


# ---- CA journal -----------------------------------------------------------------------------------------------


def test_ca_journal_per_server(store: Datastore) -> None:
    assert store.get_ca_journal("server-1") is None
    store.set_ca_journal("server-1", b"\x00journal-1")
    store.set_ca_journal("server-2", b"journal-2")
    store.set_ca_journal("server-1", b"\x00journal-1b")
    assert store.get_ca_journal("server-1") == b"\x00journal-1b"
    assert store.get_ca_journal("server-2") == b"journal-2"


# ---- restart --------------------------------------------------------------------------------------------------


def test_restart_loses_nothing(backend: Backend) -> None:
    store = backend.open()
    e1 = store.create_entry(entry("web", AGENT_A, "unix:uid:1"))
    e2 = store.create_entry(RegistrationEntry("", ALIAS, SERVER_ID, sel("x509pop:san:web"), node=True))
    gone = store.create_entry(entry("gone"))
    store.delete_entry(gone.id)
    a = store.upsert_agent(agent(AGENT_A, serial="ab"))
    b = store.upsert_agent(agent(AGENT_B))
    store.ban_agent(AGENT_B)
    tok = store.create_join_token("restart-token", 1_900_000_000)
    bundle = store.set_bundle("example.org", b"doc")
    store.set_ca_journal("s1", b"j")
    revisions = store.revisions()
    store.close()

    again = backend.open()
    assert again.revisions() == revisions
    assert again.get_entries([e1.id, e2.id]) == {e1.id: e1, e2.id: e2}
    assert again.entries_changed_since([AGENT_A], e2.revision).removed_ids == [gone.id]
    assert again.get_agent(AGENT_A) == a
    assert again.get_agent(AGENT_B).banned and again.get_agent(AGENT_B).created_at == b.created_at
    assert [t.id for t in again.list_join_tokens()] == [tok.id]
    assert again.consume_join_token("restart-token").id == tok.id
    assert again.get_bundle("example.org") == bundle
    assert again.get_ca_journal("s1") == b"j"
    # Revisions keep counting from where they were.
    assert again.create_entry(entry("after")).revision == revisions.entries + 1


def test_alias_matching_follows_changes_made_through_another_server(backend: Backend) -> None:
    a, b = backend.open(), backend.open()
    alias = a.create_entry(RegistrationEntry("", ALIAS, SERVER_ID, sel("x509pop:san:web"), node=True))
    web = sel("x509pop:san:web")
    assert [e.id for e in b.node_alias_entries_matching(web)] == [alias.id]  # b's cache is warm now
    a.update_entry(RegistrationEntry(alias.id, ALIAS, SERVER_ID, sel("x509pop:san:web", "x509pop:ca:2"), node=True))
    assert b.node_alias_entries_matching(web) == []
    assert [e.id for e in b.node_alias_entries_matching(sel("x509pop:san:web", "x509pop:ca:2"))] == [alias.id]
    a.delete_entry(alias.id)
    assert b.node_alias_entries_matching(sel("x509pop:san:web", "x509pop:ca:2")) == []
    # A normal entry turned into an alias (and back) is seen too.
    plain = a.create_entry(RegistrationEntry("", "spiffe://example.org/nodes/x", AGENT_A, web))
    assert b.node_alias_entries_matching(web) == []
    a.update_entry(RegistrationEntry(plain.id, plain.spiffe_id, SERVER_ID, web, node=True))
    assert [e.id for e in b.node_alias_entries_matching(web)] == [plain.id]
    a.update_entry(RegistrationEntry(plain.id, plain.spiffe_id, AGENT_A, web))
    assert b.node_alias_entries_matching(web) == []


def test_incremental_sync_converges_while_another_server_writes(backend: Backend) -> None:
    """An agent syncing incrementally during a stream of creates, moves and deletes ends up exactly right."""
    writer_store, reader_store = backend.open(), backend.open()
    done = threading.Event()
    failures: list[BaseException] = []

    def writer() -> None:
        try:
            live: list[RegistrationEntry] = []
            for i in range(150):
                if i % 5 == 3 and live:
                    writer_store.delete_entry(live.pop(0).id)
                elif i % 5 == 4 and live:
                    moved = live.pop()
                    parent = AGENT_B if moved.parent_id == AGENT_A else AGENT_A
                    live.append(
                        writer_store.update_entry(RegistrationEntry(moved.id, moved.spiffe_id, parent, moved.selectors))
                    )
                else:
                    live.append(writer_store.create_entry(entry(f"c{i}", AGENT_A if i % 2 else AGENT_B)))
        except BaseException as exc:  # pragma: no cover - reported below
            failures.append(exc)
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    held = 0
    cache: dict[str, RegistrationEntry] = {}

    def sync_once() -> None:
        nonlocal held
        changes = reader_store.entries_changed_since([AGENT_A], held)
        assert not changes.full_sync_required
        for removed in changes.removed_ids:
            cache.pop(removed, None)
        for upsert in changes.upserts:
            cache[upsert.id] = upsert
        held = changes.revision

    while not done.wait(0.01):  # let several changes pile up between syncs
        sync_once()
    thread.join(timeout=60)
    assert not failures
    sync_once()
    truth = {e.id: e for e in reader_store.entries_for_parents([AGENT_A], page_size=1000).items}
    assert cache == truth
    assert held == reader_store.revisions().entries
