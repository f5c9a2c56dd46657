"""Mutual-TLS handshake rate with the SDK's rotating, authorizing contexts next to plain ``ssl`` contexts built
from the same certificates, in the same run; and the same for new gRPC connections.

    .venv/bin/python bench/bench_tls.py [--seconds 3] [--rounds 3]

Three measurements, each alternating SDK and plain rounds so machine noise hits both alike:

* ``memory``: handshakes between two in-process SSLObjects over memory BIOs (no sockets: the purest view of
  the per-handshake cost the SDK adds: the sni_callback swap and the SPIFFE ID check on both sides);
* ``tcp``: a client thread connecting over loopback to a server thread (accept + handshake + 1 byte echo);
* ``memory*``/``tcp*``: the same against plain servers that, like the SDK's, issue no session tickets;
* ``grpc``: a new channel (local subchannel pool, so a new TCP+TLS connection) and one unary call each time.
"""

from __future__ import annotations

import argparse
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent import futures

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tessera.sdk.grpc import SpiffeChannel, SpiffeServerInterceptor, server_credentials
from tessera.sdk.source import StaticX509Source
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import authorize_id, client_context, server_context

SERVER_ID = "spiffe://example.org/server"
CLIENT_ID = "spiffe://example.org/client"
DNS = "server.example.internal"


def plain_contexts(
    tmp: str, server_pem: bytes, client_pem: bytes, ca_pem: bytes, tickets: bool = True
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    paths = {}
    for name, data in (("server", server_pem), ("client", client_pem)):
        path = os.path.join(tmp, name + ".pem")
        with open(path, "wb") as fh:
            fh.write(data)
        paths[name] = path
    server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server.load_cert_chain(paths["server"])
    server.load_verify_locations(cadata=ca_pem.decode())
    server.verify_mode = ssl.CERT_REQUIRED
    if not tickets:
        server.num_tickets = 0
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.load_cert_chain(paths["client"])
    client.load_verify_locations(cadata=ca_pem.decode())
    client.check_hostname = False
    client.verify_mode = ssl.CERT_REQUIRED
    return server, client


def memory_handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> None:
    c_in, c_out, s_in, s_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    client = client_ctx.wrap_bio(c_in, c_out, server_hostname="server")
    server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
    client_done = server_done = False
    while not (client_done and server_done):
        if not client_done:
            try:
                client.do_handshake()
                client_done = True
            except ssl.SSLWantReadError:
                pass
        if c_out.pending:
            s_in.write(c_out.read())
        if not server_done:
            try:
                server.do_handshake()
                server_done = True
            except ssl.SSLWantReadError:
                pass
        if s_out.pending:
            c_in.write(s_out.read())


class TcpServer:
    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.sock.getsockname()[1]
        self.stop = False
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self) -> None:
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            try:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                tls = self.ctx.wrap_socket(conn, server_side=True)
                tls.sendall(tls.recv(1))
                tls.close()
            except (OSError, ssl.SSLError):
                conn.close()

    def close(self) -> None:
        self.stop = True
        self.sock.close()


def tcp_handshake(port: int, client_ctx: ssl.SSLContext) -> None:
    # TCP_NODELAY as HTTP clients and asyncio set it: without it, Nagle + delayed ACK add ~40 ms whenever the
    # server sends nothing after the handshake (the SDK's server sends no session tickets, see tls.py).
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _echo(client_ctx.wrap_socket(sock))


def _echo(tls: ssl.SSLSocket) -> None:
    with tls:
        tls.sendall(b"x")
        assert tls.recv(1) == b"x"


def rate(fn: Callable[[], None], seconds: float) -> float:
    fn()  # warm-up (also builds the SDK's inner contexts)
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        fn()
        count += 1
    return count / (time.perf_counter() - start)


def compare(name: str, sdk: Callable[[], None], plain: Callable[[], None], seconds: float, rounds: int) -> None:
    sdk_rates, plain_rates = [], []
    for _ in range(rounds):
        plain_rates.append(rate(plain, seconds / rounds))
        sdk_rates.append(rate(sdk, seconds / rounds))
    s, p = sum(sdk_rates) / rounds, sum(plain_rates) / rounds
    print(f"{name:<8} SDK {s:9.1f}/s   plain {p:9.1f}/s   ratio {s / p:5.2f}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="time per measurement and side")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    ca = TestCA("example.org")
    server_svid = ca.issue_svid(SERVER_ID, dns_names=[DNS])
    client_svid = ca.issue_svid(CLIENT_ID)
    server_src = StaticX509Source(server_svid, ca.x509_bundle())
    client_src = StaticX509Source(client_svid, ca.x509_bundle())
    sdk_server = server_context(server_src, authorize_id(CLIENT_ID))
    sdk_client = client_context(client_src, authorize_id(SERVER_ID))
    pems = (
        server_svid.chain_pem() + server_svid.key_pem(),
        client_svid.chain_pem() + client_svid.key_pem(),
        ca.x509_bundle().pem(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        plain_server, plain_client = plain_contexts(tmp, *pems)
        nt_server, _ = plain_contexts(tmp, *pems, tickets=False)
    print(f"Python {sys.version.split()[0]}, {ssl.OPENSSL_VERSION}, EC P-256 SVIDs, TLS 1.3 mutual auth")
    compare(
        "memory",
        lambda: memory_handshake(sdk_server, sdk_client),
        lambda: memory_handshake(plain_server, plain_client),
        args.seconds,
        args.rounds,
    )
    # The SDK's servers issue no session tickets (a resumed session would skip the bundle check); compare
    # against plain contexts that do the same, so the ratio is not flattered by the tickets' cost.
    compare(
        "memory*",
        lambda: memory_handshake(sdk_server, sdk_client),
        lambda: memory_handshake(nt_server, plain_client),
        args.seconds,
        args.rounds,
    )

    servers = TcpServer(sdk_server), TcpServer(plain_server), TcpServer(nt_server)
    compare(
        "tcp",
        lambda: tcp_handshake(servers[0].port, sdk_client),
        lambda: tcp_handshake(servers[1].port, plain_client),
        args.seconds,
        args.rounds,
    )
    compare(
        "tcp*",
        lambda: tcp_handshake(servers[0].port, sdk_client),
        lambda: tcp_handshake(servers[2].port, plain_client),
        args.seconds,
        args.rounds,
    )
    for s in servers:
        s.close()

    def handler(request: bytes, context: grpc.ServicerContext) -> bytes:
        return request

    generic = grpc.method_handlers_generic_handler("bench.Echo", {"Echo": grpc.unary_unary_rpc_method_handler(handler)})
    sdk_grpc = grpc.server(
        futures.ThreadPoolExecutor(8), interceptors=[SpiffeServerInterceptor(authorize_id(CLIENT_ID))]
    )
    sdk_grpc.add_generic_rpc_handlers((generic,))
    sdk_port = sdk_grpc.add_secure_port("127.0.0.1:0", server_credentials(server_src))
    plain_grpc = grpc.server(futures.ThreadPoolExecutor(8))
    plain_grpc.add_generic_rpc_handlers((generic,))
    plain_port = plain_grpc.add_secure_port(
        "127.0.0.1:0",
        grpc.ssl_server_credentials([(server_svid.key_pem(), server_svid.chain_pem())], ca.x509_bundle().pem(), True),
    )
    sdk_grpc.start()
    plain_grpc.start()
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.ssl_target_name_override", DNS)]
    plain_creds = grpc.ssl_channel_credentials(ca.x509_bundle().pem(), client_svid.key_pem(), client_svid.chain_pem())

    def sdk_call() -> None:
        with SpiffeChannel(
            f"127.0.0.1:{sdk_port}", client_src, server_name=DNS, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as channel:
            assert channel.unary_unary("/bench.Echo/Echo")(b"x", timeout=10) == b"x"

    def plain_call() -> None:
        with grpc.secure_channel(f"127.0.0.1:{plain_port}", plain_creds, options=options) as channel:
            assert channel.unary_unary("/bench.Echo/Echo")(b"x", timeout=10) == b"x"

    compare("grpc", sdk_call, plain_call, args.seconds, args.rounds)
    sdk_grpc.stop(0)
    plain_grpc.stop(0)


if __name__ == "__main__":
    main()
