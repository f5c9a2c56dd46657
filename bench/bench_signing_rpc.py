"""End-to-end signing throughput: CSRs -> X509-SVIDs through the node API's BatchSignX509SVID, next to the
plain `cryptography` loop doing the same CSR -> certificate work in the same run.

    .venv/bin/python bench/bench_signing_rpc.py [--n 4000] [--batch 500] [--concurrency 1]

The server runs as a real `tessera-server run` subprocess (TLS listener, SQLite, CA on disk). The benchmark
attests as an agent with a join token, registers one entry per CSR in a batch, and then times batches of
signing calls over mutual TLS, as an agent does after a full sync. The plain loops (from bench_signing.py: an
idiomatic one and a tuned one, both doing everything a correct signer must, including verifying each CSR's
signature) run in this process on the same CSRs with a CA key of the same kind, interleaved with the RPC runs.

Besides throughput it prints CPU time per SVID: the plain loops run on one thread, while the server checks a
batch's CSR signatures on several threads (OpenSSL verifies with the GIL released), so on a machine with an
idle core its throughput can come close to the plain loop's even though it spends more CPU per SVID.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_signing import (
    EXPLANATION,
    PLAIN_LABEL,
    TUNED_LABEL,
    Figure,
    make_csrs,
    make_manager,
    measure,
    plain_loop,
    plain_loop_tuned,
    ratio_line,
)

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc

TD = "bench.example.org"
READY = re.compile(r"tessera-server ready: node API on [\d.]+:(\d+)")
OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


def start_server(workdir: Path, log_level: str) -> tuple[subprocess.Popen[str], int, str, list[str]]:
    """Runs `tessera-server run` on a free port; returns the process, the node API port, the admin socket and
    the (growing) list of the server's log lines."""
    socket_path = str(Path(tempfile.mkdtemp(prefix="tbench-", dir="/tmp")) / "api.sock")
    binary = Path(sys.executable).parent / "tessera-server"
    process = subprocess.Popen(
        [str(binary), "run", "--trust-domain", TD, "--data-dir", str(workdir / "data"), "--bind-address",
         "127.0.0.1:0", "--socket", socket_path, "--log-level", log_level,
         "--signing-rate-limit", "0"],  # measure signing, not the per-agent rate limit
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    port: list[int] = []
    ready = threading.Event()

    def read() -> None:  # also keeps the pipe drained while the benchmark runs
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            match = READY.search(line)
            if match:
                port.append(int(match.group(1)))
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(60):
        process.kill()
        raise SystemExit("tessera-server did not start:\n" + "".join(lines))
    return process, port[0], socket_path, lines


def attest(address: str, bundle_pem: bytes, token: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )
    with grpc.secure_channel(address, grpc.ssl_channel_credentials(bundle_pem)) as channel:
        request = npb.AttestRequest(params=npb.AttestParams(attestor="join_token", payload=token.encode(), csr=csr))
        (response,) = list(ngrpc.NodeStub(channel).Attest(iter([request]), timeout=30))
    chain = response.result.svid.cert_chain
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in _split_der(chain))
    return key, pem


def _split_der(data: bytes) -> list[x509.Certificate]:
    from tessera.sdk.svid import parse_der_certificates

    return parse_der_certificates(data)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=4000, help="CSRs in total (default 4000)")
    parser.add_argument("--batch", type=int, default=500, help="CSRs per BatchSignX509SVID call (max 500)")
    parser.add_argument("--concurrency", type=int, default=1, help="calls in flight at once (default 1)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--server-log-level", default="info", help="debug also prints the server's own time per batch")
    args = parser.parse_args()
    if not 1 <= args.batch <= 500 or args.n < args.batch:
        parser.error("--batch must be 1..500 and --n at least --batch")

    workdir = Path(tempfile.mkdtemp(prefix="tessera-bench-"))
    process, port, socket_path, server_lines = start_server(workdir, args.server_log_level)
    try:
        address = f"127.0.0.1:{port}"
        with grpc.insecure_channel(f"unix:{socket_path}") as admin_channel:
            admin = agrpc.AdminStub(admin_channel)
            bundle_pem = admin.GetBundle(apb.GetBundleRequest()).data
            token = admin.CreateJoinToken(apb.CreateJoinTokenRequest()).token
            key, chain_pem = attest(address, bundle_pem, token)
            agent_id = _split_der_first_id(chain_pem)
            entry_ids = []
            for i in range(args.batch):
                entry = npb.Entry(
                    spiffe_id=f"spiffe://{TD}/bench/workload-{i}",
                    parent_id=agent_id,
                    selectors=[npb.Selector(type="unix", value=f"uid:{10000 + i}")],
                )
                entry_ids.append(admin.CreateEntry(apb.CreateEntryRequest(entry=entry)).entry.id)

        csrs = make_csrs(args.n)
        batches = [
            npb.BatchSignX509SVIDRequest(
                requests=[
                    npb.X509SignRequest(entry_id=entry_ids[j % args.batch], csr=csrs[i + j])
                    for j in range(min(args.batch, args.n - i))
                ]
            )
            for i in range(0, args.n, args.batch)
        ]
        creds = grpc.ssl_channel_credentials(
            bundle_pem,
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            chain_pem,
        )
        with grpc.secure_channel(address, creds, options=OPTIONS) as channel:
            stub = ngrpc.NodeStub(channel)
            stub.BatchSignX509SVID(batches[0], timeout=120)  # warm up the connection and the server

            def rpc_run() -> list[bytes]:
                out: list[bytes] = []
                with ThreadPoolExecutor(args.concurrency) as pool:
                    for response in pool.map(lambda b: stub.BatchSignX509SVID(b, timeout=300), batches):
                        out.extend(r.cert_chain for r in response.results)
                return out

            manager = make_manager("ec-p256")
            active = manager.active_x509_authority
            assert active is not None
            ca_cert, ca_key = active.certificate, active.key.signer
            plain_loop(csrs[:20], ca_cert, ca_key)
            plain_loop_tuned(csrs[:20], ca_cert, ca_key)
            rpc_label = f"BatchSignX509SVID end to end (batches of {args.batch}, x{args.concurrency})"
            # Interleaved, best and median of each: other load on the machine hits all sides alike.
            runs: dict[str, list[Figure]] = {PLAIN_LABEL: [], TUNED_LABEL: [], rpc_label: []}
            cpu = dict.fromkeys(runs, 0.0)
            server_cpu = 0.0
            for _ in range(args.repeats):
                for label, fn in (
                    (PLAIN_LABEL, lambda: plain_loop(csrs, ca_cert, ca_key)),
                    (TUNED_LABEL, lambda: plain_loop_tuned(csrs, ca_cert, ca_key)),
                    (rpc_label, rpc_run),
                ):
                    cpu_before, server_before = time.process_time(), process_cpu_seconds(process.pid)
                    runs[label].append(measure(label, fn, args.n, 1))
                    cpu[label] += time.process_time() - cpu_before
                    if label == rpc_label:
                        server_cpu += process_cpu_seconds(process.pid) - server_before
            plain, tuned, rpc = (_best(runs[label]) for label in runs)
            per_svid = {label: cpu[label] / (args.n * args.repeats) * 1e6 for label in runs}
            server_per_svid = server_cpu / (args.n * args.repeats) * 1e6
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(workdir, ignore_errors=True)
        shutil.rmtree(Path(socket_path).parent, ignore_errors=True)
    report(args, plain, tuned, rpc)
    print(
        "end-to-end runs in order: "
        + ", ".join(f"{f.per_second:.0f}" for f in runs[rpc_label])
        + f" SVIDs/s (each run adds {args.n} rows to the server's issued_svids table, which slows its recording)"
    )
    print(
        f"CPU per SVID: plain idiomatic {per_svid[PLAIN_LABEL]:.0f} us, plain tuned {per_svid[TUNED_LABEL]:.0f} us; "
        f"end to end: server process {server_per_svid:.0f} us + this client {per_svid[rpc_label]:.0f} us"
    )
    for line in server_lines:
        if "signed" in line and "X509-SVIDs in" in line:
            print("server:", line.rstrip())
    return 0


def _split_der_first_id(chain_pem: bytes) -> str:
    from tessera.sdk.svid import spiffe_id_from_certificate

    return str(spiffe_id_from_certificate(x509.load_pem_x509_certificates(chain_pem)[0]))


def _best(runs: list[Figure]) -> Figure:
    times = sorted(r.seconds for r in runs)
    return Figure(runs[0].label, runs[0].count, times[0], times[len(times) // 2])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all threads (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def report(args: argparse.Namespace, plain: Figure, tuned: Figure, rpc: Figure) -> None:
    print(f"end-to-end signing benchmark: {args.n} CSRs (ec-p256), CA ec-p256, Python {sys.version.split()[0]}")
    print(EXPLANATION)
    print(
        "The server checks a batch's CSR signatures on several threads (OpenSSL verifies with the GIL released)\n"
        "and signs on one: its throughput may use a second core; 'CPU per SVID' below compares the work done."
    )
    for figure in (plain, tuned, rpc):
        print(figure.line())
    print(ratio_line("ratio end to end / idiomatic plain loop", rpc, plain))
    print(ratio_line("ratio end to end / tuned plain loop", rpc, tuned))


if __name__ == "__main__":
    raise SystemExit(main())
