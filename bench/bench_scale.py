"""Scale: entry creation, a 10,000-entry first sync, unchanged syncs and 1,000 syncing agents, on SQLite and
PostgreSQL, through a real `tessera-server run` process.

    .venv/bin/python bench/bench_scale.py [--entries 20000] [--agents 1000] [--window 10] [--backend both]
    .venv/bin/python bench/bench_scale.py --entries 100000     # the full-size run (a few minutes)

For each backend a server process runs on a fresh datastore (SQLite file with its default FULL sync;
PostgreSQL in a private cluster started here with fsync on, over a Unix socket). The benchmark then:

1. creates ``--entries`` registration entries (batches of 500, the datastore's batch call) and reports the
   rate, plus the rate of single CreateEntry calls through the admin API for a sample;
2. attests an agent and times its first Sync of 10,000 authorized entries through the node API over mutual
   TLS, all pages (seconds, bytes on the wire);
3. times unchanged Syncs of that agent: server CPU per call (psutil over the server process) and latency;
4. attests ``--agents`` agents (10 entries each), lets each sync every 5 s for ``--window`` seconds and reports
   the server's CPU share;
5. runs `tessera-server entry show` over every entry and reports its time and peak memory.

Aims: unchanged sync <= 5 ms server time; 10,000-entry first sync <= 5 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from pgcluster import PgCluster  # type: ignore[import-not-found]

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc
from tessera.sdk.svid import parse_der_certificates, spiffe_id_from_certificate
from tessera.server.datastore import Datastore, RegistrationEntry, Selector
from tessera.server.datastore.postgres import PostgresDatastore
from tessera.server.datastore.sqlite import SqliteDatastore

TD = "bench.example.org"
BIG_AGENT_ENTRIES = 10_000
SMALL_AGENT_ENTRIES = 10
SYNC_PERIOD = 5.0
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
PY = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Results:
    backend: str
    entries: int = 0
    create_rate: float = 0.0
    admin_create_rate: float = 0.0
    first_sync_s: float = 0.0
    first_sync_bytes: int = 0
    first_sync_pages: int = 0
    first_sync_entries: int = 0
    unchanged_cpu_ms: float = 0.0
    unchanged_latency_ms: float = 0.0
    agents: int = 0
    agent_syncs: int = 0
    agent_errors: int = 0
    window_s: float = 0.0
    cpu_share: float = 0.0
    attest_s: float = 0.0
    show_s: float = 0.0
    show_lines: int = 0
    show_maxrss_mb: float = 0.0
    server_rss_mb: float = 0.0


# ---- the server process ---------------------------------------------------------------------------------------


class ServerProcess:
    def __init__(self, workdir: Path, datastore: str) -> None:
        self.port = free_port()
        self.sockdir = Path(tempfile.mkdtemp(prefix="tbs-", dir="/tmp"))
        self.admin = str(self.sockdir / "api.sock")
        self.log = workdir / "server.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [PY, "-m", "tessera.server", "run", "--trust-domain", TD, "--data-dir", str(workdir / "data"),
                 "--bind-address", f"127.0.0.1:{self.port}", "--socket", self.admin, "--datastore", datastore,
                 "--log-level", "warning",
                 # every simulated agent attests from 127.0.0.1: the per-address limit is for real fleets
                 "--attestation-rate-limit", "0"],
                stdout=out, stderr=subprocess.STDOUT, cwd="/tmp",
            )  # fmt: skip
        self.ps = psutil.Process(self.proc.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit("tessera-server exited:\n" + self.log.read_text(errors="replace"))
            if Path(self.admin).exists() and self._listening():
                return
            time.sleep(0.1)
        raise SystemExit("tessera-server did not start within 60 s")

    def _listening(self) -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", self.port)) == 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cpu(self) -> float:
        t = self.ps.cpu_times()
        return float(t.user + t.system)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self.sockdir, ignore_errors=True)


# ---- agents -----------------------------------------------------------------------------------------------------


@dataclass
class AgentIdentity:
    spiffe_id: str
    creds: grpc.ChannelCredentials


def _csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


async def attest(address: str, bundle_pem: bytes, token: str) -> AgentIdentity:
    key = ec.generate_private_key(ec.SECP256R1())
    request = npb.AttestRequest(params=npb.AttestParams(attestor="join_token", payload=token.encode(), csr=_csr(key)))
    async with grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(bundle_pem)) as channel:
        call = ngrpc.NodeStub(channel).Attest(timeout=60)  # type: ignore[no-untyped-call]
        await call.write(request)
        await call.done_writing()
        response = await call.read()
    chain = parse_der_certificates(response.result.svid.cert_chain)
    chain_pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())  # fmt: skip
    return AgentIdentity(
        str(spiffe_id_from_certificate(chain[0])), grpc.ssl_channel_credentials(bundle_pem, key_pem, chain_pem)
    )


async def full_sync(stub: ngrpc.NodeStub) -> tuple[int, int, int, int, int]:
    """All pages of a first sync: (entries, bytes, pages, entries revision, bundles revision)."""
    token, entries, size, pages = "", 0, 0, 0
    revision = bundles = 0
    while True:
        response = await stub.Sync(npb.SyncRequest(page_token=token, entries_revision=revision), timeout=120)
        pages += 1
        entries += len(response.entries)
        size += response.ByteSize()
        revision = response.entries_revision
        bundles = response.bundles_revision or bundles
        token = response.next_page_token
        if not token:
            return entries, size, pages, revision, bundles


def entries_for(parent: str, count: int, prefix: str) -> list[RegistrationEntry]:
    return [
        RegistrationEntry(
            id="",
            spiffe_id=f"spiffe://{TD}/{prefix}/wl-{i}",
            parent_id=parent,
            selectors=(Selector("unix", f"uid:{1000 + i % 50000}"), Selector("unix", f"gid:{i % 100}")),
            x509_svid_ttl=3600,
        )
        for i in range(count)
    ]


def create_all(store: Datastore, items: list[RegistrationEntry]) -> None:
    for start in range(0, len(items), 500):
        results = store.create_entries(items[start : start + 500])
        failed = [r for r in results if isinstance(r, Exception)]
        if failed:
            raise SystemExit(f"entry creation failed: {failed[0]}")


# ---- one backend ------------------------------------------------------------------------------------------------


async def run_backend(name: str, url: str, workdir: Path, args: argparse.Namespace) -> Results:
    res = Results(name)
    server = ServerProcess(workdir, url)
    store: Datastore = PostgresDatastore(url) if name == "postgresql" else SqliteDatastore(url)
    try:
        with grpc.insecure_channel(f"unix:{server.admin}") as admin_channel:
            admin = agrpc.AdminStub(admin_channel)  # type: ignore[no-untyped-call]
            bundle_pem = admin.GetBundle(apb.GetBundleRequest()).data
            big = await attest(server.address, bundle_pem, admin.CreateJoinToken(apb.CreateJoinTokenRequest()).token)

            # 1. creation rate (the big agent's 10,000 first, then other parents up to --entries)
            items = entries_for(big.spiffe_id, BIG_AGENT_ENTRIES, "big")
            rest = max(0, args.entries - BIG_AGENT_ENTRIES)
            items += [
                e
                for p in range(0, rest, 1000)
                for e in entries_for(f"spiffe://{TD}/tessera/agent/other/{p}", min(1000, rest - p), f"o{p}")
            ]
            started = time.perf_counter()
            create_all(store, items)
            res.create_rate = len(items) / (time.perf_counter() - started)
            sample = 300
            started = time.perf_counter()
            for i in range(sample):
                admin.CreateEntry(apb.CreateEntryRequest(entry=npb.Entry(
                    spiffe_id=f"spiffe://{TD}/admin/wl-{i}", parent_id=f"spiffe://{TD}/tessera/agent/admin",
                    selectors=[npb.Selector(type="unix", value=f"uid:{i}")])))  # fmt: skip
            res.admin_create_rate = sample / (time.perf_counter() - started)
            res.entries = len(items) + sample

        # 2. first sync of 10,000 authorized entries through the node API
        async with grpc.aio.secure_channel(server.address, big.creds, options=OPTIONS) as channel:
            stub = ngrpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            started = time.perf_counter()
            count, size, pages, revision, bundles = await full_sync(stub)
            res.first_sync_s = time.perf_counter() - started
            res.first_sync_entries, res.first_sync_bytes, res.first_sync_pages = count, size, pages
            if count != BIG_AGENT_ENTRIES:
                raise SystemExit(f"first sync returned {count} entries, expected {BIG_AGENT_ENTRIES}")

            # 3. unchanged syncs
            request = npb.SyncRequest(entries_revision=revision, bundles_revision=bundles)
            for _ in range(50):
                await stub.Sync(request, timeout=30)
            calls = args.unchanged_calls
            latencies = []
            cpu0 = server.cpu()
            for _ in range(calls):
                t0 = time.perf_counter()
                response = await stub.Sync(request, timeout=30)
                latencies.append(time.perf_counter() - t0)
                if response.full or response.entries:
                    raise SystemExit("an unchanged sync returned entries")
            res.unchanged_cpu_ms = (server.cpu() - cpu0) / calls * 1000
            res.unchanged_latency_ms = statistics.median(latencies) * 1000

        # 4. many agents, each syncing every 5 s
        if args.agents:
            await many_agents(server, store, bundle_pem, args, res)

        # 5. entry show over everything
        started = time.perf_counter()
        show = subprocess.Popen(
            [PY, "-m", "tessera.server", "entry", "show", "--socket", server.admin],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        peak = [0]
        watch = psutil.Process(show.pid)

        def sample_rss() -> None:
            while show.poll() is None:
                with contextlib.suppress(psutil.Error):
                    peak[0] = max(peak[0], watch.memory_info().rss)
                time.sleep(0.05)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        stdout, stderr = show.communicate(timeout=900)
        res.show_s = time.perf_counter() - started
        sampler.join()
        if show.returncode != 0:
            raise SystemExit(f"entry show failed: {stderr.decode(errors='replace')[:500]}")
        res.show_lines = stdout.count(b"\n")
        res.show_maxrss_mb = peak[0] / (1 << 20)
        res.server_rss_mb = server.ps.memory_info().rss / (1 << 20)
    finally:
        store.close()
        server.stop()
    return res


async def many_agents(
    server: ServerProcess, store: Datastore, bundle_pem: bytes, args: argparse.Namespace, res: Results
) -> None:
    tokens = [secrets.token_hex(16) for _ in range(args.agents)]
    for token in tokens:
        store.create_join_token(token, int(time.time()) + 3600)
    gate = asyncio.Semaphore(8)

    async def one(token: str) -> AgentIdentity:
        async with gate:
            return await attest(server.address, bundle_pem, token)

    started = time.perf_counter()
    agents = await asyncio.gather(*(one(t) for t in tokens))
    res.attest_s = time.perf_counter() - started
    items = [e for i, a in enumerate(agents) for e in entries_for(a.spiffe_id, SMALL_AGENT_ENTRIES, f"a{i}")]
    create_all(store, items)
    res.entries += len(items)
    res.agents = len(agents)
    stop_at = [float("inf")]
    counts = [0, 0]
    first_synced = [0]
    ready = asyncio.Event()

    async def agent_loop(identity: AgentIdentity) -> None:
        async with grpc.aio.secure_channel(server.address, identity.creds, options=OPTIONS) as channel:
            stub = ngrpc.NodeStub(channel)  # type: ignore[no-untyped-call]
            _, _, _, revision, bundles = await full_sync(stub)
            first_synced[0] += 1
            request = npb.SyncRequest(entries_revision=revision, bundles_revision=bundles)
            await ready.wait()
            await asyncio.sleep(random.uniform(0, SYNC_PERIOD))
            while time.monotonic() < stop_at[0]:
                try:
                    await stub.Sync(request, timeout=30)
                    counts[0] += 1
                except grpc.aio.AioRpcError:
                    counts[1] += 1
                await asyncio.sleep(SYNC_PERIOD)

    tasks = [asyncio.create_task(agent_loop(a)) for a in agents]
    # every agent makes its first (full) sync before the window opens
    while first_synced[0] < len(agents):
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        if failed:
            raise SystemExit(f"an agent's first sync failed: {failed[0].exception()}")
        await asyncio.sleep(0.2)
    cpu0, t0 = server.cpu(), time.monotonic()
    stop_at[0] = t0 + args.window
    ready.set()
    await asyncio.gather(*tasks)
    res.window_s = time.monotonic() - t0
    res.cpu_share = (server.cpu() - cpu0) / res.window_s
    res.agent_syncs, res.agent_errors = counts


# ---- report -----------------------------------------------------------------------------------------------------


def report(results: list[Results], args: argparse.Namespace) -> None:
    print(f"scale benchmark: Python {sys.version.split()[0]}, {psutil.cpu_count()} CPUs; entries={args.entries}, "
          f"agents={args.agents}, window={args.window:g}s")  # fmt: skip
    rows: list[tuple[str, Callable[[Results], str]]] = [
        ("entries in the store at the end", lambda r: f"{r.entries:,}"),
        ("entries created / s (datastore batches of 500)", lambda r: f"{r.create_rate:,.0f}"),
        ("entries created / s (admin CreateEntry, one by one)", lambda r: f"{r.admin_create_rate:,.0f}"),
        ("first sync, 10,000 entries: seconds", lambda r: f"{r.first_sync_s:.2f}"),
        ("first sync: bytes (pages)", lambda r: f"{r.first_sync_bytes:,} ({r.first_sync_pages})"),
        ("unchanged sync: server CPU ms / call", lambda r: f"{r.unchanged_cpu_ms:.2f}"),
        ("unchanged sync: latency ms (median)", lambda r: f"{r.unchanged_latency_ms:.2f}"),
        ("agents attested (seconds)", lambda r: f"{r.agents} ({r.attest_s:.1f})"),
        ("agents syncing every 5 s: syncs / errors", lambda r: f"{r.agent_syncs} / {r.agent_errors}"),
        ("agents syncing every 5 s: server CPU share", lambda r: f"{r.cpu_share:.1%} of one core"),
        ("entry show over all entries: seconds", lambda r: f"{r.show_s:.1f}"),
        ("entry show: lines printed / peak RSS MB", lambda r: f"{r.show_lines:,} / {r.show_maxrss_mb:.0f}"),
        ("server RSS at the end, MB", lambda r: f"{r.server_rss_mb:.0f}"),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"{'':<{width}}  " + "  ".join(f"{r.backend:>18}" for r in results))
    for label, fmt in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{fmt(r):>18}" for r in results))
    for r in results:
        verdict_sync = "meets" if r.unchanged_cpu_ms <= 5 else "MISSES"
        verdict_first = "meets" if r.first_sync_s <= 5 else "MISSES"
        print(f"{r.backend}: unchanged sync {verdict_sync} the 5 ms aim; 10,000-entry first sync {verdict_first} "
              "the 5 s aim")  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--entries", type=int, default=20_000, help="entries to create (100000 for the full run)")
    parser.add_argument("--agents", type=int, default=1000, help="simulated agents syncing every 5 s")
    parser.add_argument("--window", type=float, default=10.0, help="seconds the agents are measured")
    parser.add_argument("--unchanged-calls", type=int, default=500)
    parser.add_argument("--backend", choices=("both", "sqlite", "postgresql"), default="both")
    args = parser.parse_args()
    if args.entries < BIG_AGENT_ENTRIES:
        parser.error(f"--entries must be at least {BIG_AGENT_ENTRIES}")
    results: list[Results] = []
    if args.backend in ("both", "sqlite"):
        workdir = Path(tempfile.mkdtemp(prefix="tessera-scale-"))
        try:
            results.append(asyncio.run(run_backend("sqlite", str(workdir / "store.sqlite3"), workdir, args)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if args.backend in ("both", "postgresql"):
        workdir = Path(tempfile.mkdtemp(prefix="tessera-scale-"))
        try:
            with PgCluster(fsync=True) as cluster:
                url = cluster.create_database("bench") + "&pool_size=20"
                results.append(asyncio.run(run_backend("postgresql", url, workdir, args)))
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
