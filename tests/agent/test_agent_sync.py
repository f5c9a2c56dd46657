"""Sync logic against an in-test node API (paging, incremental changes, bundles, CSR batches, failures)."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_der_private_key

from tessera.agent.cache import WorkloadCache
from tessera.agent.errors import ServerUnavailableError
from tessera.agent.sync import SyncLoop
from tessera.proto import node_pb2 as npb
from tessera.sdk.svid import parse_der_certificates
from tessera.sdk.testing import TestCA
from tessera.sdk.x509profile import build_x509_svid

TD_ID = "spiffe://example.org"


class FakeServer:
    """Implements the node API's Sync/BatchSign/Mint semantics over an in-memory entry table."""

    def __init__(self, ca: TestCA, page_size: int = 2) -> None:
        self.ca = ca
        self.page_size = page_size
        self.entries: dict[str, npb.Entry] = {}
        self.revision = 0
        self.removed: dict[str, int] = {}
        self.bundles_revision = 1
        self.sync_requests: list[npb.SyncRequest] = []
        self.batches: list[int] = []
        self.down = False
        self.deny = False
        self.refuse: set[str] = set()

    def put(self, entry_id: str, path: str, *selectors: str) -> None:
        self.revision += 1
        self.entries[entry_id] = npb.Entry(
            id=entry_id,
            spiffe_id=f"{TD_ID}{path}",
            selectors=[npb.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1]) for s in selectors],
            revision=self.revision,
        )

    def delete(self, entry_id: str) -> None:
        self.revision += 1
        del self.entries[entry_id]
        self.removed[entry_id] = self.revision

    async def Sync(self, request: npb.SyncRequest, timeout: float) -> npb.SyncResponse:
        self.sync_requests.append(request)
        resp = npb.SyncResponse(entries_revision=self.revision, bundles_revision=self.bundles_revision)
        if request.bundles_revision != self.bundles_revision:
            resp.bundles[TD_ID] = self.ca.spiffe_bundle().to_document()
        if request.entries_revision == 0 or request.page_token:
            ordered = sorted(self.entries.values(), key=lambda e: e.id)
            start = int(request.page_token or 0)
            resp.full = True
            resp.entries.extend(ordered[start : start + self.page_size])
            if start + self.page_size < len(ordered):
                resp.next_page_token = str(start + self.page_size)
        else:
            held = request.entries_revision
            resp.entries.extend(e for e in self.entries.values() if e.revision > held)
            resp.removed_entry_ids.extend(i for i, r in self.removed.items() if r > held)
        return resp

    async def BatchSignX509SVID(self, request: npb.BatchSignX509SVIDRequest, timeout: float) -> Any:
        self.batches.append(len(request.requests))
        if any(r.entry_id in self.refuse for r in request.requests):
            raise _denied()
        now = dt.datetime.now(dt.UTC)
        results = []
        for r in request.requests:
            csr = x509.load_der_x509_csr(r.csr)
            cert = build_x509_svid(
                public_key=csr.public_key(),  # type: ignore[arg-type]
                spiffe_id=self.entries[r.entry_id].spiffe_id,
                issuer_cert=self.ca.certificate,
                issuer_key=self.ca.key,
                not_before=now - dt.timedelta(seconds=10),
                not_after=now + dt.timedelta(hours=1),
            )
            results.append(npb.X509SignResult(entry_id=r.entry_id, cert_chain=cert.public_bytes(Encoding.DER)))
        return npb.BatchSignX509SVIDResponse(results=results)

    async def MintJWTSVID(self, request: npb.MintJWTSVIDRequest, timeout: float) -> Any:
        return npb.MintJWTSVIDResponse(token="tok." + request.entry_id, expires_at=2_000_000_000)


class FakeNode:
    """The slice of NodeClient that SyncLoop uses, backed by FakeServer."""

    class Config:
        call_timeout = 5.0

    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.config = self.Config()
        self.identity = None
        self._renew_at = 0.0
        self.roots: list[x509.Certificate] = []
        self.recovered = 0

    def expired(self) -> bool:
        return False

    def renew_due(self) -> bool:
        return False

    async def recover(self) -> None:
        self.recovered += 1
        self.server.deny = False

    def update_roots(self, roots: list[x509.Certificate]) -> None:
        self.roots = roots

    async def call(self, fn: Callable[[Any], Awaitable[Any]]) -> Any:
        if self.server.down:
            raise ServerUnavailableError("no server reachable: test")
        if self.server.deny:
            raise _denied()
        return await fn(self.server)


def _denied() -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(
        grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata(), details="agent evicted"
    )


def make(page_size: int = 2, batch_size: int = 500) -> tuple[FakeServer, FakeNode, WorkloadCache, SyncLoop]:
    server = FakeServer(TestCA("example.org"), page_size)
    node = FakeNode(server)
    cache = WorkloadCache(TD_ID, max_unwatched_svids=100_000)
    loop = SyncLoop(node, cache, batch_size=batch_size)  # type: ignore[arg-type]
    return server, node, cache, loop


def test_paged_full_sync_then_incremental_changes() -> None:
    server, node, cache, loop = make(page_size=2)
    for i in range(5):
        server.put(f"e{i}", f"/w{i}", f"unix:uid:{i}")

    async def main() -> None:
        await loop.sync_once()
        assert set(cache.entries) == {f"e{i}" for i in range(5)}
        assert [r.page_token for r in server.sync_requests] == ["", "2", "4"]
        assert loop.entries_revision == server.revision and cache.ready
        assert set(cache.svids) == set(cache.entries)
        assert node.roots == [server.ca.certificate]  # server trust roots follow the own bundle
        # incremental: one upsert, one removal; only the changed entries travel
        server.sync_requests.clear()
        server.put("e9", "/w9", "unix:uid:9")
        server.delete("e0")
        await loop.sync_once()
        assert server.sync_requests[0].entries_revision > 0 and not server.sync_requests[0].page_token
        assert "e0" not in cache.entries and "e0" not in cache.svids
        assert "e9" in cache.svids
        assert server.sync_requests[0].bundles_revision == server.bundles_revision  # bundles not resent

    asyncio.run(main())


def test_keys_made_locally_and_csrs_sent_in_batches_of_at_most_500() -> None:
    server, _, cache, loop = make(page_size=2000)
    for i in range(1100):
        server.put(f"e{i:04}", f"/w{i}", f"unix:uid:{i}")

    async def main() -> None:
        await loop.sync_once()

    asyncio.run(main())
    assert server.batches == [500, 500, 100]
    assert len(cache.svids) == 1100
    svid = cache.svids["e0007"]
    leaf = parse_der_certificates(svid.chain_der)[0]
    key = load_der_private_key(svid.key_der, None)
    assert key.public_key().public_numbers() == leaf.public_key().public_numbers()  # type: ignore[union-attr]
    assert len({s.key_der for s in cache.svids.values()}) == 1100  # one fresh key per SVID


def test_unreachable_server_keeps_cache_and_backs_off() -> None:
    server, _, cache, loop = make()
    server.put("e1", "/w1", "unix:uid:1")

    async def main() -> None:
        await loop.sync_once()
        server.down = True
        with pytest.raises(ServerUnavailableError):
            await loop.sync_once()
        assert "e1" in cache.svids  # still served while valid
        stop = asyncio.Event()
        task = asyncio.create_task(loop.run(stop))
        while loop.failures < 1:
            await asyncio.sleep(0.01)
        assert loop._next_delay() >= loop.interval / 2
        server.down = False
        stop.set()
        await asyncio.wait_for(task, 30)

    asyncio.run(main())


def test_refused_agent_recovers_and_resyncs_from_scratch() -> None:
    server, node, _, loop = make()
    server.put("e1", "/w1", "unix:uid:1")

    async def main() -> None:
        await loop.sync_once()
        server.deny = True
        await loop.sync_once()
        assert node.recovered == 1 and loop.entries_revision == 0
        await loop.sync_once()
        assert loop.entries_revision == server.revision

    asyncio.run(main())


def test_jwt_minting_goes_through_the_server() -> None:
    server, _, cache, loop = make()
    server.put("e1", "/w1", "unix:uid:1")

    async def main() -> None:
        await loop.sync_once()
        jwt = await loop.mint_jwt(cache.entries["e1"], ["a"])
        assert jwt.token == "tok.e1" and jwt.expires_at == 2_000_000_000

    asyncio.run(main())


def test_one_refused_entry_does_not_block_the_batch_or_the_agent() -> None:
    server, node, cache, loop = make(page_size=100)
    for i in range(4):
        server.put(f"e{i}", f"/w{i}", f"unix:uid:{i}")
    server.refuse = {"e2"}

    async def main() -> None:
        await loop.sync_once()

    asyncio.run(main())
    assert set(cache.svids) == {"e0", "e1", "e3"}
    assert node.recovered == 0 and cache.ready
    assert loop._next_delay() >= 1.0  # the refused entry does not make the loop spin
