"""End to end with a real tessera-server and tessera-agent: two workloads (one process holding both entries,
each side picking its own SVID) talk HTTPS (stdlib server + requests) and gRPC with SVIDs from the agent,
across real rotations with zero failed requests; tessera-helper writes files openssl accepts."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
import requests
from cryptography import x509
from support.procs import PY, TesseraAgent, TesseraServer, short_dir, wait_for
from support.web import QuietHandler

from tessera.sdk.grpc import SpiffeChannel, SpiffeServerInterceptor, current_peer_id, server_credentials
from tessera.sdk.http import SpiffeHTTPServer, requests_adapter
from tessera.sdk.source import X509Source, pick_by_id
from tessera.sdk.tls import authorize_id, client_context, peer_spiffe_id
from tessera.sdk.workloadapi import BackoffPolicy, WorkloadApiClient

pytestmark = pytest.mark.slow

TD = "example.org"
AGENT_ID = f"spiffe://{TD}/host/sdk-e2e"
API = f"spiffe://{TD}/api"
CLIENT = f"spiffe://{TD}/client"
DNS = "api.example.internal"
TTL = "60s"  # the server's minimum; the agent rotates at about half of it
WAIT = 90.0  # seconds: a rotation takes about half of TTL


class Stack:
    """A server and an agent serving two entries (API and CLIENT, both uid 0) of short-lived SVIDs."""

    def __init__(self) -> None:
        self.root = short_dir("trt-e2e-")
        self.socket = str(self.root / "api.sock")
        self.address = "unix://" + self.socket
        self.server = TesseraServer(
            TD, data_dir=self.root / "server", admin_socket=str(self.root / "admin.sock"), log=self.root / "server.log"
        )
        self.agent: TesseraAgent | None = None

    def start(self) -> None:
        self.server.start()
        self.server.wait_healthy(WAIT)
        self.server.write_bundle(self.root / "bundle.pem")
        token = self.server.join_token(AGENT_ID)
        for path, extra in (("/api", ["--dns-name", DNS]), ("/client", [])):
            self.server.admin("entry", "create", "--spiffe-id", f"spiffe://{TD}{path}", "--parent-id", AGENT_ID,
                              "--selector", "unix:uid:0", "--x509-svid-ttl", TTL, *extra)  # fmt: skip
        agent = self.agent = TesseraAgent(
            TD, servers=self.server.address, trust_bundle=self.root / "bundle.pem", data_dir=self.root / "agent",
            socket=self.socket, join_token=token, log=self.root / "agent.log",
        )  # fmt: skip
        agent.start()

        def both_ids() -> bool:
            if not agent.alive():
                raise AssertionError("agent exited:\n" + agent.output())
            try:
                with WorkloadApiClient(self.address, timeout=5) as client:
                    ids = {str(s.spiffe_id) for s in client.fetch_x509_svids()}
            except Exception:
                return False
            return ids >= {API, CLIENT}

        wait_for(both_ids, WAIT, "agent serving both SVIDs")

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.server.stop()
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    try:
        s.start()
        yield s
    finally:
        s.stop()


class Handler(QuietHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = str(peer_spiffe_id(self.request)).encode()
        self.reply(body)


def test_helper_files_from_real_agent(stack: Stack, tmp_path: Path) -> None:
    out = subprocess.run(
        [PY, "-m", "tessera.sdk.helper.cli", "--agent-address", stack.address, "--cert-dir", str(tmp_path),
         "--svid-file-name", "svid.pem", "--svid-bundle-file-name", "bundle.pem", "--no-daemon-mode"],
        capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    check = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "bundle.pem"), str(tmp_path / "svid.pem")],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (tmp_path / "svid_key.pem").stat().st_mode & 0o777 == 0o600


def test_https_and_grpc_across_real_rotations(stack: Stack) -> None:
    fast = BackoffPolicy(initial=0.1, maximum=1.0)
    server_src = X509Source(address=stack.address, picker=pick_by_id(API), backoff=fast, timeout=30)
    client_src = X509Source(address=stack.address, picker=pick_by_id(CLIENT), backoff=fast, timeout=30)
    https = SpiffeHTTPServer(("127.0.0.1", 0), Handler, source=server_src, authorizer=authorize_id(CLIENT))
    threading.Thread(target=https.serve_forever, daemon=True).start()
    url = f"https://127.0.0.1:{https.server_address[1]}/"

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        return str(current_peer_id()).encode()

    interceptor = SpiffeServerInterceptor(authorize_id(CLIENT))
    grpc_server = grpc.server(futures.ThreadPoolExecutor(8), interceptors=[interceptor])
    grpc_server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
        "e2e.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(echo)}),))
    grpc_port = grpc_server.add_secure_port("127.0.0.1:0", server_credentials(server_src))
    grpc_server.start()
    channel = SpiffeChannel(f"127.0.0.1:{grpc_port}", client_src, server_name=DNS)
    session = requests.Session()
    session.mount("https://", requests_adapter(client_src, authorize_id(API)))
    # A second session that keeps its pooled connection open across every rotation.
    keep = requests.Session()
    keep.mount("https://", requests_adapter(client_src, authorize_id(API)))

    failures: list[BaseException] = []
    counts = {"https": 0, "grpc": 0}
    stop = threading.Event()

    def https_traffic() -> None:
        while not stop.is_set():
            try:
                with requests.Session() as fresh:  # a new connection each time: picks up the current SVID
                    fresh.mount("https://", requests_adapter(client_src, authorize_id(API)))
                    assert fresh.get(url, timeout=10).text == CLIENT
                assert keep.get(url, timeout=10).text == CLIENT
                counts["https"] += 1
            except BaseException as exc:
                failures.append(exc)
            time.sleep(0.05)

    def grpc_traffic() -> None:
        call = channel.unary_unary("/e2e.Echo/Echo")
        while not stop.is_set():
            try:
                assert call(b"", timeout=10) == CLIENT.encode()
                counts["grpc"] += 1
            except BaseException as exc:
                failures.append(exc)
            time.sleep(0.05)

    workers = [threading.Thread(target=https_traffic), threading.Thread(target=grpc_traffic)]
    try:
        for w in workers:
            w.start()
        seen_server, seen_client = {server_src.svid.leaf.serial_number}, {client_src.svid.leaf.serial_number}
        for n in (2, 3):  # two rotations on each side

            def rotated(n: int = n) -> bool:
                seen_server.add(server_src.svid.leaf.serial_number)
                seen_client.add(client_src.svid.leaf.serial_number)
                return len(seen_server) >= n and len(seen_client) >= n

            wait_for(rotated, WAIT, f"rotation {n - 1}")
            h, g = counts["https"], counts["grpc"]

            def more_traffic(h: int = h, g: int = g) -> bool:
                return counts["https"] > h + 3 and counts["grpc"] > g + 3

            wait_for(more_traffic, WAIT, "traffic after rotation")
        # New connections present the newest server SVID.
        with socket.create_connection(("127.0.0.1", https.server_address[1])) as raw:
            tls = client_context(client_src, authorize_id(API)).wrap_socket(raw)
            presented = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True) or b"").serial_number
            tls.close()
        assert presented == server_src.svid.leaf.serial_number
    finally:
        stop.set()
        for w in workers:
            w.join(30)
        channel.close()
        grpc_server.stop(0)
        https.shutdown()
        https.server_close()
        server_src.close()
        client_src.close()
    assert failures == [], failures[:3]
    assert counts["https"] > 0 and counts["grpc"] > 0
