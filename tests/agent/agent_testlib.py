"""Shared helpers for the agent tests (imported by test modules in this folder)."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterable, Sequence

import jwt

# Re-exported for the agent tests.
from support.procs import FETCH_SCRIPT as FETCH_SCRIPT
from support.procs import NOBODY as NOBODY
from support.procs import run_as as run_as
from support.procs import short_dir

from tessera.agent.attestors import default_attestors
from tessera.agent.bundles import TrustBundle, parse_bundle_document
from tessera.agent.cache import CachedJwt, CachedSvid, EntryRecord, WorkloadCache, make_cached_svid
from tessera.agent.endpoint.server import WorkloadEndpoint
from tessera.sdk.testing import TestCA


def socket_dir() -> str:
    """A short, world-searchable directory for Unix sockets (paths must stay under 107 bytes)."""
    return str(short_dir("tsa-"))


def bundle_of(ca: TestCA) -> TrustBundle:
    return parse_bundle_document(ca.trust_domain.id_string, ca.spiffe_bundle().to_document())


def make_cache(ca: TestCA, *extra: TestCA, clock: Callable[[], float] = time.time) -> WorkloadCache:
    cache = WorkloadCache(ca.trust_domain.id_string, clock=clock)
    cache.set_bundles({b.trust_domain_id: b for b in (bundle_of(c) for c in (ca, *extra))})
    cache.mark_ready()
    return cache


def entry(
    entry_id: str,
    ca: TestCA,
    path: str,
    selectors: Iterable[str],
    *,
    hint: str = "",
    federates_with: Sequence[str] = (),
    created_at: int = 0,
) -> EntryRecord:
    return EntryRecord(
        id=entry_id,
        spiffe_id=str(ca.trust_domain.spiffe_id(*path.strip("/").split("/"))),
        selectors=frozenset(selectors),
        hint=hint,
        federates_with=tuple(federates_with),
        created_at=created_at,
    )


def issue(ca: TestCA, e: EntryRecord, ttl: float = 3600) -> CachedSvid:
    svid = ca.issue_svid(e.spiffe_id, ttl=ttl)
    return make_cached_svid(e, svid.cert_chain, svid.key_der())


def add(cache: WorkloadCache, ca: TestCA, *entries: EntryRecord, ttl: float = 3600) -> None:
    cache.apply_entries(entries)
    cache.put_svids(issue(ca, e, ttl) for e in entries)


def jwt_minter(ca: TestCA, ttl: int = 300) -> Callable[[EntryRecord, Sequence[str]], object]:
    calls: list[tuple[str, tuple[str, ...]]] = []

    async def mint(e: EntryRecord, audience: Sequence[str]) -> CachedJwt:
        calls.append((e.id, tuple(audience)))
        now = int(time.time())
        token = jwt.encode(
            {"sub": e.spiffe_id, "aud": list(audience), "iat": now, "exp": now + ttl},
            ca.jwt_key,
            algorithm="ES256",
            headers={"kid": ca.jwt_kid, "typ": "JWT"},
        )
        return CachedJwt(token, now, now + ttl)

    mint.calls = calls  # type: ignore[attr-defined]
    return mint


async def start_endpoint(cache: WorkloadCache, **kwargs: object) -> tuple[WorkloadEndpoint, str]:
    d = socket_dir()
    path = f"{d}/api.sock"
    ep = WorkloadEndpoint(path, cache, default_attestors(), **kwargs)  # type: ignore[arg-type]
    await ep.start()
    ep._test_dir = d  # type: ignore[attr-defined]
    return ep, path


async def stop_endpoint(ep: WorkloadEndpoint) -> None:
    await ep.stop(grace=1)
    shutil.rmtree(ep._test_dir, ignore_errors=True)  # type: ignore[attr-defined]
