"""Soak: a real server and a real agent under steady load with rotations, loopback only, bounded in time.

    .venv/bin/python bench/bench_soak.py [--duration 180] [--workloads 200] [--agents 50] [--rotate-every 60]

What runs for ``--duration`` seconds (after a short warm-up):

- ``--workloads`` workloads hold FetchX509SVID streams open on the agent's Workload API (each sees the SVIDs of
  the entries for its uid and every update pushed at rotation);
- probes measure Workload API latency: a new FetchX509SVID stream to its first response, and FetchJWTSVID,
  several times a second;
- ``--agents`` simulated agents (join-token attestation, then node API over mutual TLS) Sync every 5 s and
  re-sign their entries' SVIDs every ``--rotate-every`` seconds;
- every ``--rotate-every`` seconds the CA is rotated (``ca prepare`` then ``ca activate``): new bundles reach every
  stream, and the real agent's X509-SVIDs (life 2 min) rotate at about half life, i.e. every minute too.

Printed: failed requests (aim 0), p50/p99 Workload API latency, the number of stream updates delivered, and the
memory (RSS) of server and agent after warm-up and at the end (aim: flat).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.svid import parse_der_certificates
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

TD = "soak.example.org"
PY = sys.executable
SYNC_PERIOD = 5.0
WORKLOAD_ENTRIES = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stats:
    failures: dict[str, int] = field(default_factory=dict)
    x509_latency: list[float] = field(default_factory=list)
    jwt_latency: list[float] = field(default_factory=list)
    stream_updates: int = 0
    syncs: int = 0
    signed: int = 0
    rotations: int = 0

    def fail(self, what: str, exc: BaseException) -> None:
        code = exc.code().name if isinstance(exc, grpc.aio.AioRpcError) else type(exc).__name__
        key = f"{what}: {code}"
        self.failures[key] = self.failures.get(key, 0) + 1


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "soak")])
    csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    return key.private_bytes(encoding, fmt, serialization.NoEncryption())


class Processes:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.admin = str(root / "admin" / "api.sock")
        self.socket = str(root / "public" / "api.sock")
        self.procs: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [PY, "-m", "tessera.server", *args, "--socket", self.admin], capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise RuntimeError(f"tessera-server {' '.join(args)}: {out.stderr.strip()}")
        return out.stdout.strip()

    def _spawn(self, argv: list[str], log: str) -> subprocess.Popen[bytes]:
        with open(self.root / log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd="/tmp")
        self.procs.append(proc)
        return proc

    def _wait(self, check: list[str], proc: subprocess.Popen[bytes], what: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{what} exited; see {self.root}")
            if subprocess.run(check, capture_output=True, timeout=30).returncode == 0:
                return
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not become healthy")

    def start_server(self) -> subprocess.Popen[bytes]:
        proc = self._spawn(
            [
                PY, "-m", "tessera.server", "run", "--trust-domain", TD, "--data-dir", str(self.root / "server"),
                "--bind-address", f"127.0.0.1:{self.port}", "--socket", self.admin,
                "--default-x509-svid-ttl", "2m", "--log-level", "warning",
            ],
            "server.log",
        )  # fmt: skip
        self._wait([PY, "-m", "tessera.server", "healthcheck", "--socket", self.admin], proc, "server")
        return proc

    def start_agent(self, token: str) -> subprocess.Popen[bytes]:
        (self.root / "bundle.pem").write_text(self.cli("bundle", "show") + "\n")
        proc = self._spawn(
            [
                PY, "-m", "tessera.agent", "run", "--trust-domain", TD, "--server-address", f"127.0.0.1:{self.port}",
                "--trust-bundle", str(self.root / "bundle.pem"), "--data-dir", str(self.root / "agent"),
                "--socket", self.socket, "--join-token", token, "--sync-interval", "5s", "--log-level", "warning",
            ],
            "agent.log",
        )  # fmt: skip
        self._wait([PY, "-m", "tessera.agent", "healthcheck", "--socket", self.socket], proc, "agent")
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(20)
            if proc.poll() is None:
                proc.kill()


# ------------------------------------------------------------------------------------------ load


async def workload_stream(socket_path: str, stats: Stats, stop: asyncio.Event) -> None:
    """One workload: a FetchX509SVID stream held open; reconnects (counting the failure) if it breaks."""
    while not stop.is_set():
        async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
            call = WorkloadApiStub(channel).FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA)
            try:
                stopper = asyncio.ensure_future(stop.wait())
                while not stop.is_set():
                    read = asyncio.ensure_future(call.read())
                    done, _ = await asyncio.wait([read, stopper], return_when=asyncio.FIRST_COMPLETED)
                    if read not in done:
                        read.cancel()
                        break
                    message = read.result()
                    if message is grpc.aio.EOF:
                        raise RuntimeError("stream ended")
                    stats.stream_updates += 1
                stopper.cancel()
                call.cancel()
            except (grpc.aio.AioRpcError, RuntimeError) as exc:
                if not stop.is_set():
                    stats.fail("workload stream", exc)
                    await asyncio.sleep(0.5)


async def latency_probe(socket_path: str, stats: Stats, stop: asyncio.Event) -> None:
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = WorkloadApiStub(channel)
        while not stop.is_set():
            start = time.perf_counter()
            try:
                call = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=30)
                await call.read()
                call.cancel()
                stats.x509_latency.append(time.perf_counter() - start)
            except grpc.aio.AioRpcError as exc:
                stats.fail("x509 probe", exc)
            start = time.perf_counter()
            try:
                await stub.FetchJWTSVID(
                    wpb.JWTSVIDRequest(audience=["soak"]), metadata=SECURITY_METADATA, timeout=30
                )
                stats.jwt_latency.append(time.perf_counter() - start)
            except grpc.aio.AioRpcError as exc:
                stats.fail("jwt probe", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)


@dataclass
class SimAgent:
    key: ec.EllipticCurvePrivateKey
    chain_pem: bytes
    spiffe_id: str
    entry_ids: list[str] = field(default_factory=list)


async def attest(address: str, roots: bytes, token: str) -> SimAgent:
    key = ec.generate_private_key(ec.SECP256R1())
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(roots)) as channel:
        stub = ngrpc.NodeStub(channel)  # type: ignore[no-untyped-call]
        call = stub.Attest(timeout=30)
        await call.write(npb.AttestRequest(params=npb.AttestParams(attestor="join_token", payload=token.encode(),
                                                                   csr=_csr(key))))  # fmt: skip
        response = await call.read()
        await call.done_writing()
    chain = parse_der_certificates(response.result.svid.cert_chain)
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    return SimAgent(key, pem, response.result.svid.spiffe_id)


async def sim_agent(agent: SimAgent, address: str, roots: bytes, rotate_every: float, stats: Stats,
                    stop: asyncio.Event) -> None:  # fmt: skip
    creds = grpc.ssl_channel_credentials(roots, _pem(agent.key), agent.chain_pem)
    async with grpc.aio.secure_channel(address, creds) as channel:
        stub = ngrpc.NodeStub(channel)  # type: ignore[no-untyped-call]
        entries_rev = bundles_rev = 0
        last_sign = 0.0
        await asyncio.sleep(SYNC_PERIOD * secrets.randbelow(1000) / 1000)  # spread the fleet
        while not stop.is_set():
            try:
                response = await stub.Sync(
                    npb.SyncRequest(entries_revision=entries_rev, bundles_revision=bundles_rev), timeout=30
                )
                entries_rev, bundles_rev = response.entries_revision, response.bundles_revision
                stats.syncs += 1
                if time.monotonic() - last_sign >= rotate_every:
                    requests = [npb.X509SignRequest(entry_id=e, csr=_csr(ec.generate_private_key(ec.SECP256R1())))
                                for e in agent.entry_ids]  # fmt: skip
                    signed = await stub.BatchSignX509SVID(npb.BatchSignX509SVIDRequest(requests=requests), timeout=60)
                    stats.signed += len(signed.results)
                    last_sign = time.monotonic()
            except grpc.aio.AioRpcError as exc:
                stats.fail("simulated agent", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SYNC_PERIOD)


async def rotator(procs: Processes, every: float, stats: Stats, stop: asyncio.Event) -> None:
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
        if stop.is_set():
            return
        try:
            await asyncio.to_thread(procs.cli, "ca", "prepare")
            await asyncio.to_thread(procs.cli, "ca", "activate")
            stats.rotations += 1
        except RuntimeError as exc:
            stats.fail("CA rotation", exc)


async def wait_for_identities(socket_path: str) -> None:
    """Until the agent has synced the workload entries and serves all of their SVIDs."""
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(f"unix:{socket_path}") as channel:
        stub = WorkloadApiStub(channel)
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.aio.AioRpcError):
                call = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=10)
                message = await call.read()
                call.cancel()
                if message is not grpc.aio.EOF and len(message.svids) == WORKLOAD_ENTRIES:
                    return
            await asyncio.sleep(0.5)
    raise RuntimeError("the agent never served the workload SVIDs")


def rss_mb(proc: subprocess.Popen[bytes]) -> float:
    return psutil.Process(proc.pid).memory_info().rss / 2**20


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def soak(args: argparse.Namespace, procs: Processes) -> int:
    server = procs.start_server()
    agent_id = f"spiffe://{TD}/host/soak"
    agent = procs.start_agent(procs.cli("token", "generate", "--spiffe-id", agent_id).splitlines()[-1].strip())
    address = f"127.0.0.1:{procs.port}"
    with grpc.insecure_channel(f"unix:{procs.admin}") as admin_channel:
        admin = agrpc.AdminStub(admin_channel)  # type: ignore[no-untyped-call]
        uid = os.getuid()
        for i in range(WORKLOAD_ENTRIES):
            admin.CreateEntry(apb.CreateEntryRequest(entry=npb.Entry(
                spiffe_id=f"spiffe://{TD}/workload/{i}", parent_id=agent_id, x509_svid_ttl=120,
                selectors=[npb.Selector(type="unix", value=f"uid:{uid}")])))  # fmt: skip
        roots = procs.cli("bundle", "show").encode() + b"\n"
        tokens = [admin.CreateJoinToken(apb.CreateJoinTokenRequest()).token for _ in range(args.agents)]
        sims = await asyncio.gather(*(attest(address, roots, t) for t in tokens))
        for n, sim in enumerate(sims):
            for j in range(2):
                created = admin.CreateEntry(apb.CreateEntryRequest(entry=npb.Entry(
                    spiffe_id=f"spiffe://{TD}/sim/{n}/w{j}", parent_id=sim.spiffe_id, x509_svid_ttl=120,
                    selectors=[npb.Selector(type="unix", value=f"uid:{1000 + j}")])))  # fmt: skip
                sim.entry_ids.append(created.entry.id)

    await wait_for_identities(procs.socket)
    stats = Stats()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(workload_stream(procs.socket, stats, stop)) for _ in range(args.workloads)]
    tasks += [asyncio.create_task(latency_probe(procs.socket, stats, stop)) for _ in range(2)]
    tasks += [asyncio.create_task(sim_agent(s, address, roots, args.rotate_every, stats, stop)) for s in sims]
    warmup = min(20.0, args.duration / 4)
    print(f"warming up {warmup:.0f}s: {args.workloads} streams, {args.agents} simulated agents ...", flush=True)
    await asyncio.sleep(warmup)
    warmup_failures = dict(stats.failures)
    stats.failures.clear()
    stats.x509_latency.clear()
    stats.jwt_latency.clear()
    mem_start = (rss_mb(server), rss_mb(agent))
    tasks.append(asyncio.create_task(rotator(procs, args.rotate_every, stats, stop)))
    started = time.monotonic()
    samples = []
    while time.monotonic() - started < args.duration:
        await asyncio.sleep(min(10.0, args.duration - (time.monotonic() - started)))
        samples.append((time.monotonic() - started, rss_mb(server), rss_mb(agent)))
        print(f"  t={samples[-1][0]:5.0f}s server {samples[-1][1]:6.1f} MB  agent {samples[-1][2]:6.1f} MB  "
              f"updates {stats.stream_updates}  failures {sum(stats.failures.values())}", flush=True)  # fmt: skip
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    mem_end = (rss_mb(server), rss_mb(agent))
    failed = sum(stats.failures.values())
    print()
    print(f"duration {args.duration:.0f}s after warm-up; {args.workloads} streams, {args.agents} simulated agents")
    print(f"CA rotations {stats.rotations}, stream updates delivered {stats.stream_updates}, "
          f"simulated syncs {stats.syncs}, SVIDs signed for simulated agents {stats.signed}")  # fmt: skip
    print(f"failed requests: {failed}" + (f" {stats.failures}" if failed else ""))
    if warmup_failures:
        print(f"(during warm-up: {warmup_failures})")
    for name, values in (("FetchX509SVID first response", stats.x509_latency), ("FetchJWTSVID", stats.jwt_latency)):
        print(f"Workload API {name}: n={len(values)} p50 {percentile(values, 0.5) * 1000:.1f} ms  "
              f"p99 {percentile(values, 0.99) * 1000:.1f} ms")  # fmt: skip
    half = [s for s in samples if s[0] >= args.duration / 2]
    for i, name in ((0, "server"), (1, "agent")):
        late = statistics.mean(s[i + 1] for s in half) if half else mem_end[i]
        print(f"{name} RSS: {mem_start[i]:.1f} MB after warm-up -> {mem_end[i]:.1f} MB at end "
              f"({mem_end[i] - mem_start[i]:+.1f} MB; second-half mean {late:.1f} MB)")  # fmt: skip
    return 0 if failed == 0 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of load after warm-up (default 180)")
    parser.add_argument("--workloads", type=int, default=200)
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--rotate-every", type=float, default=60.0, help="seconds between CA rotations")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs) afterwards")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="tsoak-", dir="/tmp"))
    procs = Processes(root)
    try:
        return asyncio.run(soak(args, procs))
    finally:
        procs.stop()
        if args.keep:
            print("logs in", root)
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
