"""The demo's frontend workload: calls the backend over gRPC and HTTPS with SPIFFE mutual TLS, again and again.

Like the backend it holds no certificate file: ``X509Source`` keeps its SVID and the trust bundle current
from the local Tessera agent. Each call presents the SVID current at that moment and checks the backend:
HTTPS by its SPIFFE ID (``authorize_id``), gRPC by the DNS name in the backend's SVID (Python gRPC clients
can only check a host name; the Tessera server puts that name only in the backend's SVID, as registered).

It reports every call as a JSON line on stdout (``{"event": "call", ...}``) so the demo can narrate it.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import sys
import threading
import time
from typing import Any

import grpc
from cryptography import x509

from tessera.sdk.grpc import SpiffeChannel
from tessera.sdk.source import X509Snapshot, X509Source, pick_by_id
from tessera.sdk.svid import X509Svid
from tessera.sdk.tls import authorize_id, client_context

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


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", help="Workload API address (default: $SPIFFE_ENDPOINT_SOCKET)")
    parser.add_argument("--spiffe-id", help="the SVID to use when the agent offers several")
    parser.add_argument("--backend-id", required=True, help="SPIFFE ID the backend must have")
    parser.add_argument("--backend-dns", required=True, help="DNS name in the backend's SVID (for gRPC)")
    parser.add_argument("--grpc", required=True, help="HOST:PORT of the backend's gRPC service")
    parser.add_argument("--https", required=True, help="HOST:PORT of the backend's HTTPS service")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between rounds of calls")
    parser.add_argument("--count", type=int, default=0, help="stop after this many rounds (0: until SIGTERM)")
    args = parser.parse_args(argv)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())

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

    # gRPC: a channel that makes fresh credentials whenever the SVID or the bundle changes.
    channel = SpiffeChannel(args.grpc, source, server_name=args.backend_dns)
    hello = channel.unary_unary("/demo.Greeter/Hello")
    # HTTPS: one context for all connections; each new connection uses the identity current at that moment.
    https_context = client_context(source, authorize_id(args.backend_id))
    https_host, https_port = split_address(args.https)

    def call_grpc(round_no: int) -> None:
        mine = serial(current[0])
        try:
            reply = json.loads(hello(json.dumps({"name": str(current[0].spiffe_id)}).encode(), timeout=10))
        except grpc.RpcError as exc:
            emit("call", f"gRPC call failed: {exc.code().name}: {exc.details()}", proto="gRPC", ok=False,
                 round=round_no)
            return
        emit(
            "call",
            f"gRPC demo.Greeter/Hello answered {reply['message']!r}",
            proto="gRPC",
            ok=True,
            round=round_no,
            caller=reply["caller"],
            backend=reply["backend"],
            my_serial=mine,
            seen_caller_serial=reply["caller_serial"],
            backend_serial=reply["backend_serial"],
        )

    def call_https(round_no: int) -> None:
        conn = http.client.HTTPSConnection(https_host, https_port, context=https_context, timeout=10)
        try:
            conn.connect()  # the TLS handshake, including the check of the backend's SPIFFE ID
            assert conn.sock is not None
            presented = x509.load_der_x509_certificate(conn.sock.getpeercert(binary_form=True) or b"")
            conn.request("GET", "/hello")
            response = conn.getresponse()
            body = json.loads(response.read())
            status = response.status
        except (OSError, ValueError, http.client.HTTPException) as exc:
            emit("call", f"HTTPS call failed: {exc}", proto="HTTPS", ok=False, round=round_no)
            return
        finally:
            conn.close()
        emit(
            "call",
            f"HTTPS GET /hello answered {status}",
            proto="HTTPS",
            ok=status == 200,
            round=round_no,
            caller=body["caller"],
            backend=body["backend"],
            my_serial=serial(current[0]),
            backend_serial=format(presented.serial_number, "x"),
        )

    round_no = 0
    try:
        while not stop.is_set():
            round_no += 1
            started = time.monotonic()
            call_grpc(round_no)
            call_https(round_no)
            if args.count and round_no >= args.count:
                break
            stop.wait(max(0.0, args.interval - (time.monotonic() - started)))
    finally:
        channel.close()
        source.close()
    emit("stopped", f"stopped after {round_no} rounds of calls")
    return 0


if __name__ == "__main__":
    sys.exit(main())
