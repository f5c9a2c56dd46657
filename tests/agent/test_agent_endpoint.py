"""The Workload API endpoint with a real relay, real gRPC and an in-test cache."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import socket
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from agent_testlib import (
    FETCH_SCRIPT,
    NOBODY,
    add,
    bundle_of,
    entry,
    issue,
    jwt_minter,
    make_cache,
    run_as,
    socket_dir,
    start_endpoint,
    stop_endpoint,
)
from cryptography.hazmat.primitives.serialization import load_der_private_key
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tessera.agent.endpoint.relay import PeerRegistry, WorkloadRelay
from tessera.agent.errors import AgentError
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.svid import parse_der_certificates, spiffe_id_from_certificate
from tessera.sdk.testing import TestCA
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

ME = f"unix:uid:{os.getuid()}"


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def first(stream: AsyncIterator[Any]) -> Any:
    async for message in stream:
        return message
    raise AssertionError("stream ended")


async def code_of(call: Any) -> grpc.StatusCode:
    try:
        if hasattr(call, "__aiter__"):
            async for _ in call:
                pass
        else:
            await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    raise AssertionError("call succeeded")


def test_security_header_required() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)
    add(cache, ca, entry("e1", ca, "/me", [ME]))

    async def main() -> None:
        ep, path = await start_endpoint(cache)
        try:
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                stub = WorkloadApiStub(ch)
                assert await code_of(stub.FetchX509SVID(wpb.X509SVIDRequest())) == grpc.StatusCode.INVALID_ARGUMENT
                bad = (("workload.spiffe.io", "false"),)
                assert (
                    await code_of(stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=bad))
                    == grpc.StatusCode.INVALID_ARGUMENT
                )
                assert (
                    await code_of(stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["a"])))
                    == grpc.StatusCode.INVALID_ARGUMENT
                )
                assert (
                    await code_of(stub.ValidateJWTSVID(wpb.ValidateJWTSVIDRequest(audience="a", svid="x")))
                    == grpc.StatusCode.INVALID_ARGUMENT
                )
                assert await code_of(stub.FetchJWTBundles(wpb.JWTBundlesRequest())) == grpc.StatusCode.INVALID_ARGUMENT
        finally:
            await stop_endpoint(ep)

    run(main())


def test_first_message_identities_hints_and_federation() -> None:
    ca, other = TestCA("example.org"), TestCA("b.test")
    cache = make_cache(ca, other)
    add(
        cache,
        ca,
        entry("e1", ca, "/db", [ME], hint="db", created_at=1),
        entry("e2", ca, "/web", [ME, "unix:gid:0"], hint="web", created_at=2, federates_with=["spiffe://b.test"]),
        entry("e3", ca, "/other", ["unix:uid:4242"], created_at=0),
    )

    async def main() -> None:
        ep, path = await start_endpoint(cache)
        try:
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                stub = WorkloadApiStub(ch)
                resp = await first(stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA))
                assert [s.spiffe_id for s in resp.svids] == ["spiffe://example.org/db", "spiffe://example.org/web"]
                assert [s.hint for s in resp.svids] == ["db", "web"]
                svid = resp.svids[0]
                certs = parse_der_certificates(svid.x509_svid)
                assert str(spiffe_id_from_certificate(certs[0])) == "spiffe://example.org/db"
                key = load_der_private_key(svid.x509_svid_key, None)
                assert key.public_key().public_numbers() == certs[0].public_key().public_numbers()  # type: ignore[union-attr]
                assert parse_der_certificates(svid.bundle)[0] == ca.certificate
                assert set(resp.federated_bundles) == {"spiffe://b.test"}
                assert parse_der_certificates(resp.federated_bundles["spiffe://b.test"])[0] == other.certificate

                bundles = await first(stub.FetchX509Bundles(wpb.X509BundlesRequest(), metadata=SECURITY_METADATA))
                assert set(bundles.bundles) == {"spiffe://example.org", "spiffe://b.test"}
                jwtb = await first(stub.FetchJWTBundles(wpb.JWTBundlesRequest(), metadata=SECURITY_METADATA))
                assert set(jwtb.bundles) == {"spiffe://example.org", "spiffe://b.test"}
                assert ca.jwt_kid.encode() in jwtb.bundles["spiffe://example.org"]
        finally:
            await stop_endpoint(ep)

    run(main())


def test_no_identity_is_permission_denied_whatever_the_metadata_claims() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)
    add(cache, ca, entry("e1", ca, "/pid1", ["unix:uid:4242"]))

    async def main() -> None:
        ep, path = await start_endpoint(cache)
        try:
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                stub = WorkloadApiStub(ch)
                forged = (*SECURITY_METADATA, ("pid", "1"), ("x-peer-uid", "4242"), ("uid", "4242"))
                for metadata in (SECURITY_METADATA, forged):
                    assert (
                        await code_of(stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=metadata))
                        == grpc.StatusCode.PERMISSION_DENIED
                    )
                    assert (
                        await code_of(stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["x"]), metadata=metadata))
                        == grpc.StatusCode.PERMISSION_DENIED
                    )
                    assert (
                        await code_of(stub.FetchX509Bundles(wpb.X509BundlesRequest(), metadata=metadata))
                        == grpc.StatusCode.PERMISSION_DENIED
                    )
        finally:
            await stop_endpoint(ep)

    run(main())


def test_stream_pushes_rotation_bundle_change_and_ends_with_permission_denied() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)
    e1, e2 = entry("e1", ca, "/a", [ME], created_at=1), entry("e2", ca, "/b", [ME], created_at=2)
    add(cache, ca, e1, e2)

    async def main() -> None:
        ep, path = await start_endpoint(cache)
        try:
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                stub = WorkloadApiStub(ch)
                call = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA)
                stream = call.__aiter__()
                m1 = await stream.__anext__()
                assert len(m1.svids) == 2
                # rotation of one SVID: a complete new message
                rotated = issue(ca, e1)
                cache.put_svids([rotated])
                m2 = await stream.__anext__()
                assert m2.svids[0].x509_svid == rotated.chain_der and len(m2.svids) == 2
                # bundle change (a new CA appears in the bundle)
                ca2 = TestCA("example.org")
                merged = bundle_of(ca)
                merged = dataclasses.replace(merged, x509_authorities=(*merged.x509_authorities, ca2.certificate))
                cache.set_bundles({merged.trust_domain_id: merged})
                m3 = await stream.__anext__()
                assert len(parse_der_certificates(m3.svids[0].bundle)) == 2
                # entitlement change: one entry removed -> message without it
                cache.apply_entries([], ["e1"])
                m4 = await stream.__anext__()
                assert [s.spiffe_id for s in m4.svids] == ["spiffe://example.org/b"]
                # last identity removed -> PermissionDenied (never OK)
                cache.apply_entries([], ["e2"])
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await stream.__anext__()
                assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        finally:
            await stop_endpoint(ep)

    run(main())


def test_shutdown_ends_streams_with_unavailable() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)
    add(cache, ca, entry("e1", ca, "/a", [ME]))

    async def main() -> None:
        ep, path = await start_endpoint(cache)
        async with grpc.aio.insecure_channel("unix:" + path) as ch:
            stub = WorkloadApiStub(ch)
            stream = stub.FetchJWTBundles(wpb.JWTBundlesRequest(), metadata=SECURITY_METADATA).__aiter__()
            await stream.__anext__()
            stopping = asyncio.create_task(stop_endpoint(ep))
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stream.__anext__()
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            await stopping
        assert not os.path.exists(path)

    run(main())


def test_jwt_svid_minted_once_per_audience_set_and_validated_locally() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)
    add(cache, ca, entry("e1", ca, "/a", [ME], hint="a"), entry("e2", ca, "/b", [ME], created_at=5))
    mint = jwt_minter(ca)

    async def main() -> None:
        ep, path = await start_endpoint(cache, minter=mint)
        try:
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                stub = WorkloadApiStub(ch)
                r1 = await stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["x", "y"]), metadata=SECURITY_METADATA)
                assert [s.spiffe_id for s in r1.svids] == ["spiffe://example.org/a", "spiffe://example.org/b"]
                r2 = await stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["y", "x"]), metadata=SECURITY_METADATA)
                assert r2.svids[0].svid == r1.svids[0].svid
                assert len(mint.calls) == 2  # type: ignore[attr-defined]
                r3 = await stub.FetchJWTSVID(
                    wpb.JWTSVIDRequest(audience=["z"], spiffe_id="spiffe://example.org/b"), metadata=SECURITY_METADATA
                )
                assert [s.spiffe_id for s in r3.svids] == ["spiffe://example.org/b"]
                assert (
                    await code_of(stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=[]), metadata=SECURITY_METADATA))
                    == grpc.StatusCode.INVALID_ARGUMENT
                )
                assert (
                    await code_of(
                        stub.FetchJWTSVID(
                            wpb.JWTSVIDRequest(audience=["x"], spiffe_id="spiffe://example.org/nope"),
                            metadata=SECURITY_METADATA,
                        )
                    )
                    == grpc.StatusCode.PERMISSION_DENIED
                )
                token = r1.svids[0].svid
                v = await stub.ValidateJWTSVID(
                    wpb.ValidateJWTSVIDRequest(audience="x", svid=token), metadata=SECURITY_METADATA
                )
                assert v.spiffe_id == "spiffe://example.org/a"
                assert v.claims["sub"] == "spiffe://example.org/a"
                for bad in (
                    wpb.ValidateJWTSVIDRequest(audience="other", svid=token),
                    wpb.ValidateJWTSVIDRequest(audience="x", svid=token[:-4] + "AAAA"),
                    wpb.ValidateJWTSVIDRequest(audience="x", svid="garbage"),
                    wpb.ValidateJWTSVIDRequest(audience="", svid=token),
                ):
                    assert (
                        await code_of(stub.ValidateJWTSVID(bad, metadata=SECURITY_METADATA))
                        == grpc.StatusCode.INVALID_ARGUMENT
                    )
        finally:
            await stop_endpoint(ep)

    run(main())


def test_health_and_reflection() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)

    async def main() -> None:
        ep, path = await start_endpoint(cache)
        try:
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                health = health_pb2_grpc.HealthStub(ch)
                resp = await health.Check(health_pb2.HealthCheckRequest(service="SpiffeWorkloadAPI"))
                assert resp.status == health_pb2.HealthCheckResponse.SERVING
                refl = reflection_pb2_grpc.ServerReflectionStub(ch)
                call = refl.ServerReflectionInfo()
                await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
                listed = await call.read()
                names = {s.name for s in listed.list_services_response.service}
                assert "SpiffeWorkloadAPI" in names and "grpc.health.v1.Health" in names
                await call.write(reflection_pb2.ServerReflectionRequest(file_containing_symbol="SpiffeWorkloadAPI"))
                found = await call.read()
                assert found.file_descriptor_response.file_descriptor_proto
                await call.done_writing()
        finally:
            await stop_endpoint(ep)

    run(main())


def test_other_uid_child_process_is_told_apart_by_the_kernel() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)
    add(cache, ca, entry("nobody", ca, "/nobody", [f"unix:uid:{NOBODY}"]), entry("root", ca, "/root", [ME]))

    async def main() -> None:
        ep, path = await start_endpoint(cache)
        try:
            as_nobody = await asyncio.to_thread(run_as, NOBODY, FETCH_SCRIPT, path)
            assert as_nobody == "OK spiffe://example.org/nobody"
            as_root = await asyncio.to_thread(run_as, os.getuid(), FETCH_SCRIPT, path)
            assert as_root == "OK spiffe://example.org/root"
            cache.apply_entries([], ["nobody"])
            assert await asyncio.to_thread(run_as, NOBODY, FETCH_SCRIPT, path) == "ERR PERMISSION_DENIED"
        finally:
            await stop_endpoint(ep)

    run(main())


def test_relay_maps_bound_path_to_the_kernel_credentials() -> None:
    """The internal server sees the relay's bound path; the registry maps it to our SO_PEERCRED."""
    seen: list[str] = []
    registry = PeerRegistry()

    async def main() -> None:
        d = socket_dir()
        server = grpc.aio.server()

        async def echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            seen.append(context.peer())
            p = registry.lookup(context.peer())
            assert p is not None
            return f"{p.pid}:{p.uid}".encode()

        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.T", {"E": grpc.unary_unary_rpc_method_handler(echo)}),)
        )
        server.add_insecure_port(f"unix:{d}/internal.sock")
        await server.start()
        relay = WorkloadRelay(f"{d}/pub.sock", f"{d}/internal.sock", f"{d}/c", registry)
        await relay.start()
        try:
            assert oct(os.stat(f"{d}/c").st_mode & 0o777) == "0o700"
            async with grpc.aio.insecure_channel(f"unix:{d}/pub.sock") as ch:
                out = await ch.unary_unary("/t.T/E")(b"")
            assert out == f"{os.getpid()}:{os.getuid()}".encode()
            assert seen[0].startswith(f"unix:{d}/c/")
            assert os.lstat(f"{d}/pub.sock").st_mode & 0o7777 == 0o777  # every local user may connect
            second = WorkloadRelay(f"{d}/pub.sock", f"{d}/internal.sock", f"{d}/c2", registry)
            with pytest.raises(AgentError, match="another process is listening"):
                await second.start()
        finally:
            await relay.close()
        assert not os.path.exists(f"{d}/pub.sock")
        # a stale socket file (nobody listening) is replaced
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(f"{d}/pub.sock")
        stale.close()
        relay = WorkloadRelay(f"{d}/pub.sock", f"{d}/internal.sock", f"{d}/c3", registry)
        await relay.start()
        try:
            async with grpc.aio.insecure_channel(f"unix:{d}/pub.sock") as ch:
                assert await ch.unary_unary("/t.T/E")(b"") == f"{os.getpid()}:{os.getuid()}".encode()
        finally:
            await relay.close()
            await server.stop(None)
        assert sorted(os.listdir(d)) == ["c", "c2", "c3"]  # no socket and no staging directory left behind

    run(main())


def test_thousand_idle_connections_do_not_block_a_new_workload() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)
    add(cache, ca, entry("e1", ca, "/a", [ME]))

    async def main() -> None:
        # All from this test's uid: above the per-caller cap (tests/hardening/test_trust_limits_agent.py caps it).
        ep, path = await start_endpoint(cache, max_connections_per_caller=2000)
        idle: list[socket.socket] = []
        try:
            for i in range(1000):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                s.setblocking(False)
                await asyncio.get_running_loop().sock_connect(s, path)
                if i % 2:
                    # half of them start an HTTP/2 connection and then go quiet
                    s.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
                idle.append(s)
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                resp = await first(
                    WorkloadApiStub(ch).FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA)
                )
                assert resp.svids[0].spiffe_id == "spiffe://example.org/a"
        finally:
            for s in idle:
                s.close()
            await stop_endpoint(ep)

    run(main())


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))


def test_identity_without_svid_yet_waits_for_signing_then_unavailable_if_never() -> None:
    ca = TestCA("example.org")
    cache = make_cache(ca)
    e = entry("e1", ca, "/later", [ME])
    cache.apply_entries([e])  # entitled, but no SVID signed yet (e.g. evicted from the LRU)

    async def main() -> None:
        ep, path = await start_endpoint(cache, first_response_timeout=3.0)
        try:
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                stub = WorkloadApiStub(ch)
                stream = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA).__aiter__()
                pending = asyncio.ensure_future(stream.__anext__())
                await asyncio.wait_for(cache.sign_wanted.wait(), 30)  # the stream asked sync for the SVID
                assert [x.id for x in cache.entries_to_sign()] == ["e1"]
                cache.put_svids([issue(ca, e)])
                message = await asyncio.wait_for(pending, 30)
                assert message.svids[0].spiffe_id == "spiffe://example.org/later"
                # nobody signs this one: the caller is told to retry later, not refused
                cache.apply_entries([], ["e1"])
                cache.apply_entries([entry("e3", ca, "/never2", [ME])])
            async with grpc.aio.insecure_channel("unix:" + path) as ch:
                call = WorkloadApiStub(ch).FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA)
                assert await code_of(call) == grpc.StatusCode.UNAVAILABLE
        finally:
            await stop_endpoint(ep)

    run(main())
