"""gRPC over SPIFFE mutual TLS: real servers and channels, unary and streaming, sync and aio; authorization;
foreign trust domains; rotation under traffic with SVIDs served by a Workload API double."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from sdk_rt_fakeagent import FakeAgent, wait_for

from tessera.sdk.bundle import BundleSet, X509Bundle
from tessera.sdk.grpc import (
    AsyncSpiffeChannel,
    AsyncSpiffeServerInterceptor,
    SpiffeChannel,
    SpiffeServerInterceptor,
    current_peer_id,
    peer_spiffe_id,
    server_credentials,
)
from tessera.sdk.source import StaticX509Source, X509Source
from tessera.sdk.svid import X509Svid
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import authorize_id, authorize_member_of
from tessera.sdk.workloadapi import BackoffPolicy

SERVER_ID = "spiffe://example.org/api"
CLIENT_ID = "spiffe://example.org/client"
DNS = "api.example.internal"
FAST = BackoffPolicy(initial=0.05, maximum=0.3)


class Recorder:
    def __init__(self) -> None:
        self.serials: set[int] = set()
        self.lock = threading.Lock()

    def record(self, context: Any) -> None:
        pem = context.auth_context()["x509_pem_cert"][0]
        with self.lock:
            self.serials.add(x509.load_pem_x509_certificate(pem).serial_number)


def sync_handlers(rec: Recorder) -> grpc.GenericRpcHandler:
    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        rec.record(context)
        assert current_peer_id() == peer_spiffe_id(context)
        return f"{current_peer_id()}:".encode() + request

    def stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        count = int(request)
        for i in range(count):
            yield f"{current_peer_id()}:{i}".encode()
            if count > 10:
                time.sleep(0.02)

    return grpc.method_handlers_generic_handler(
        "test.Echo",
        {"Unary": grpc.unary_unary_rpc_method_handler(unary), "Stream": grpc.unary_stream_rpc_method_handler(stream)},
    )


def start_sync_server(source: Any, interceptor: grpc.ServerInterceptor, rec: Recorder) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), interceptors=[interceptor])
    server.add_generic_rpc_handlers((sync_handlers(rec),))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(source))
    server.start()
    return server, port


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


@pytest.fixture
def server(ca: TestCA) -> Iterator[tuple[int, Recorder]]:
    rec = Recorder()
    source = StaticX509Source(ca.issue_svid(SERVER_ID, dns_names=[DNS]), ca.x509_bundle())
    srv, port = start_sync_server(source, SpiffeServerInterceptor(authorize_id(CLIENT_ID)), rec)
    yield port, rec
    srv.stop(0)


def test_unary_and_streaming(ca: TestCA, server: tuple[int, Recorder]) -> None:
    port, _ = server
    client = StaticX509Source(ca.issue_svid(CLIENT_ID), ca.x509_bundle())
    with SpiffeChannel(f"127.0.0.1:{port}", client, server_name=DNS) as channel:
        unary = channel.unary_unary("/test.Echo/Unary")
        assert unary(b"hi", timeout=10) == f"{CLIENT_ID}:hi".encode()
        response, call = unary.with_call(b"x", timeout=10)
        assert response.endswith(b"x") and call.code() == grpc.StatusCode.OK
        assert list(channel.unary_stream("/test.Echo/Stream")(b"3", timeout=10)) == [
            f"{CLIENT_ID}:{i}".encode() for i in range(3)
        ]


def test_unauthorized_caller_gets_permission_denied(ca: TestCA, server: tuple[int, Recorder]) -> None:
    port, _ = server
    mallory = StaticX509Source(ca.issue_svid("spiffe://example.org/mallory"), ca.x509_bundle())
    with SpiffeChannel(f"127.0.0.1:{port}", mallory, server_name=DNS) as channel:
        with pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "mallory" in (err.value.details() or "")
        with pytest.raises(grpc.RpcError) as err:
            list(channel.unary_stream("/test.Echo/Stream")(b"3", timeout=10))
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_foreign_trust_domain_and_wrong_server_name_are_refused(ca: TestCA, server: tuple[int, Recorder]) -> None:
    port, _ = server
    foreign = TestCA("other.org")
    stranger = StaticX509Source(foreign.issue_svid(CLIENT_ID.replace("example.org", "other.org")),
                                BundleSet([ca.x509_bundle(), foreign.x509_bundle()]))
    with SpiffeChannel(f"127.0.0.1:{port}", stranger, server_name=DNS) as channel, pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE  # the handshake itself fails
    client = StaticX509Source(ca.issue_svid(CLIENT_ID), ca.x509_bundle())
    with SpiffeChannel(f"127.0.0.1:{port}", client, server_name="someone-else.internal") as channel, \
            pytest.raises(grpc.RpcError) as err:
        channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with pytest.raises(ValueError, match="DNS SAN"):
        SpiffeChannel(f"127.0.0.1:{port}", client, server_name="")


def test_forged_id_from_other_trust_domain_is_denied(ca: TestCA) -> None:
    foreign = TestCA("other.org")
    bundles = BundleSet([ca.x509_bundle(), foreign.x509_bundle()])
    source = StaticX509Source(ca.issue_svid(SERVER_ID, dns_names=[DNS]), bundles)
    srv, port = start_sync_server(source, SpiffeServerInterceptor(authorize_id(CLIENT_ID), source), Recorder())
    try:
        forged = foreign.issue_leaf(CLIENT_ID)
        forger = StaticX509Source(X509Svid.from_chain(forged.cert_chain, forged.private_key), bundles)
        with SpiffeChannel(f"127.0.0.1:{port}", forger, server_name=DNS) as channel, \
                pytest.raises(grpc.RpcError) as err:
            channel.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "own trust domain" in (err.value.details() or "")
        honest = StaticX509Source(ca.issue_svid(CLIENT_ID), bundles)
        with SpiffeChannel(f"127.0.0.1:{port}", honest, server_name=DNS) as channel:
            assert channel.unary_unary("/test.Echo/Unary")(b"ok", timeout=10).endswith(b"ok")
    finally:
        srv.stop(0)


def test_aio_server_and_channel(ca: TestCA) -> None:
    async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return f"{current_peer_id()}:".encode() + request

    async def stream(request: bytes, context: grpc.aio.ServicerContext) -> Any:
        for i in range(int(request)):
            yield f"{current_peer_id()}:{i}".encode()

    async def main() -> None:
        source = StaticX509Source(ca.issue_svid(SERVER_ID, dns_names=[DNS]), ca.x509_bundle())
        server = grpc.aio.server(interceptors=[AsyncSpiffeServerInterceptor(authorize_member_of("example.org"))])
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        }),))
        port = server.add_secure_port("127.0.0.1:0", server_credentials(source))
        await server.start()
        client = StaticX509Source(ca.issue_svid(CLIENT_ID), ca.x509_bundle())
        async with AsyncSpiffeChannel(f"127.0.0.1:{port}", client, server_name=DNS) as channel:
            assert await channel.unary_unary("/test.Echo/Unary")(b"a", timeout=10) == f"{CLIENT_ID}:a".encode()
            got = [m async for m in channel.unary_stream("/test.Echo/Stream")(b"2", timeout=10)]
            assert got == [f"{CLIENT_ID}:0".encode(), f"{CLIENT_ID}:1".encode()]
            # The client rotates: the next call goes over a new channel with the new SVID.
            client.set(ca.issue_svid("spiffe://example.org/client2"))
            assert (await channel.unary_unary("/test.Echo/Unary")(b"b", timeout=10)).startswith(
                b"spiffe://example.org/client2:"
            )
        outsider_ca = TestCA("other.org")
        outsider = StaticX509Source(outsider_ca.issue_svid("spiffe://other.org/x"),
                                    BundleSet([ca.x509_bundle(), outsider_ca.x509_bundle()]))
        server_multi = StaticX509Source(ca.issue_svid(SERVER_ID, dns_names=[DNS]),
                                        BundleSet([ca.x509_bundle(), outsider_ca.x509_bundle()]))
        source.set(server_multi.svid, server_multi.bundles)
        async with AsyncSpiffeChannel(f"127.0.0.1:{port}", outsider, server_name=DNS) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary("/test.Echo/Unary")(b"a", timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.aio.AioRpcError) as err:
                async for _ in channel.unary_stream("/test.Echo/Stream")(b"2", timeout=10):
                    pass
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        await server.stop(0)

    asyncio.run(main())


def test_rotation_under_traffic(ca: TestCA) -> None:
    """Two workloads get SVIDs from their own Workload API; across an SVID rotation and then a CA rotation,
    new connections use the new SVIDs, an existing stream keeps flowing and no request fails; once the old CA
    has left the bundle, a chain from it is refused."""
    server_agent, client_agent = FakeAgent(), FakeAgent()
    server_agent.set_x509([ca.issue_svid(SERVER_ID, dns_names=[DNS], ttl=600)], [ca.x509_bundle()])
    client_agent.set_x509([ca.issue_svid(CLIENT_ID, ttl=600)], [ca.x509_bundle()])
    server_agent.start()
    client_agent.start()
    rec = Recorder()
    server_src = X509Source(address=server_agent.address, backoff=FAST)
    client_src = X509Source(address=client_agent.address, backoff=FAST)
    srv, port = start_sync_server(server_src, SpiffeServerInterceptor(authorize_id(CLIENT_ID)), rec)
    channel = SpiffeChannel(f"127.0.0.1:{port}", client_src, server_name=DNS)
    failures: list[BaseException] = []
    successes = [0]
    stop = threading.Event()

    def traffic() -> None:
        unary = channel.unary_unary("/test.Echo/Unary")
        while not stop.is_set():
            try:
                assert unary(b"ping", timeout=10).endswith(b"ping")
                successes[0] += 1
            except BaseException as exc:
                failures.append(exc)

    streamed: list[bytes] = []

    def long_stream() -> None:
        try:
            for message in channel.unary_stream("/test.Echo/Stream")(b"100000", timeout=120):
                streamed.append(message)
                if stop.is_set():
                    break
        except BaseException as exc:
            failures.append(exc)

    workers = [threading.Thread(target=traffic) for _ in range(3)] + [threading.Thread(target=long_stream)]
    try:
        for w in workers:
            w.start()
        wait_for(lambda: successes[0] > 20 and len(streamed) > 5, what="initial traffic")

        def rotate(issuer: TestCA, bundle: X509Bundle) -> None:
            server_agent.set_x509([issuer.issue_svid(SERVER_ID, dns_names=[DNS], ttl=600)], [bundle])
            client_agent.set_x509([issuer.issue_svid(CLIENT_ID, ttl=600)], [bundle])
            wait_for(lambda: client_src.svid.leaf.issuer == issuer.certificate.subject
                     and server_src.svid.leaf.issuer == issuer.certificate.subject, what="sources updated")
            n = successes[0]
            wait_for(lambda: successes[0] > n + 20, what="traffic after rotation")

        # 1: plain SVID rotation under the same CA.
        rotate(ca, ca.x509_bundle())
        # 2: CA rotation: the new CA is published first, SVIDs move to it, then the old CA leaves.
        new_ca = TestCA("example.org")
        both = X509Bundle(ca.trust_domain, (ca.certificate, new_ca.certificate))
        rotate(ca, both)
        rotate(new_ca, both)
        rotate(new_ca, new_ca.x509_bundle())
        streamed_before = len(streamed)
        wait_for(lambda: len(streamed) > streamed_before + 5, what="the old stream still flowing")
        stop.set()
        for w in workers:
            w.join(30)
        assert failures == []
        assert len(rec.serials) >= 4  # at least one new client certificate seen per rotation
        # The old CA is gone from the server's bundle: a chain from it no longer gets in.
        old = StaticX509Source(ca.issue_svid(CLIENT_ID), both)
        with SpiffeChannel(f"127.0.0.1:{port}", old, server_name=DNS) as stale, pytest.raises(grpc.RpcError) as err:
            stale.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        stop.set()
        channel.close()
        srv.stop(0)
        server_src.close()
        client_src.close()
        server_agent.stop()
        client_agent.stop()


def test_generated_stub_built_once_follows_rotation(ca: TestCA) -> None:
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server_src = StaticX509Source(ca.issue_svid(SERVER_ID, dns_names=[DNS]), ca.x509_bundle())
    client_src = StaticX509Source(ca.issue_svid(CLIENT_ID), ca.x509_bundle())
    srv = grpc.server(futures.ThreadPoolExecutor(4), interceptors=[SpiffeServerInterceptor(authorize_id(CLIENT_ID))])
    health_pb2_grpc.add_HealthServicer_to_server(health.HealthServicer(), srv)
    port = srv.add_secure_port("127.0.0.1:0", server_credentials(server_src))
    srv.start()
    try:
        with SpiffeChannel(f"127.0.0.1:{port}", client_src, server_name=DNS) as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            first = channel.current()
            serving = health_pb2.HealthCheckResponse.SERVING
            assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == serving
            client_src.set(ca.issue_svid(CLIENT_ID))
            server_src.set(ca.issue_svid(SERVER_ID, dns_names=[DNS]))
            assert stub.Check.future(health_pb2.HealthCheckRequest(), timeout=10).result().status == serving
            assert channel.current() is not first
    finally:
        srv.stop(0)
