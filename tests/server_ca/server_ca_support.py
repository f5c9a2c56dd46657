"""Shared helpers for the server CA tests: an injectable clock, CSRs, and a real TLS 1.3 handshake."""

from __future__ import annotations

import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from tessera.sdk.keys import PrivateKey, generate_key, private_key_to_pem
from tessera.sdk.svid import certificates_to_pem


class FakeClock:
    """A clock the test moves by hand; the CA manager reads it when a call gives no explicit ``now``."""

    def __init__(self, now: datetime | None = None) -> None:
        self.now = (now or datetime.now(UTC)).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def set(self, now: datetime) -> datetime:
        self.now = now
        return now

    def advance(self, delta: timedelta) -> datetime:
        self.now += delta
        return self.now


def ceil_seconds(value: datetime) -> datetime:
    """Rounds up to a whole second (certificate and JWT times are whole seconds; schedule times need not be)."""
    return value if value.microsecond == 0 else value.replace(microsecond=0) + timedelta(seconds=1)


def make_csr(key: PrivateKey, common_name: str = "ignored") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def new_key(kind: str = "ec-p256") -> PrivateKey:
    return generate_key(kind)


@dataclass
class HandshakeResult:
    server_version: str
    client_version: str
    server_saw: bytes
    """The client's leaf (DER) as the server verified it."""
    client_saw: bytes


def _pem_file(directory: str, name: str, data: bytes) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    return path


def _context(
    purpose: int, chain: Sequence[x509.Certificate], key: PrivateKey, roots: Sequence[x509.Certificate], tmp: str
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose == 0 else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = False
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    ctx.load_verify_locations(cadata=certificates_to_pem(roots).decode("ascii"))
    prefix = "server" if purpose == 0 else "client"
    cert_file = _pem_file(tmp, f"{prefix}.crt", certificates_to_pem(chain))
    key_file = _pem_file(tmp, f"{prefix}.key", private_key_to_pem(key))
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def tls_handshake(
    server_chain: Sequence[x509.Certificate],
    server_key: PrivateKey,
    client_chain: Sequence[x509.Certificate],
    client_key: PrivateKey,
    roots: Sequence[x509.Certificate],
) -> HandshakeResult:
    """Mutual TLS 1.3 between two SVIDs over a real socket pair, both sides verifying against ``roots`` with
    OpenSSL's VERIFY_X509_STRICT. Raises ssl.SSLError when either side refuses the other."""
    with tempfile.TemporaryDirectory(dir="/tmp") as tmp:
        server_ctx = _context(0, server_chain, server_key, roots, tmp)
        client_ctx = _context(1, client_chain, client_key, roots, tmp)
    left, right = socket.socketpair()
    left.settimeout(20)
    right.settimeout(20)
    outcome: dict[str, object] = {}

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(left, server_side=True) as tls:
                outcome["server_version"] = tls.version()
                outcome["server_saw"] = tls.getpeercert(binary_form=True)
                tls.sendall(b"ok")
        except Exception as exc:
            outcome["server_error"] = exc

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with client_ctx.wrap_socket(right, server_side=False) as tls:
            client_version = tls.version()
            client_saw = tls.getpeercert(binary_form=True)
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(20)
        left.close()
    if "server_error" in outcome:
        raise outcome["server_error"]  # type: ignore[misc]
    assert client_version is not None and client_saw is not None
    return HandshakeResult(
        server_version=str(outcome["server_version"]),
        client_version=client_version,
        server_saw=outcome["server_saw"],  # type: ignore[arg-type]
        client_saw=client_saw,
    )
