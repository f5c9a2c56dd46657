"""The demo's backend workload: a gRPC service and an HTTPS service, both on SPIFFE mutual TLS.

It never sees a certificate file. It asks the local Tessera agent "who am I?" over the Workload API
(``X509Source``), serves with credentials that follow every rotation by themselves, and lets a caller in only
when the caller's SPIFFE ID is the one it was told to trust (``--allow``). Run it under the demo
(``examples/demo.py``), or on its own next to an agent::

    SPIFFE_ENDPOINT_SOCKET=unix:///run/tessera-agent/public/api.sock \\
        python examples/backend.py --allow spiffe://demo.test/frontend

It reports what happens as JSON lines on stdout (``{"event": ..., "text": ...}``) so the demo can narrate them.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import signal
import sys
import threading
from concurrent import futures
from typing import Any

import grpc
from cryptography import x509

from tessera.sdk.grpc import SpiffeServerInterceptor, current_peer_id, server_credentials
from tessera.sdk.http import SpiffeHTTPServer, peer_spiffe_id
from tessera.sdk.source import X509Snapshot, X509Source, pick_by_id
from tessera.sdk.svid import X509Svid
from tessera.sdk.tls import authorize_id

_emit_lock = threading.Lock()


def emit(event: str, text: str, **fields: Any) -> None:
    with _emit_lock:
        print(json.dumps({"event": event, "text": text, **fields}), flush=True)


def serial(svid: X509Svid) -> str:
    return format(svid.leaf.serial_number, "x")


def describe(svid: X509Svid) -> dict[str, Any]:
    return {
        "spiffe_id": str(svid.spiffe_id),
        "serial": serial(svid),
        "issued": svid.leaf.not_valid_before_utc.isoformat(),
        "expires": svid.expires_at.isoformat(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="Workload API address (default: $SPIFFE_ENDPOINT_SOCKET)")
    parser.add_argument("--spiffe-id", help="the SVID to use when the agent offers several")
    parser.add_argument("--allow", required=True, help="the only SPIFFE ID allowed to call")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=0)
    parser.add_argument("--https-port", type=int, default=0)
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

    # 1. Identity: blocks until the agent answers with this process's SVID and the trust bundle.
    picker = pick_by_id(args.spiffe_id) if args.spiffe_id else None
    source = X509Source(address=args.socket, picker=picker, timeout=60)
    me = source.svid
    emit("identity", f"the agent says I am {me.spiffe_id}", uid=os.getuid(), gid=os.getgid(), **describe(me))

    current = [me]

    def on_update(snapshot: X509Snapshot) -> None:
        old, new = current[0], snapshot.svid
        if new.leaf.serial_number != old.leaf.serial_number:
            current[0] = new
            emit("rotated", "my certificate rotated", old_serial=serial(old), **describe(new))

    source.add_listener(on_update)
    authorizer = authorize_id(args.allow)

    # 2. gRPC: rotating TLS credentials, and an interceptor refusing any caller but --allow.
    def hello(request: bytes, context: grpc.ServicerContext) -> bytes:
        caller = current_peer_id()
        pem = context.auth_context()["x509_pem_cert"][0]
        caller_serial = format(x509.load_pem_x509_certificate(pem).serial_number, "x")
        name = json.loads(request or b"{}").get("name", "")
        return json.dumps(
            {
                "message": f"hello {name}".strip(),
                "caller": str(caller),
                "caller_serial": caller_serial,
                "backend": str(current[0].spiffe_id),
                "backend_serial": serial(current[0]),
            }
        ).encode()

    grpc_server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), interceptors=[SpiffeServerInterceptor(authorizer, source)]
    )
    grpc_server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("demo.Greeter", {"Hello": grpc.unary_unary_rpc_method_handler(hello)}),)
    )
    grpc_port = grpc_server.add_secure_port(f"{args.host}:{args.grpc_port}", server_credentials(source))
    grpc_server.start()

    # 3. HTTPS: a stdlib http.server whose TLS context presents the current SVID and authorizes the caller.
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps(
                {
                    "path": self.path,
                    "caller": str(peer_spiffe_id(self.request)),
                    "backend": str(current[0].spiffe_id),
                    "backend_serial": serial(current[0]),
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # the frontend narrates every call; access logs would only repeat it

    https_server = SpiffeHTTPServer((args.host, args.https_port), Handler, source=source, authorizer=authorizer)
    https_thread = threading.Thread(target=https_server.serve_forever, name="https", daemon=True)
    https_thread.start()
    https_port = https_server.server_address[1]

    emit(
        "ready",
        f"serving gRPC on {args.host}:{grpc_port} and HTTPS on {args.host}:{https_port} (mutual TLS); "
        f"only {args.allow} may call",
        grpc_port=grpc_port,
        https_port=https_port,
    )
    try:
        stop.wait()
    finally:
        https_server.shutdown()
        https_server.server_close()
        grpc_server.stop(grace=2).wait(5)
        source.close()
    emit("stopped", "stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
