"""Workload API benchmark: prints figures (not a test).

    .venv/bin/python bench/bench_workload_api.py [--requests 1000] [--streams 1000]

Measures, against a real agent endpoint (relay + attestation + grpc.aio servicer) running in a child
process with a warm cache:
1. FetchX509SVID first-response latency (p50/p99) on an open channel, next to a plain grpc.aio unary
   round trip over a Unix socket served by the same child process;
2. the same with a new connection per call (connect + SO_PEERCRED + attestation included);
3. the time until N open FetchX509SVID streams all hold a rotated SVID;
4. attestation cost per connection, as the agent pays it: facts captured at accept (SO_PEERCRED, pidfd,
   start time, executable, cgroup), the per-call check that the process is unchanged, the attestors (digest
   cached); without and with binary selectors (unix:path / unix:sha256) in use, which add the check that no
   other process holds the connection (sock_diag + a scan of /proc/<pid>/fd) at accept and at the call:
   skipping processes that run entirely as root or the agent's uid (what the agent does), and scanning
   every process (the cost on a host whose processes mostly run as other users).

    .venv/bin/python bench/bench_workload_api.py --only-attestation [--requests 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import grpc

from tessera.agent.attestors import attest, check_unchanged, default_attestors
from tessera.agent.bundles import parse_bundle_document
from tessera.agent.cache import EntryRecord, WorkloadCache, make_cached_svid
from tessera.agent.endpoint.holders import connection_verdict
from tessera.agent.endpoint.relay import capture_caller
from tessera.agent.endpoint.server import WorkloadEndpoint
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.testing import TestCA
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

ECHO = "/bench.Echo/Ping"


# ---------------------------------------------------------------------------------------------- server


async def serve(directory: str) -> None:
    ca = TestCA("example.org")
    cache = WorkloadCache("spiffe://example.org")
    bundle = parse_bundle_document("spiffe://example.org", ca.spiffe_bundle().to_document())
    cache.set_bundles({bundle.trust_domain_id: bundle})
    entry = EntryRecord("e1", "spiffe://example.org/bench", frozenset({f"unix:uid:{os.getuid()}"}))
    cache.apply_entries([entry])

    def issue() -> None:
        svid = ca.issue_svid(entry.spiffe_id, ttl=3600)
        cache.put_svids([make_cached_svid(entry, svid.cert_chain, svid.key_der())])

    issue()
    cache.mark_ready()
    endpoint = WorkloadEndpoint(f"{directory}/api.sock", cache, default_attestors())
    await endpoint.start()

    plain = grpc.aio.server()

    async def ping(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return request

    plain.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("bench.Echo", {"Ping": grpc.unary_unary_rpc_method_handler(ping)}),)
    )
    plain.add_insecure_port(f"unix:{directory}/plain.sock")
    await plain.start()

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR1, issue)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print("ready", flush=True)
    await stop.wait()
    await endpoint.stop(grace=0.5)
    await plain.stop(None)


# ---------------------------------------------------------------------------------------------- client


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def fmt(values: list[float]) -> str:
    ms = [v * 1000 for v in values]
    return f"p50 {pct(ms, 0.5):7.3f} ms   p99 {pct(ms, 0.99):7.3f} ms   (n={len(ms)})"


async def first_response(stub: WorkloadApiStub) -> wpb.X509SVIDResponse:
    call = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA)
    async for message in call:
        call.cancel()
        response: wpb.X509SVIDResponse = message
        return response
    raise RuntimeError("stream ended")


async def bench_latency(directory: str, n: int) -> None:
    api, plain = f"unix:{directory}/api.sock", f"unix:{directory}/plain.sock"
    async with grpc.aio.insecure_channel(api) as ach, grpc.aio.insecure_channel(plain) as pch:
        stub = WorkloadApiStub(ach)
        ping = pch.unary_unary(ECHO)
        for _ in range(50):  # warm up both paths
            await first_response(stub)
            await ping(b"x")
        fetch, unary = [], []
        for _ in range(n):
            t = time.perf_counter()
            await first_response(stub)
            fetch.append(time.perf_counter() - t)
            t = time.perf_counter()
            await ping(b"x")
            unary.append(time.perf_counter() - t)
    print("Open channel:")
    print(f"  FetchX509SVID first response   {fmt(fetch)}")
    print(f"  plain grpc.aio unary (UDS)     {fmt(unary)}")
    print(f"  ratio p50                      {pct(fetch, 0.5) / pct(unary, 0.5):.2f}x")

    new_fetch, new_unary = [], []
    for _ in range(max(50, n // 5)):
        t = time.perf_counter()
        async with grpc.aio.insecure_channel(api) as ch:
            await first_response(WorkloadApiStub(ch))
        new_fetch.append(time.perf_counter() - t)
        t = time.perf_counter()
        async with grpc.aio.insecure_channel(plain) as ch:
            await ch.unary_unary(ECHO)(b"x")
        new_unary.append(time.perf_counter() - t)
    print("New connection per call (connect + peer credentials + attestation):")
    print(f"  FetchX509SVID first response   {fmt(new_fetch)}")
    print(f"  plain grpc.aio unary (UDS)     {fmt(new_unary)}")


async def bench_fanout(directory: str, server: subprocess.Popen[bytes], n: int) -> None:
    api = f"unix:{directory}/api.sock"
    channels = [grpc.aio.insecure_channel(api) for _ in range(max(1, n // 100))]
    received: list[int] = [0] * n
    firsts = asyncio.Event()
    rotated = asyncio.Event()
    counts = {"first": 0, "rotated": 0}
    done_at = [0.0]

    async def watch(i: int) -> None:
        stub = WorkloadApiStub(channels[i % len(channels)])
        async for _ in stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA):
            received[i] += 1
            if received[i] == 1:
                counts["first"] += 1
                if counts["first"] == n:
                    firsts.set()
            elif received[i] == 2:
                counts["rotated"] += 1
                if counts["rotated"] == n:
                    done_at[0] = time.perf_counter()
                    rotated.set()

    tasks = [asyncio.create_task(watch(i)) for i in range(n)]
    t0 = time.perf_counter()
    await asyncio.wait_for(firsts.wait(), 120)
    opened = time.perf_counter() - t0
    await asyncio.sleep(0.5)
    t1 = time.perf_counter()
    server.send_signal(signal.SIGUSR1)  # the child re-issues the SVID: one cache change
    await asyncio.wait_for(rotated.wait(), 120)
    print(f"{n} open FetchX509SVID streams:")
    print(f"  all holding a first SVID after {opened:.3f} s")
    print(f"  all holding the rotated SVID   {done_at[0] - t1:.3f} s after the rotation was triggered")
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for ch in channels:
        await ch.close()


def _host_size() -> str:
    pids = [p for p in os.listdir("/proc") if p.isdigit()]
    fds = 0
    for pid in pids:
        try:
            fds += len(os.listdir(f"/proc/{pid}/fd"))
        except OSError:
            continue
    return f"{len(pids)} processes, {fds} descriptors"


async def bench_attestation(n: int) -> None:
    """Per real connection: accept-time capture, the call's checks and the attestors, in one process."""
    directory = tempfile.mkdtemp(prefix="tsbench-att-", dir="/tmp")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(f"{directory}/a.sock")
    listener.listen()
    me, everyone = frozenset({0, os.geteuid()}), frozenset()
    cases: list[tuple[str, bool, frozenset[int]]] = [
        ("no binary selector in use", False, me),
        ("binary selectors in use", True, me),
        ("binary selectors, scan every process", True, everyone),
    ]
    print(f"Attestation per connection ({_host_size()}; digest cached, as after a workload's first call):")
    for label, binary, trusted in cases:
        attestors = default_attestors(selector_in_use=lambda t, b=binary: b or not t.startswith("unix:"))
        samples = []
        for i in range(n + 20):
            client_end = socket.socket(socket.AF_UNIX)
            client_end.connect(f"{directory}/a.sock")
            ours, _ = listener.accept()
            t = time.perf_counter()
            process = capture_caller(ours)  # at accept
            if binary:
                assert connection_verdict(process, trusted_uids=trusted, self_pid=-1) is None
            check_unchanged(process)  # at the call
            if binary:
                assert connection_verdict(process, trusted_uids=trusted, self_pid=-1) is None
            await attest(process, attestors)
            if i >= 20:  # the first calls hash the interpreter once and warm the caches
                samples.append(time.perf_counter() - t)
            ours.close()
            client_end.close()
        print(f"  {label:38s} {fmt(samples)}   mean {statistics.mean(samples) * 1e6:.0f} us")
    listener.close()
    os.unlink(f"{directory}/a.sock")
    os.rmdir(directory)


async def client(args: argparse.Namespace) -> None:
    directory = tempfile.mkdtemp(prefix="tsbench-", dir="/tmp")
    server = subprocess.Popen([sys.executable, __file__, "--serve", directory], stdout=subprocess.PIPE)
    try:
        assert server.stdout is not None
        line = await asyncio.to_thread(server.stdout.readline)
        if line.strip() != b"ready":
            raise SystemExit("benchmark server did not start")
        print(f"Python {sys.version.split()[0]}, grpcio {grpc.__version__}, {os.cpu_count()} CPUs")
        if not args.only_attestation:
            await bench_latency(directory, args.requests)
            await bench_fanout(directory, server, args.streams)
        await bench_attestation(args.requests)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve", metavar="DIR", help=argparse.SUPPRESS)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--only-attestation", action="store_true", help="only the attestation cost per connection")
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
    else:
        asyncio.run(client(args))


if __name__ == "__main__":
    main()
