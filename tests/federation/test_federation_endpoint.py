"""The bundle endpoint over real HTTPS, and the refresher facing good, down and lying endpoints."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import spiffe
from cryptography.hazmat.primitives import serialization
from spiffe.utils.certificate_utils import parse_der_certificates as spiffe_parse_der

from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.keys import as_public_key, public_keys_equal
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.testing import TestCA
from tessera.server.datastore import open_datastore
from tessera.server.datastore.base import Datastore, FederationRelationship
from tessera.server.federation.endpoint import BundleEndpoint, svid_context
from tessera.server.federation.fetch import check_endpoint
from tessera.server.federation.refresher import FederationRefresher, web_client_context

B = "b.test"
ENDPOINT_ID = f"spiffe://{B}/tessera/server"


class Served:
    """A bundle endpoint on a private event loop thread; the test changes what it serves."""

    def __init__(self, ca: TestCA, *, dns: tuple[str, ...] = ()) -> None:
        self.ca = ca
        svid = ca.issue_svid(ENDPOINT_ID, dns_names=dns)
        self.document: bytes = ca.spiffe_bundle(sequence=3, refresh_hint=7).to_document()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.endpoint = BundleEndpoint(
            "127.0.0.1",
            0,
            svid_context(svid.cert_chain, svid.private_key),
            lambda: self.document,
            lambda: b"-----BEGIN X509 CRL-----\n",
        )
        self.port = self.run(self.endpoint.start())

    def run(self, coro: object) -> int:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def present(self, ca: TestCA, spiffe_id: str = ENDPOINT_ID, dns: tuple[str, ...] = ()) -> None:
        svid = ca.issue_svid(spiffe_id, dns_names=dns)
        self.endpoint.set_context(svid_context(svid.cert_chain, svid.private_key))

    def close(self) -> None:
        if not self.thread.is_alive():
            return
        self.run(self.endpoint.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def b_ca() -> TestCA:
    return TestCA(B)


@pytest.fixture
def served(b_ca: TestCA) -> Iterator[Served]:
    s = Served(b_ca, dns=("localhost",))
    yield s
    s.close()


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[Datastore]:
    store = open_datastore(None, data_dir=tmp_path)
    yield store
    store.close()


def spiffe_relationship(ds: Datastore, port: int, bootstrap: SpiffeBundle | None) -> FederationRelationship:
    rel = ds.create_federation_relationship(
        FederationRelationship(B, f"https://127.0.0.1:{port}/", "https_spiffe", ENDPOINT_ID)
    )
    if bootstrap is not None:
        ds.set_bundle(B, bootstrap.to_document())
    return rel


def held(ds: Datastore) -> SpiffeBundle:
    return SpiffeBundle.from_document(B, ds.get_bundle(B).document)


def test_document_parses_with_our_reader_and_the_spiffe_package(served: Served, b_ca: TestCA) -> None:
    ctx = served.endpoint  # the endpoint is plain HTTPS: any client can read it (no client certificate)
    assert ctx.port == served.port
    import ssl

    client = ssl.create_default_context()
    client.load_verify_locations(cadata=b_ca.certificate.public_bytes(serialization.Encoding.PEM).decode())
    with urllib.request.urlopen(f"https://localhost:{served.port}/", context=client, timeout=10) as resp:
        assert resp.headers["Content-Type"] == "application/json"
        body = resp.read()
    doc = json.loads(body)
    assert doc["spiffe_sequence"] == 3 and doc["spiffe_refresh_hint"] == 7
    ours = SpiffeBundle.from_document(B, body)
    assert ours == b_ca.spiffe_bundle(sequence=3, refresh_hint=7)
    # The spiffe package: its DER parser reads the x5c authority, its JWT bundle parser the JWT entries (it
    # refuses kid-less x509-svid entries, so it gets the JWT part of the same document; see tests/sdk_core).
    x5c = next(e for e in doc["keys"] if e["use"] == "x509-svid")["x5c"][0]
    assert [c.public_bytes(serialization.Encoding.DER) for c in spiffe_parse_der(base64.b64decode(x5c))] == [
        b_ca.certificate.public_bytes(serialization.Encoding.DER)
    ]
    jwt_only = json.dumps({**doc, "keys": [e for e in doc["keys"] if e["use"] == "jwt-svid"]})
    theirs = spiffe.JwtBundle.parse(spiffe.TrustDomain(B), jwt_only.encode())
    assert public_keys_equal(as_public_key(theirs.get_jwt_authority(b_ca.jwt_kid)), b_ca.jwt_key.public_key())
    with urllib.request.urlopen(f"https://localhost:{served.port}/crl", context=client, timeout=10) as resp:
        assert resp.read().startswith(b"-----BEGIN X509 CRL")
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(f"https://localhost:{served.port}/other", context=client, timeout=10)
    assert err.value.code == 404


def test_https_spiffe_refresh_then_down_and_lying_endpoints_keep_the_last_good_bundle(
    served: Served, b_ca: TestCA, ds: Datastore, caplog: pytest.LogCaptureFixture
) -> None:
    clock = [1000.0]
    refresher = FederationRefresher(ds, TrustDomain("a.test"), clock=lambda: clock[0], timeout=5)
    rel = spiffe_relationship(ds, served.port, b_ca.spiffe_bundle(sequence=1))
    rel = refresher.refresh(rel)
    assert rel.last_error == "" and rel.next_refresh == 1000 + 7  # the served refresh hint
    good = held(ds)
    assert good.sequence == 3
    assert ds.list_federation_relationships()[0].last_refresh == 1000

    def expect_kept(reason: str, change: Callable[[], None]) -> None:
        change()
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="tessera.server.federation"):
            after = refresher.refresh(ds.get_federation_relationship(B))
        assert reason in after.last_error, after.last_error
        assert held(ds) == good
        assert any(
            reason in r.getMessage() and "keeping the last good bundle" in r.getMessage() for r in caplog.records
        )

    # A document that is not a bundle, one from another trust domain, one going back in sequence.
    expect_kept("no valid SPIFFE bundle document", lambda: setattr(served, "document", b"<html>oops</html>"))
    expect_kept(
        "belongs to c.test", lambda: setattr(served, "document", TestCA("c.test").spiffe_bundle(9).to_document())
    )
    expect_kept("older than the 3", lambda: setattr(served, "document", b_ca.spiffe_bundle(sequence=2).to_document()))
    # An endpoint presenting the wrong SPIFFE ID, then a certificate from a CA outside the held bundle.
    served.document = b_ca.spiffe_bundle(sequence=4, refresh_hint=7).to_document()
    expect_kept("expected spiffe://b.test/tessera/server", lambda: served.present(b_ca, f"spiffe://{B}/impostor"))
    expect_kept("TLS handshake", lambda: served.present(TestCA(B)))
    # Down.
    expect_kept("cannot connect", served.close)
    failed = ds.get_federation_relationship(B)
    assert failed.next_refresh - 1000 <= 7  # retried no later than the hint


def test_https_spiffe_follows_the_foreign_bundle_and_https_web_uses_web_pki(
    served: Served, b_ca: TestCA, ds: Datastore, tmp_path: Path
) -> None:
    refresher = FederationRefresher(ds, TrustDomain("a.test"))
    rel = spiffe_relationship(ds, served.port, b_ca.spiffe_bundle(sequence=1))
    # The foreign domain rotates: its bundle now holds a second CA, and its endpoint uses the new CA.
    new_ca = TestCA(B)
    both = SpiffeBundle(TrustDomain(B), (b_ca.certificate, new_ca.certificate), {}, sequence=5, refresh_hint=7)
    served.document = both.to_document()
    assert refresher.refresh(rel).last_error == ""
    served.present(new_ca)
    assert refresher.refresh(rel).last_error == ""  # authenticated with the bundle fetched a moment ago
    assert len(held(ds).x509_authorities) == 2

    # https_web: an ordinary certificate for the host name, verified with the configured extra roots.
    web = ds.update_federation_relationship(
        FederationRelationship(B, f"https://localhost:{served.port}/", "https_web", "", next_refresh=0)
    )
    served.present(new_ca, dns=("localhost",))
    system_only = FederationRefresher(ds, TrustDomain("a.test"))
    assert "TLS handshake" in system_only.refresh(web).last_error
    roots = tmp_path / "roots.pem"
    roots.write_bytes(new_ca.certificate.public_bytes(serialization.Encoding.PEM))
    trusting = FederationRefresher(ds, TrustDomain("a.test"), web_context=web_client_context((roots,)))
    assert trusting.refresh(web).last_error == ""


def test_relationship_validation_and_delete_drops_the_bundle(ds: Datastore) -> None:
    with pytest.raises(ValueError, match="https://"):
        check_endpoint(B, "http://x/", "https_web", "")
    with pytest.raises(ValueError, match="endpoint_spiffe_id"):
        check_endpoint(B, "https://x/", "https_spiffe", "")
    with pytest.raises(ValueError, match="not in trust domain"):
        check_endpoint(B, "https://x/", "https_spiffe", "spiffe://c.test/x")
    with pytest.raises(ValueError, match="profile"):
        check_endpoint(B, "https://x/", "ftp", "")
    spiffe_relationship(ds, 1, TestCA(B).spiffe_bundle())
    revision = ds.revisions().bundles
    ds.delete_federation_relationship(B)
    assert ds.list_bundles() == [] and ds.revisions().bundles > revision
