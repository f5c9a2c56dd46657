"""A workload's first mutual TLS through the SDK's front door, in any interpreter that has tessera installed.

An ``X509Source`` from the agent at ADDRESS serves TLS on 127.0.0.1 with ``server_context``, authorizing this
workload's own SPIFFE ID, and two clients connect with the same SVID: one with ``client_context``, one with
this Python's ``ssl.create_default_context()`` given the SVID and bundle as files (what a plain ``ssl`` or
``requests`` peer does; on 3.13 its defaults add strict X.509 checks). Each reports what it saw.
Imports only the standard library and ``tessera.sdk``: tests/test_packaging_light.py runs it as a script in a
venv with no extras (``python mtls_probe.py ADDRESS`` prints a JSON object), the smoke test in-process.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import ssl
import sys
import tempfile
import threading
from collections.abc import Callable

import tessera.sdk
from tessera.sdk import X509Source, authorize_id, client_context, server_context
from tessera.sdk.tls import peer_spiffe_id


def _connect(
    server_ctx: ssl.SSLContext, client_wrap: Callable[[socket.socket], ssl.SSLSocket], timeout: float
) -> dict[str, str]:
    """One connection through ``server_ctx`` on a fresh loopback port: the peer IDs each side saw, the reply."""
    seen: dict[str, str] = {}
    errors: list[BaseException] = []
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(timeout)

        def serve() -> None:
            try:
                conn, _ = listener.accept()
                conn.settimeout(timeout)
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    seen["server_saw"] = str(peer_spiffe_id(tls))
                    tls.sendall(b"ok")
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=serve)
        thread.start()
        try:
            with socket.create_connection(listener.getsockname(), timeout=timeout) as raw, client_wrap(raw) as tls:
                seen["tls_version"] = str(tls.version())
                seen["reply"] = tls.recv(2).decode()
                uris = [value for kind, value in (tls.getpeercert() or {}).get("subjectAltName", ()) if kind == "URI"]
                seen["client_saw"] = str(peer_spiffe_id(tls) or ",".join(uris))  # a plain ssl client: the URI SAN
        finally:
            thread.join(timeout)
    if errors:
        raise errors[0]
    return seen


def handshake(address: str, timeout: float = 30.0) -> dict[str, object]:
    """What each side of both connections saw of the other, and where the SDK was loaded from."""
    with X509Source(address=address, timeout=timeout) as source, tempfile.TemporaryDirectory() as tmp:
        svid = source.svid
        bundle = source.bundle_for(svid.spiffe_id.trust_domain)
        assert bundle is not None, "no bundle for the SVID's own trust domain"
        authorize = authorize_id(svid.spiffe_id)
        server_ctx = server_context(source, authorize)
        sdk_client = client_context(source, authorize)
        sdk = _connect(server_ctx, sdk_client.wrap_socket, timeout)

        cert, key = os.path.join(tmp, "svid.pem"), os.path.join(tmp, "svid_key.pem")
        for path, data in ((cert, svid.chain_pem()), (key, svid.key_pem())):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        plain_client = ssl.create_default_context(cadata=bundle.pem().decode())
        plain_client.check_hostname = False  # an SVID names a SPIFFE ID, not a host
        plain_client.load_cert_chain(cert, key)
        plain = _connect(server_ctx, plain_client.wrap_socket, timeout)
    return {
        "spiffe_id": str(svid.spiffe_id),
        "sdk_client": sdk,
        "default_context_client": plain,
        "default_verify_strict": bool(plain_client.verify_flags & ssl.VERIFY_X509_STRICT),
        "sdk": str(tessera.sdk.__file__),
        "python": platform.python_version(),
    }


if __name__ == "__main__":
    print(json.dumps(handshake(sys.argv[1])))
