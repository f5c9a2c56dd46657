"""Rate limits and stream caps: the pure logic over an injected clock, then the gRPC interceptors that apply
them (and record metrics) on real aio servers over Unix sockets."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tessera.agent.limits import ConcurrencyLimiter, StreamLimitExceeded
from tessera.agent.metrics import AgentMetrics, WorkloadApiInterceptor
from tessera.server.limits import KeyedRateLimiter, TokenBucket
from tessera.server.metrics import NodeApiInterceptor, ServerMetrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_refills_evenly_up_to_burst() -> None:
    clock = Clock()
    limiter = KeyedRateLimiter(60, burst=5, clock=clock)
    assert all(limiter.check("10.0.0.1") == 0 for _ in range(5))
    wait = limiter.check("10.0.0.1")
    assert wait == pytest.approx(1.0)
    assert limiter.check("10.0.0.2") == 0  # keys are independent
    clock.now += 1.0
    assert limiter.check("10.0.0.1") == 0
    assert limiter.check("10.0.0.1") > 0
    clock.now += 3600
    assert all(limiter.check("10.0.0.1") == 0 for _ in range(5))  # never more than the burst
    assert limiter.check("10.0.0.1") > 0


def test_costs_larger_than_the_burst_never_pass_and_zero_disables() -> None:
    clock = Clock()
    limiter = KeyedRateLimiter(100, clock=clock)
    assert limiter.check("agent", 101) == float("inf")
    assert limiter.check("agent", 100) == 0
    off = KeyedRateLimiter(0, clock=clock)
    assert not off.enabled and all(off.check("x", 10**6) == 0 for _ in range(100))


def test_clock_stepping_back_mints_nothing() -> None:
    bucket = TokenBucket(capacity=2, refill_per_second=1, tokens=0, updated=100)
    assert bucket.take(1, 50) > 0  # earlier than the last update: no refill
    assert bucket.take(1, 101) == 0


def test_key_table_is_bounded() -> None:
    clock = Clock()
    limiter = KeyedRateLimiter(60, clock=clock, max_keys=100)
    for i in range(1000):
        limiter.check(f"10.0.{i // 256}.{i % 256}")
    assert len(limiter) <= 100


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 20)), max_size=60), st.integers(1, 120))
def test_never_more_than_burst_plus_refill(steps: list[tuple[float, int]], per_minute: int) -> None:
    """Over any run, what passes is at most the burst plus what the elapsed time refilled."""
    clock = Clock()
    limiter = KeyedRateLimiter(per_minute, clock=clock)
    start = clock.now
    passed = 0
    for delay, cost in steps:
        clock.now += delay
        if limiter.check("k", cost) == 0:
            passed += cost
    assert passed <= per_minute + (clock.now - start) * per_minute / 60 + 1e-6


def test_concurrency_limiter() -> None:
    limiter = ConcurrencyLimiter(2)
    with limiter.hold(1000), limiter.hold(1000):
        with pytest.raises(StreamLimitExceeded, match="already holds 2"):
            limiter.acquire(1000)
        limiter.acquire(0)  # another caller is not affected
        limiter.release(0)
        assert limiter.total == 2
    assert limiter.open_count(1000) == 0 and limiter.total == 0
    unlimited = ConcurrencyLimiter(0)
    for _ in range(10_000):
        unlimited.acquire("x")
    assert unlimited.total == 10_000


# ------------------------------------------------------------------------------------ the interceptors


def _handler(path: str, kind: str, behavior: Any) -> grpc.GenericRpcHandler:
    identity = (lambda b: b), (lambda b: b)
    make = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }[kind]
    handler = make(behavior, request_deserializer=identity[0], response_serializer=identity[1])
    service, method = path.strip("/").split("/")
    return grpc.method_handlers_generic_handler(service, {method: handler})


async def _serve(interceptor: Any, handlers: list[grpc.GenericRpcHandler]) -> tuple[grpc.aio.Server, str, str]:
    directory = tempfile.mkdtemp(prefix="thlim-", dir="/tmp")
    server = grpc.aio.server(interceptors=[interceptor])
    server.add_generic_rpc_handlers(handlers)
    server.add_insecure_port(f"unix:{directory}/s.sock")
    await server.start()
    return server, f"unix:{directory}/s.sock", directory


class FakePeers:
    def __init__(self, address: str) -> None:
        self.address = address

    def lookup(self, peer: str) -> Any:
        return type("Info", (), {"address": self.address, "leaf": None})()


def _sample(metrics: Any, name: str, labels: dict[str, str]) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return float(value or 0.0)


def test_node_interceptor_limits_attestation_per_address_and_counts_failures() -> None:
    async def scenario() -> None:
        metrics = ServerMetrics()
        limiter = KeyedRateLimiter(60, burst=2)
        interceptor = NodeApiInterceptor(metrics, FakePeers("192.0.2.7:40000"), attestation_limiter=limiter)

        async def attest(requests: Any, context: Any) -> None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "unknown join token")

        server, target, directory = await _serve(
            interceptor, [_handler("/tessera.node.v1.Node/Attest", "stream_stream", attest)]
        )
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                call = channel.stream_stream("/tessera.node.v1.Node/Attest")
                codes = []
                for _ in range(4):
                    try:
                        async for _msg in call(iter([b"x"]), timeout=10):
                            pass
                    except grpc.aio.AioRpcError as exc:
                        codes.append((exc.code(), exc.details()))
            assert [c for c, _ in codes] == [grpc.StatusCode.PERMISSION_DENIED] * 2 + [
                grpc.StatusCode.RESOURCE_EXHAUSTED
            ] * 2
            assert "192.0.2.7" in codes[2][1] and "retry in" in codes[2][1]
        finally:
            await server.stop(None)
            shutil.rmtree(directory, ignore_errors=True)
        assert _sample(metrics, "tessera_server_attestation_failures_total", {"reason": "permission_denied"}) == 2
        assert _sample(metrics, "tessera_server_attestation_failures_total", {"reason": "rate_limited"}) == 2
        assert _sample(metrics, "tessera_server_rate_limited_total", {"limit": "attestation"}) == 2
        denied = {"method": "Attest", "code": "PERMISSION_DENIED"}
        assert _sample(metrics, "tessera_server_node_rpcs_total", denied) == 2

    asyncio.run(scenario())


def test_workload_interceptor_caps_streams_per_uid_and_counts() -> None:
    async def scenario() -> None:
        metrics = AgentMetrics()
        limiter = ConcurrencyLimiter(2)
        interceptor = WorkloadApiInterceptor(metrics, lambda peer: 1234, limiter)
        release = asyncio.Event()

        async def fetch(request: Any, context: Any) -> AsyncIterator[bytes]:
            yield b"svid"
            await release.wait()

        async def jwt(request: Any, context: Any) -> bytes:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "no identity issued to this workload")
            return b""

        server, target, directory = await _serve(
            interceptor,
            [
                _handler("/SpiffeWorkloadAPI/FetchX509SVID", "unary_stream", fetch),
                _handler("/SpiffeWorkloadAPI/FetchJWTSVID", "unary_unary", jwt),
            ],
        )
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stream = channel.unary_stream("/SpiffeWorkloadAPI/FetchX509SVID")
                calls = [stream(b"", timeout=20) for _ in range(2)]
                for call in calls:
                    assert await call.read() == b"svid"
                assert _sample(metrics, "tessera_agent_workload_api_streams_open", {"method": "FetchX509SVID"}) == 2
                third = stream(b"", timeout=20)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await third.read()
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "per-caller limit" in (info.value.details() or "")
                with pytest.raises(grpc.aio.AioRpcError):
                    await channel.unary_unary("/SpiffeWorkloadAPI/FetchJWTSVID")(b"", timeout=10)
                release.set()
                for call in calls:
                    await call.code()
            for _ in range(100):
                if limiter.total == 0:
                    break
                await asyncio.sleep(0.05)
            assert limiter.total == 0
        finally:
            await server.stop(None)
            shutil.rmtree(directory, ignore_errors=True)
        assert _sample(metrics, "tessera_agent_stream_limit_refusals_total", {}) == 1
        assert _sample(metrics, "tessera_agent_workload_attestation_failures_total", {"reason": "no_identity"}) == 1
        assert _sample(metrics, "tessera_agent_workload_attestation_failures_total", {"reason": "stream_limit"}) == 1
        assert _sample(metrics, "tessera_agent_workload_api_streams_open", {"method": "FetchX509SVID"}) == 0
        count = _sample(metrics, "tessera_agent_workload_api_latency_seconds_count", {"method": "FetchX509SVID"})
        assert count == 2

    asyncio.run(scenario())
