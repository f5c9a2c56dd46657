"""Workload API clients and sources against a real gRPC server on a Unix socket (a test double of the agent)."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import grpc
import pytest
from sdk_rt_fakeagent import FakeAgent, wait_for

from tessera.sdk.errors import WorkloadApiError
from tessera.sdk.jwtsvid import JwtSvid, mint_jwt_svid
from tessera.sdk.source import AsyncJwtSource, AsyncX509Source, JwtSource, X509Snapshot, X509Source, pick_by_id
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.testing import TestCA
from tessera.sdk.workloadapi import (
    AsyncWorkloadApiClient,
    BackoffPolicy,
    WorkloadApiClient,
    WorkloadApiInvalidArgumentError,
    WorkloadApiPermissionDeniedError,
    WorkloadApiStreamEndedError,
    WorkloadApiTimeoutError,
    WorkloadApiUnavailableError,
    X509Context,
)

FAST = BackoffPolicy(initial=0.05, maximum=0.3)
WEB = "spiffe://example.org/web"
DB = "spiffe://example.org/db"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


@pytest.fixture(scope="module")
def fed() -> TestCA:
    return TestCA("partner.org")


def _mint(ca: TestCA) -> Any:
    def mint(spiffe_id: str, audiences: Sequence[str]) -> str:
        now = dt.datetime.now(dt.UTC)
        return mint_jwt_svid(ca.jwt_key, ca.jwt_kid, spiffe_id, audiences, now + dt.timedelta(minutes=5), now)

    return mint


def _validate(ca: TestCA) -> Any:
    def validate(token: str, audience: str) -> tuple[str, dict[str, Any]]:
        svid = JwtSvid.parse_and_validate(token, ca.jwt_bundle(), audience)
        return str(svid.spiffe_id), dict(svid.claims)

    return validate


@pytest.fixture
def agent(ca: TestCA, fed: TestCA) -> Iterator[FakeAgent]:
    fake = FakeAgent()
    fake.set_x509([ca.issue_svid(WEB, hint="web"), ca.issue_svid(DB, hint="db")], [ca.x509_bundle(), fed.x509_bundle()])
    fake.set_jwt([ca.jwt_bundle(), fed.jwt_bundle()], mint=_mint(ca), validate=_validate(ca))
    fake.start()
    yield fake
    fake.stop()


def test_fetches(agent: FakeAgent, ca: TestCA, fed: TestCA) -> None:
    with WorkloadApiClient(agent.address, backoff=FAST) as client:
        ctx = client.fetch_x509_context()
        assert [str(s.spiffe_id) for s in ctx.svids] == [WEB, DB]
        assert ctx.default_svid.hint == "web"
        assert set(ctx.bundles) == {ca.trust_domain, fed.trust_domain}
        assert client.fetch_x509_svid().spiffe_id == SpiffeId.parse(WEB)
        assert len(client.fetch_x509_svids()) == 2
        bundles = client.fetch_x509_bundles()
        assert bundles[TrustDomain("partner.org")].authorities == fed.x509_bundle().authorities
        jwt_bundles = client.fetch_jwt_bundles()
        assert set(jwt_bundles) == {ca.trust_domain, fed.trust_domain}
        token = client.fetch_jwt_svid(["aud1", "aud2"])
        assert token.spiffe_id == SpiffeId.parse(WEB) and token.audience == ("aud1", "aud2")
        assert client.fetch_jwt_svid("aud1", spiffe_id=DB).spiffe_id == SpiffeId.parse(DB)
        validated = client.validate_jwt_svid(token.token, "aud1")
        assert validated.spiffe_id == SpiffeId.parse(WEB)
        with pytest.raises(WorkloadApiInvalidArgumentError, match="token invalid"):
            client.validate_jwt_svid(token.token, "someone-else")
        with pytest.raises(WorkloadApiError, match="audience"):
            client.fetch_jwt_svid([])
        # Locally too, with the fetched bundles.
        assert JwtSvid.parse_and_validate(token.token, jwt_bundles, "aud2").spiffe_id == SpiffeId.parse(WEB)


def test_address_from_environment(agent: FakeAgent, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:" + agent.socket_path)
    with WorkloadApiClient() as client:
        assert client.fetch_x509_svid().spiffe_id == SpiffeId.parse(WEB)
    monkeypatch.delenv("SPIFFE_ENDPOINT_SOCKET")
    with pytest.raises(WorkloadApiError, match="SPIFFE_ENDPOINT_SOCKET"):
        WorkloadApiClient()
    with pytest.raises(WorkloadApiError, match="absolute"):
        WorkloadApiClient("unix:relative/api.sock")


def test_errors_are_specific(agent: FakeAgent) -> None:
    with WorkloadApiClient(agent.address, backoff=FAST) as client:
        agent.refuse(grpc.StatusCode.PERMISSION_DENIED)
        with pytest.raises(WorkloadApiPermissionDeniedError, match="registration entry"):
            client.fetch_x509_context()
        with pytest.raises(WorkloadApiPermissionDeniedError):
            client.fetch_jwt_svid("a")
    missing = "unix://" + os.path.join(agent.dir, "nobody.sock")
    with WorkloadApiClient(missing, backoff=FAST) as client, \
            pytest.raises(WorkloadApiUnavailableError, match="is the agent running"):
        client.fetch_x509_context()


def test_watch_follows_rotation_and_reconnects_after_restart(agent: FakeAgent, ca: TestCA, fed: TestCA) -> None:
    updates: list[X509Context] = []
    errors: list[WorkloadApiError] = []
    with WorkloadApiClient(agent.address, backoff=FAST) as client:
        watch = client.watch_x509_context(updates.append, errors.append)
        wait_for(lambda: len(updates) == 1, what="first update")
        agent.set_x509([ca.issue_svid(WEB)], [ca.x509_bundle()])
        wait_for(lambda: len(updates) == 2, what="rotation")
        assert len(updates[1].svids) == 1 and len(updates[1].bundles) == 1
        # The agent goes away and comes back: the watch reconnects by itself.
        agent.stop()
        wait_for(lambda: errors, what="an error while the agent is down")
        agent.set_x509([ca.issue_svid(DB)], [ca.x509_bundle()])
        agent.start()
        wait_for(lambda: updates[-1].default_svid.spiffe_id == SpiffeId.parse(DB), what="update after restart")
        assert not watch.stopped
        # A stream that ends with OK is a broken connection, never a silent success.
        before = agent.calls["FetchX509SVID"]
        n = len(updates)
        agent.end_streams_ok()
        wait_for(lambda: any(isinstance(e, WorkloadApiStreamEndedError) for e in errors), what="stream-ended error")
        wait_for(lambda: agent.calls["FetchX509SVID"] > before and len(updates) > n, what="reconnect after OK end")
        watch.cancel()
        assert watch.wait(10)
        assert watch.error is None


def test_invalid_argument_stops_the_watch(agent: FakeAgent) -> None:
    errors: list[WorkloadApiError] = []
    with WorkloadApiClient(agent.address, backoff=FAST) as client:
        agent.refuse(grpc.StatusCode.INVALID_ARGUMENT)
        watch = client.watch_x509_context(lambda _: None, errors.append)
        assert watch.wait(10)
        assert isinstance(watch.error, WorkloadApiInvalidArgumentError)
        assert agent.calls["FetchX509SVID"] == 1  # no retry
        # PermissionDenied, by contrast, is retried.
        agent.refuse(grpc.StatusCode.PERMISSION_DENIED)
        w2 = client.watch_x509_bundles(lambda _: None, errors.append)
        wait_for(lambda: agent.calls.get("FetchX509Bundles", 0) >= 3, what="retries")
        assert not w2.stopped
    assert w2.stopped


def test_x509_source_snapshots_listeners_and_close(agent: FakeAgent, ca: TestCA) -> None:
    seen: list[X509Snapshot] = []
    with X509Source(address=agent.address, backoff=FAST, picker=pick_by_id(DB)) as source:
        first = source.snapshot()
        assert first.svid.spiffe_id == SpiffeId.parse(DB)
        source.add_listener(seen.append)
        new_ca = TestCA("example.org")
        agent.set_x509([new_ca.issue_svid(WEB), new_ca.issue_svid(DB)], [new_ca.x509_bundle()])
        wait_for(lambda: seen, what="listener")
        snap = source.snapshot()
        assert snap is seen[-1] and snap is not first
        # The snapshot's SVID and bundle come from the same update: the SVID chains to the bundle.
        assert snap.svid.leaf.issuer == new_ca.certificate.subject
        assert snap.bundles[ca.trust_domain].authorities == (new_ca.certificate,)
    assert source.closed
    with pytest.raises(WorkloadApiError, match="closed"):
        source.snapshot()


def test_snapshots_never_torn_under_concurrent_reads(agent: FakeAgent) -> None:
    cas = [TestCA("example.org") for _ in range(3)]
    stop = threading.Event()
    torn: list[str] = []
    with X509Source(address=agent.address, backoff=FAST) as source:

        def reader() -> None:
            while not stop.is_set():
                snap = source.snapshot()
                roots = snap.bundles[TrustDomain("example.org")].authorities
                if not any(r.subject == snap.svid.leaf.issuer for r in roots):
                    torn.append("svid without its bundle")

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(6):
            c = cas[i % 3]
            agent.set_x509([c.issue_svid(WEB)], [c.x509_bundle()])
            wait_for(lambda c=c: source.svid.leaf.issuer == c.certificate.subject, what="update")  # type: ignore[misc]
        stop.set()
        for t in threads:
            t.join()
    assert torn == []


def test_source_start_timeout_names_the_last_error(agent: FakeAgent) -> None:
    agent.refuse(grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(WorkloadApiTimeoutError, match=r"within 0.5s; last error: .*no identity"):
        X509Source(address=agent.address, timeout=0.5, backoff=FAST)
    agent.refuse(grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(WorkloadApiInvalidArgumentError):
        X509Source(address=agent.address, timeout=30, backoff=FAST)


def test_jwt_source(agent: FakeAgent, ca: TestCA) -> None:
    with JwtSource(address=agent.address, backoff=FAST) as source:
        token = source.fetch_jwt_svid("svc")
        assert source.validate(token.token, "svc").spiffe_id == SpiffeId.parse(WEB)
        with pytest.raises(Exception, match="audience"):
            source.validate(token.token, "other")


def test_async_client_and_sources(agent: FakeAgent, ca: TestCA) -> None:
    async def main() -> None:
        client = AsyncWorkloadApiClient(agent.address, backoff=FAST)
        ctx = await client.fetch_x509_context()
        assert ctx.default_svid.spiffe_id == SpiffeId.parse(WEB)
        assert len(await client.fetch_x509_bundles()) == 2
        assert len(await client.fetch_jwt_bundles()) == 2
        token = await client.fetch_jwt_svid("a")
        assert (await client.validate_jwt_svid(token.token, "a")).spiffe_id == SpiffeId.parse(WEB)

        errors: list[WorkloadApiError] = []
        got: list[X509Context] = []

        async def consume() -> None:
            async for update in client.watch_x509_context(errors.append):
                got.append(update)

        task = asyncio.create_task(consume())
        await _until(lambda: len(got) == 1)
        agent.stop()
        await _until(lambda: errors)
        agent.set_x509([ca.issue_svid(DB)], [ca.x509_bundle()])
        agent.start()
        await _until(lambda: got[-1].default_svid.spiffe_id == SpiffeId.parse(DB))
        agent.end_streams_ok()
        await _until(lambda: any(isinstance(e, WorkloadApiStreamEndedError) for e in errors))
        n = len(got)
        await _until(lambda: len(got) > n)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        agent.refuse(grpc.StatusCode.INVALID_ARGUMENT)
        with pytest.raises(WorkloadApiInvalidArgumentError):
            async for _ in client.watch_jwt_bundles():
                pass
        agent.refuse(None)

        seen: list[X509Snapshot] = []
        async with AsyncX509Source(client, timeout=10) as source:
            source.add_listener(seen.append)
            assert source.svid.spiffe_id == SpiffeId.parse(DB)
            agent.set_x509([ca.issue_svid(WEB)], [ca.x509_bundle()])
            await _until(lambda: seen and source.svid.spiffe_id == SpiffeId.parse(WEB))
        async with AsyncJwtSource(address=agent.address, backoff=FAST) as jsource:
            tok = await jsource.fetch_jwt_svid("b")
            assert jsource.validate(tok.token, "b").spiffe_id == SpiffeId.parse(WEB)
        agent.refuse(grpc.StatusCode.PERMISSION_DENIED)
        with pytest.raises(WorkloadApiTimeoutError, match="last error"):
            await AsyncX509Source(address=agent.address, timeout=0.5, backoff=FAST).start()
        await client.close()

    asyncio.run(main())


async def _until(predicate: Any, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(0.02)


def test_picker_without_match_names_the_missing_id(agent: FakeAgent) -> None:
    with pytest.raises(WorkloadApiTimeoutError, match=r"no SVID for spiffe://example\.org/missing"):
        X509Source(address=agent.address, timeout=0.5, backoff=FAST, picker=pick_by_id("spiffe://example.org/missing"))
