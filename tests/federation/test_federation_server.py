"""A real ServerApp serving its bundle endpoint with the https_web profile: the document follows the CA, the CRLs
are served, and a renewed certificate file is picked up without a restart."""

from __future__ import annotations

import http.client
import json
import shutil
import ssl
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support.inproc import RunningServer, server_config
from support.procs import free_port

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.crl import RevocationChecker
from tessera.sdk.svid import X509Svid
from tessera.sdk.testing import TestCA

TD = "a.test"


def write_cert(svid: X509Svid, directory: Path) -> None:
    (directory / "web.key").write_bytes(svid.key_pem())
    (directory / "web.pem").write_bytes(svid.chain_pem())


class Running(RunningServer):
    def __init__(self, root: Path, web: Path) -> None:
        self.fed_port = free_port()
        super().__init__(
            server_config(
                trust_domain=TD,
                data_dir=str(root / "data"),
                bind_address="127.0.0.1:0",
                socket=str(root / "admin" / "api.sock"),
                federation_bind_address=f"127.0.0.1:{self.fed_port}",
                federation_profile="https_web",
                federation_cert=str(web / "web.pem"),
                federation_key=str(web / "web.key"),
            )
        )

    def trust_admin(self, method: str, request: Any) -> Any:
        with grpc.insecure_channel(f"unix:{self.config.socket_path}") as channel:
            return getattr(agrpc.TrustAdminStub(channel), method)(request, timeout=30)  # type: ignore[no-untyped-call]

    def admin_rpc(self, method: str, request: Any) -> Any:
        with grpc.insecure_channel(f"unix:{self.config.socket_path}") as channel:
            return getattr(agrpc.AdminStub(channel), method)(request, timeout=30)  # type: ignore[no-untyped-call]


@pytest.fixture
def setup() -> Iterator[tuple[Running, TestCA, Path]]:
    root = Path(tempfile.mkdtemp(prefix="tfeds-", dir="/tmp"))
    web = root / "web"
    web.mkdir()
    web_ca = TestCA("web.example")  # stands in for a public CA
    write_cert(web_ca.issue_svid("/endpoint", dns_names=["localhost"]), web)
    server = Running(root, web)
    try:
        yield server, web_ca, web
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def get(port: int, path: str, ca: TestCA) -> tuple[bytes, x509.Certificate]:
    """GET over HTTPS, verifying the endpoint like a federated server with Web PKI roots would."""
    ctx = ssl.create_default_context(cadata=ca.certificate.public_bytes(Encoding.PEM).decode())
    conn = http.client.HTTPSConnection("localhost", port, context=ctx, timeout=10)
    try:
        conn.connect()
        assert conn.sock is not None
        der = conn.sock.getpeercert(binary_form=True)
        conn.request("GET", path)
        response = conn.getresponse()
        assert response.status == 200
        body = response.read()
    finally:
        conn.close()
    assert der is not None
    return body, x509.load_der_x509_certificate(der)


def test_https_web_endpoint_serves_the_bundle_crls_and_reloads_its_certificate(
    setup: tuple[Running, TestCA, Path],
) -> None:
    server, web_ca, web = setup
    port = server.app.endpoint_port
    assert port == server.fed_port
    body, served = get(port, "/", web_ca)
    bundle = SpiffeBundle.from_document(TD, body)
    assert bundle.x509_authorities == server.app.ca_manager.bundle().x509_authorities
    doc = json.loads(body)
    assert doc["spiffe_sequence"] >= 1 and doc["spiffe_refresh_hint"] > 0

    crls, _ = get(port, "/crl", web_ca)
    assert crls.count(b"-----BEGIN X509 CRL-----") == len(bundle.x509_authorities)

    # A forced rotation shows in the document at once, with a higher sequence.
    server.admin_rpc("PrepareCA", apb.PrepareCARequest())
    after = SpiffeBundle.from_document(TD, get(port, "/", web_ca)[0])
    assert len(after.x509_authorities) == 2 and after.sequence > bundle.sequence

    # A renewed certificate file (an ACME client, say) is served without a restart.
    renewed = web_ca.issue_svid("/endpoint", dns_names=["localhost"])
    write_cert(renewed, web)
    deadline = time.monotonic() + 30
    while get(port, "/", web_ca)[1].serial_number != renewed.leaf.serial_number:
        assert time.monotonic() < deadline, "the renewed certificate was not picked up"
        time.sleep(0.2)
    assert served.serial_number != renewed.leaf.serial_number


def test_revocations_reach_the_published_crls(setup: tuple[Running, TestCA, Path]) -> None:
    server, web_ca, _ = setup
    # Nothing issued for this serial: NotFound; the CRLs stay as they are.
    with pytest.raises(grpc.RpcError) as err:
        server.trust_admin("RevokeX509SVIDs", apb.RevokeX509SVIDsRequest(serial="abc"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    # An SVID the server signed and recorded (as the node API does) can be revoked; the served CRL lists it.
    from cryptography.hazmat.primitives.asymmetric import ec

    from tessera.server.ca.revocation import issued_svid

    key = ec.generate_private_key(ec.SECP256R1())
    chain = server.app.ca.sign_x509_svid(key.public_key(), f"spiffe://{TD}/w", 600)
    server.app.datastore.record_issued_svids([issued_svid(chain, "", f"spiffe://{TD}/agent")])
    revoked = server.trust_admin(
        "RevokeX509SVIDs", apb.RevokeX509SVIDsRequest(serial=format(chain[0].serial_number, "x"))
    )
    assert [r.serial for r in revoked.revoked] == [format(chain[0].serial_number, "x")]
    pem = get(server.app.endpoint_port, "/crl", web_ca)[0]
    ders = [
        x509.load_pem_x509_crl(b"-----BEGIN X509 CRL-----" + part).public_bytes(Encoding.DER)
        for part in pem.split(b"-----BEGIN X509 CRL-----")[1:]
    ]
    assert RevocationChecker(ders).is_revoked(chain[0], server.app.ca_manager.bundle().x509_authorities)
