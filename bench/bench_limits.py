"""Floods against real daemons: what the limits of issue 12 (items 5, 6, 7) hold, in memory and descriptors.

    .venv/bin/python bench/bench_limits.py [memory] [server-flood] [agent-flood] [--rounds 10] [--size-mib 60]
        [--connections 6000]

- ``memory``: ``--rounds`` rounds of 24 concurrent requests of ``--size-mib`` MiB to every node API method
  (without a client certificate, then with a valid agent SVID); prints the server's resident memory
  (VmRSS) before and after each round. Every request must be refused (RESOURCE_EXHAUSTED).
- ``server-flood``: ``--connections`` TCP connections to the node API (from 41 loopback addresses, as other
  hosts would: half never send a byte, half finish the TLS handshake and never send a request) while an
  attested agent keeps syncing; prints the server's descriptors before, during and after, and the agent's Sync
  latency meanwhile. Default caps: 1024 unauthenticated connections, 64 per source.
- ``agent-flood``: ``--connections`` connections from uid ``nobody`` to the Workload API socket (half silent,
  half sending one byte), while root fetches its SVID; prints the agent's descriptors before, during (and the
  peak, sampled every few milliseconds from the flood's start) and after, and the fetch latency meanwhile.

Run as root (the agent flood needs a second uid). Loopback only; everything started here is stopped at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from support.procs import (
    NOBODY,
    PY,
    SYSTEM_PYTHON,
    VENV_SITE,
    TesseraAgent,
    TesseraServer,
    as_user,
    short_dir,
    wait_for,
)

from tessera.agent.node import make_csr
from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc
from tessera.sdk.keys import generate_key, private_key_to_pem
from tessera.sdk.svid import certificates_to_pem, parse_der_certificates

TD = "limits.example.org"
NODE = "/tessera.node.v1.Node/"
METHODS = ("Attest", "RenewAgent", "Sync", "BatchSignX509SVID", "MintJWTSVID")
CONCURRENT = 24
OPTIONS = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@contextmanager
def peak_fds(pid: int) -> Iterator[list[int]]:
    """``[peak]``: the most descriptors ``pid`` held while the block ran, sampled every 2 ms in a thread (a burst
    of one accept wake-up is short; samples every 100 ms can miss it)."""
    peak = [fds(pid)]
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.002):
            with contextlib.suppress(FileNotFoundError):
                peak[0] = max(peak[0], fds(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join(5)


def attest(address: str, bundle_pem: bytes, token: str) -> grpc.ChannelCredentials:
    """Attests with a join token; the credentials of the new agent SVID."""
    key = generate_key("ec-p256")
    params = npb.AttestParams(attestor="join_token", payload=token.encode(), csr=make_csr(key))
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(bundle_pem)) as channel:
        responses = ngrpc.NodeStub(channel).Attest(iter([npb.AttestRequest(params=params)]), timeout=30)
        result = next(r for r in responses if r.HasField("result")).result
    chain = parse_der_certificates(result.svid.cert_chain)
    return grpc.ssl_channel_credentials(bundle_pem, private_key_to_pem(key), certificates_to_pem(chain))


def oversized_call(channel: grpc.Channel, method: str, payload: bytes) -> str:
    try:
        if method == "Attest":
            list(channel.stream_stream(NODE + method)(iter([payload]), timeout=60))
        else:
            channel.unary_unary(NODE + method)(payload, timeout=60)
    except grpc.RpcError as exc:
        return str(exc.code().name)
    return "OK"


@contextmanager
def running_server(root: Path, *extra: str) -> Iterator[TesseraServer]:
    server = TesseraServer(
        TD, data_dir=root / "server", admin_socket=str(root / "admin" / "api.sock"), log=root / "server.log",
        extra=extra,
    )  # fmt: skip
    try:
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        yield server
    finally:
        server.stop()


def memory(rounds: int, size_mib: int) -> None:
    root = short_dir("tbench-")
    try:
        with running_server(root) as server:
            bundle = (root / "bundle.pem").read_bytes()
            agent_creds = attest(server.address, bundle, server.join_token(f"spiffe://{TD}/host/bench"))
            payload = b"\0" * (size_mib << 20)
            time.sleep(1)  # the first attestation's allocations settle
            start = rss_mb(server.pid)
            print(f"memory: server RSS at start {start:.0f} MB; {rounds} rounds of {CONCURRENT} x {size_mib} MiB")
            for name, creds in (("no certificate", grpc.ssl_channel_credentials(bundle)), ("agent SVID", agent_creds)):
                for r in range(rounds):
                    codes: dict[str, int] = {}
                    with grpc.secure_channel(server.address, creds, options=OPTIONS) as channel:
                        methods = [METHODS[i % len(METHODS)] for i in range(CONCURRENT)]
                        with ThreadPoolExecutor(CONCURRENT) as pool:
                            for code in pool.map(lambda m: oversized_call(channel, m, payload), methods):
                                codes[code] = codes.get(code, 0) + 1
                    print(f"  {name}, round {r + 1}: RSS {rss_mb(server.pid):.0f} MB; answers {codes}")
            time.sleep(2)
            end = rss_mb(server.pid)
            print(f"memory: server RSS after all rounds {end:.0f} MB (grew {end - start:+.0f} MB)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


SOURCES = ["127.0.0.2", *(f"127.0.1.{i}" for i in range(1, 41))]  # one host, then 40 more: both caps


def _idle_tcp(address: tuple[str, int], count: int, tls: bool, bundle: bytes, held: list[socket.socket]) -> None:
    ctx = ssl.create_default_context(cadata=bundle.decode()) if tls else None
    if ctx is not None:
        ctx.check_hostname = False
    for i in range(count):
        s = socket.socket()
        try:
            s.bind((SOURCES[i % len(SOURCES)], 0))
            s.settimeout(5)
            s.connect(address)
            if ctx is not None:
                s = ctx.wrap_socket(s)
        except OSError:
            s.close()
            continue
        held.append(s)


def _latencies(probe: Callable[[], None], stop: threading.Event, out: list[float], errors: list[str]) -> None:
    while not stop.is_set():
        start = time.monotonic()
        try:
            probe()
            out.append(time.monotonic() - start)
        except Exception as exc:
            errors.append(type(exc).__name__)
        stop.wait(0.5)


def _summary(latencies: list[float], errors: list[str]) -> str:
    if not latencies:
        return f"no successful call; errors {errors}"
    return (
        f"{len(latencies)} calls, p50 {statistics.median(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms,"
        f" {len(errors)} failed"
    )


def server_flood(connections: int) -> None:
    root = short_dir("tbench-")
    try:
        with running_server(root) as server:
            bundle = (root / "bundle.pem").read_bytes()
            creds = attest(server.address, bundle, server.join_token(f"spiffe://{TD}/host/bench"))
            channel = grpc.secure_channel(server.address, creds)
            stub = ngrpc.NodeStub(channel)
            stub.Sync(npb.SyncRequest(), timeout=10)
            time.sleep(1)
            before = fds(server.pid)
            held: list[socket.socket] = []
            stop = threading.Event()
            latencies: list[float] = []
            errors: list[str] = []
            prober = threading.Thread(
                target=_latencies, args=(lambda: stub.Sync(npb.SyncRequest(), timeout=10), stop, latencies, errors)
            )
            prober.start()
            log_before = (root / "server.log").stat().st_size
            t0 = time.monotonic()
            _idle_tcp(("127.0.0.1", server.port), connections // 2, False, bundle, held)
            _idle_tcp(("127.0.0.1", server.port), connections - connections // 2, True, bundle, held)
            during = fds(server.pid)
            print(
                f"server-flood: {connections} connections made in {time.monotonic() - t0:.0f}s ({len(held)} connected "
                f"and not refused during the TLS handshake); server descriptors before {before}, during {during}"
            )
            time.sleep(12)  # past the handshake and first-request timeouts (10 s each)
            print(f"  after the timeouts, attacker still connected: descriptors {fds(server.pid)}")
            for s in held:
                s.close()
            after = wait_for(lambda: fds(server.pid) <= before + 2 and fds(server.pid), 60, "server descriptors")
            stop.set()
            prober.join()
            channel.close()
            grown = ((root / "server.log").stat().st_size - log_before) / 1024
            print(f"  after the flood: descriptors {after}; server log grew {grown:.0f} KiB")
            print(f"  agent Sync during the flood: {_summary(latencies, errors)}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


AGENT_FLOOD = """
import socket, sys, time
path, count = sys.argv[1], int(sys.argv[2])
held = []
for i in range(count):
    s = socket.socket(socket.AF_UNIX)
    try:
        s.connect(path)
        if i % 2:
            s.send(b"P")
    except OSError:
        s.close()
        continue
    held.append(s)
print(len(held), flush=True)
sys.stdin.read()  # hold them until told to go
"""


def agent_flood(connections: int) -> None:
    root = short_dir("tbench-")
    agent: TesseraAgent | None = None
    try:
        with running_server(root) as server:
            agent_id = f"spiffe://{TD}/host/agent"
            server.admin(
                "entry", "create", "--spiffe-id", f"spiffe://{TD}/root", "--parent-id", agent_id, "--selector",
                "unix:uid:0",
            )  # fmt: skip
            public = root / "public"
            agent = TesseraAgent(
                TD, servers=server.address, data_dir=root / "agent", socket=str(public / "api.sock"),
                log=root / "agent.log", trust_bundle=root / "bundle.pem", join_token=server.join_token(agent_id),
            )  # fmt: skip
            agent.start_and_wait()
            os.chmod(root, 0o755)
            fetch = [PY, "-m", "tessera.agent", "api", "fetch", "x509", "--socket", agent.socket]
            subprocess.run(fetch, check=True, capture_output=True, timeout=30)
            time.sleep(1)
            before = fds(agent.pid)
            log_before = (root / "agent.log").stat().st_size
            with peak_fds(agent.pid) as peak:
                flood = subprocess.Popen(
                    [*as_user(NOBODY), SYSTEM_PYTHON, "-S", "-c",
                     f"import site; site.addsitedir({VENV_SITE!r})\n" + AGENT_FLOOD, agent.socket, str(connections)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd="/tmp",
                )  # fmt: skip
                assert flood.stdout is not None and flood.stdin is not None
                opened = int(flood.stdout.readline() or 0)
                time.sleep(3)  # the agent has accepted (or refused) the backlog, below the 10 s timeout
            during = f"{fds(agent.pid)} (at most {peak[0]})"
            start = time.monotonic()
            ok = subprocess.run(fetch, capture_output=True, timeout=60).returncode == 0
            took = time.monotonic() - start
            print(
                f"agent-flood: nobody made {opened} of {connections} connections; agent descriptors before {before},"
                f" during {during}; root's fetch during the flood {'succeeded' if ok else 'FAILED'} in {took:.2f}s"
            )
            flood.stdin.close()
            flood.wait(30)
            after = wait_for(lambda: fds(agent.pid) <= before + 2 and fds(agent.pid), 60, "agent descriptors")
            grown = ((root / "agent.log").stat().st_size - log_before) / 1024
            print(f"  after the flood: agent descriptors {after}; agent log grew {grown:.0f} KiB")
    finally:
        if agent is not None:
            agent.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", nargs="*", default=["memory", "server-flood", "agent-flood"])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--size-mib", type=int, default=60)
    parser.add_argument("--connections", type=int, default=6000)
    args = parser.parse_args()
    for what in args.what:
        if what == "memory":
            memory(args.rounds, args.size_mib)
        elif what == "server-flood":
            server_flood(args.connections)
        elif what == "agent-flood":
            agent_flood(args.connections)
        else:
            parser.error(f"unknown benchmark {what!r}")


if __name__ == "__main__":
    main()
