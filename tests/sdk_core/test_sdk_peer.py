"""The peer verifier without a network: its cache of verified chains (window, size, what it never caches) and its
mode without bundles. Which peers it accepts is the table in tests/sdk_runtime/test_sdk_rt_peers.py."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

import tessera.sdk.peer as peer_module
from tessera.sdk.bundle import BundleSet
from tessera.sdk.errors import AuthorizationError
from tessera.sdk.peer import PeerAuthorizationError, PeerVerifier, verify_peer
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.svid import X509Svid
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import authorize_any, authorize_id

ID = "spiffe://example.org/client"


def _der(svid: X509Svid) -> list[bytes]:
    return [c.public_bytes(Encoding.DER) for c in svid.cert_chain]


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


def test_a_verified_chain_is_answered_from_the_cache_until_its_window_ends(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    svid = ca.issue_svid(ID, ttl=600)
    now = [svid.leaf.not_valid_before_utc.timestamp() + 60]
    verifier = PeerVerifier(BundleSet([ca.x509_bundle()]), clock=lambda: now[0])
    calls = []
    real = peer_module.verify_x509_svid
    monkeypatch.setattr(peer_module, "verify_x509_svid", lambda *a: calls.append(1) or real(*a))
    for _ in range(5):
        assert verifier.verify(_der(svid), authorize_any()) == SpiffeId.parse(ID)
    assert len(calls) == 1
    now[0] = svid.leaf.not_valid_after_utc.timestamp() + 1
    with pytest.raises(PeerAuthorizationError, match="expired"):
        verifier.verify(_der(svid), authorize_any())
    assert len(calls) == 2  # past the window: verified again, and refused


def test_the_authorizer_runs_every_time_and_refusals_are_not_cached(ca: TestCA) -> None:
    svid = ca.issue_svid(ID)
    verifier = PeerVerifier(BundleSet([ca.x509_bundle()]))
    answers = iter([None, AuthorizationError("changed its mind"), None])
    seen: list[SpiffeId] = []

    def fickle(peer: SpiffeId) -> None:
        seen.append(peer)
        answer = next(answers)
        if answer is not None:
            raise answer

    verifier.verify(_der(svid), fickle)
    with pytest.raises(PeerAuthorizationError, match="peer refused: changed its mind"):
        verifier.verify(_der(svid), fickle)
    verifier.verify(_der(svid), fickle)
    assert len(seen) == 3
    stranger = TestCA("example.org").issue_svid(ID)
    for _ in range(2):  # a refused chain is verified (and refused) again each time
        with pytest.raises(PeerAuthorizationError, match="own trust domain"):
            verifier.verify(_der(stranger), authorize_any())


def test_the_cache_starts_over_when_full(ca: TestCA, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peer_module, "CACHE_SIZE", 3)
    verifier = PeerVerifier(BundleSet([ca.x509_bundle()]))
    svids = [ca.issue_svid(f"/w{i}") for i in range(7)]
    for svid in svids:
        verifier.verify(_der(svid), authorize_any())
        assert len(verifier._verified) <= 3


def test_no_certificate_and_garbage_are_refused(ca: TestCA) -> None:
    verifier = PeerVerifier(BundleSet([ca.x509_bundle()]))
    with pytest.raises(PeerAuthorizationError, match="presented no certificate"):
        verifier.verify([], authorize_any())
    with pytest.raises(PeerAuthorizationError, match="unreadable"):
        verifier.verify([b"\x30\x03junk"], authorize_any())


def test_without_bundles_only_the_leaf_rules_and_dates_apply(ca: TestCA) -> None:
    """The gRPC interceptor given no source: gRPC verified the chain; the leaf must still be an SVID leaf."""
    verifier = PeerVerifier(None, crls=[b"ignored without bundles"])
    foreign = TestCA("other.org").issue_svid("spiffe://other.org/x")
    assert verifier.verify(_der(foreign), authorize_any()) == SpiffeId.parse("spiffe://other.org/x")
    as_ca = ca.issue_leaf(ca=True, key_cert_sign=True, digital_signature=False)
    with pytest.raises(PeerAuthorizationError, match="CA flag"):
        verifier.verify([c.public_bytes(Encoding.DER) for c in as_ca.cert_chain], authorize_any())
    now = ca.now()
    old = ca.issue_leaf(not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1))
    with pytest.raises(PeerAuthorizationError, match="expired or not yet valid"):
        verifier.verify([c.public_bytes(Encoding.DER) for c in old.cert_chain], authorize_any())


def test_verify_peer_is_one_verification(ca: TestCA) -> None:
    svid = ca.issue_svid(ID)
    bundles = BundleSet([ca.x509_bundle()])
    assert verify_peer(_der(svid), bundles, authorize_id(ID)) == SpiffeId.parse(ID)
    with pytest.raises(PeerAuthorizationError, match="not the expected"):
        verify_peer(_der(svid), bundles, authorize_id("spiffe://example.org/other"))
    refused = PeerAuthorizationError("x")
    assert isinstance(refused, AuthorizationError) and str(refused) == "x"
