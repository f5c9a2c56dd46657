"""verify_x509_svid and the X509Svid construction checks: each profile rule broken once, rejected for that rule."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tessera.sdk.bundle import BundleSet, X509Bundle
from tessera.sdk.errors import SvidError, VerificationError
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import X509Svid
from tessera.sdk.testing import IssuedCertificate, TestCA
from tessera.sdk.verify import verify_x509_svid

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org", now=NOW)


@pytest.fixture(scope="module")
def other_ca() -> TestCA:
    return TestCA("other.org", now=NOW)


def test_valid_svid_verifies(ca: TestCA) -> None:
    svid = ca.issue_svid("/web")
    sid, chain = verify_x509_svid(svid.cert_chain, ca.x509_bundle(), now=NOW)
    assert sid == SpiffeId.parse("spiffe://example.org/web")
    assert chain == [svid.leaf, ca.certificate]


def test_valid_svid_through_two_intermediates(ca: TestCA) -> None:
    inner = ca.issue_intermediate().issue_intermediate()
    svid = inner.issue_svid("/deep")
    assert len(svid.cert_chain) == 3
    sid, chain = verify_x509_svid(svid.cert_chain, ca.x509_bundle(), now=NOW)
    assert sid.path == "/deep"
    assert chain == [*svid.cert_chain, ca.certificate]


@pytest.mark.parametrize("key_kind", ["ec-p384", "rsa-2048"])
def test_other_key_kinds_verify(key_kind: str) -> None:
    ca = TestCA("example.org", key_kind=key_kind, now=NOW)
    svid = ca.issue_svid("/k", key_kind=key_kind)
    assert verify_x509_svid(svid.cert_chain, ca.x509_bundle(), now=NOW)[0].path == "/k"


def test_bundle_sources(ca: TestCA, other_ca: TestCA) -> None:
    svid = ca.issue_svid("/web")
    bundles = BundleSet([other_ca.x509_bundle(), ca.x509_bundle()])
    assert verify_x509_svid(svid.cert_chain, bundles, now=NOW)[0] == svid.spiffe_id
    assert verify_x509_svid(svid.cert_chain, bundles.get, now=NOW)[0] == svid.spiffe_id  # callable
    lookups: list[TrustDomain] = []

    def source(td: TrustDomain) -> X509Bundle | None:
        lookups.append(td)
        return bundles.get(td)

    verify_x509_svid(svid.cert_chain, source, now=NOW)
    assert lookups == [TrustDomain("example.org")]


def test_verification_uses_real_time_by_default(ca: TestCA) -> None:
    svid = TestCA("example.org").issue_svid("/now")
    with pytest.raises(VerificationError, match="does not chain"):
        verify_x509_svid(svid.cert_chain, ca.x509_bundle())


def test_naive_now_is_refused(ca: TestCA) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        verify_x509_svid(ca.issue_svid("/w").cert_chain, ca.x509_bundle(), now=dt.datetime(2026, 1, 1))


# ------------------------------------------------------------------ each broken certificate, rejected for its rule


def _leaf_case(**kwargs: object) -> Callable[[TestCA], IssuedCertificate]:
    return lambda ca: ca.issue_leaf(**kwargs)  # type: ignore[arg-type]


LEAF_CASES: list[tuple[str, Callable[[TestCA], IssuedCertificate], str]] = [
    ("ca_flag", _leaf_case(ca=True), "CA flag set"),
    ("key_cert_sign", _leaf_case(key_cert_sign=True), "keyCertSign"),
    ("crl_sign", _leaf_case(crl_sign=True), "cRLSign"),
    ("no_digital_signature", _leaf_case(digital_signature=False, key_encipherment=True), "lacks digitalSignature"),
    (
        "two_uri_sans",
        _leaf_case(uri_sans=["spiffe://example.org/a", "spiffe://example.org/b"]),
        "2 URI SANs",
    ),
    ("no_uri_san", _leaf_case(spiffe_id=None), "no URI SAN"),
    ("no_path", _leaf_case(uri_sans=["spiffe://example.org"]), "has no path"),
    ("bad_spiffe_id", _leaf_case(uri_sans=["spiffe://Example.org/x"]), "not a valid SPIFFE ID"),
    ("not_spiffe_uri", _leaf_case(uri_sans=["https://example.org/x"]), "not a valid SPIFFE ID"),
    ("no_basic_constraints", _leaf_case(basic_constraints=False), "no basicConstraints"),
    ("no_key_usage", _leaf_case(key_usage=False), "no keyUsage"),
]


@pytest.mark.parametrize(("name", "make", "message"), LEAF_CASES, ids=[c[0] for c in LEAF_CASES])
def test_broken_leaf_rejected_by_verify_and_by_x509svid(
    ca: TestCA, name: str, make: Callable[[TestCA], IssuedCertificate], message: str
) -> None:
    issued = make(ca)
    with pytest.raises(VerificationError, match=re.escape(message)):
        verify_x509_svid(issued.cert_chain, ca.x509_bundle(), now=NOW)
    with pytest.raises(SvidError, match=re.escape(message)):
        X509Svid.parse_der(issued.chain_der(), issued.key_der())


def test_broken_leaf_knobs_default_to_a_valid_leaf(ca: TestCA) -> None:
    """The knob-built leaf with no knob turned verifies, so each case above fails only for its knob."""
    issued = ca.issue_leaf("/knobs")
    assert verify_x509_svid(issued.cert_chain, ca.x509_bundle(), now=NOW)[0].path == "/knobs"
    assert X509Svid.parse_der(issued.chain_der(), issued.key_der()).spiffe_id.path == "/knobs"


def test_expired_leaf(ca: TestCA) -> None:
    issued = ca.issue_leaf(not_before=NOW - dt.timedelta(hours=2), not_after=NOW - dt.timedelta(hours=1))
    with pytest.raises(
        VerificationError, match=re.escape("leaf certificate of spiffe://example.org/workload has expired")
    ):
        verify_x509_svid(issued.cert_chain, ca.x509_bundle(), now=NOW)
    # An expired SVID is still well-formed: parsing it works, verifying it does not.
    assert X509Svid.parse_der(issued.chain_der(), issued.key_der()).expires_at < NOW


def test_not_yet_valid_leaf(ca: TestCA) -> None:
    issued = ca.issue_leaf(not_before=NOW + dt.timedelta(hours=1), not_after=NOW + dt.timedelta(hours=2))
    with pytest.raises(VerificationError, match="is not yet valid"):
        verify_x509_svid(issued.cert_chain, ca.x509_bundle(), now=NOW)


def test_svid_verified_at_a_later_time_expires(ca: TestCA) -> None:
    svid = ca.issue_svid("/w", ttl=60)
    verify_x509_svid(svid.cert_chain, ca.x509_bundle(), now=NOW + dt.timedelta(seconds=30))
    with pytest.raises(VerificationError, match="has expired"):
        verify_x509_svid(svid.cert_chain, ca.x509_bundle(), now=NOW + dt.timedelta(seconds=61))


def test_expired_intermediate() -> None:
    root = TestCA("example.org", now=NOW)
    inter = root.issue_intermediate(not_before=NOW - dt.timedelta(hours=3), not_after=NOW - dt.timedelta(hours=1))
    issued = inter.issue_leaf(not_before=NOW - dt.timedelta(hours=2), not_after=NOW + dt.timedelta(hours=1))
    with pytest.raises(VerificationError, match=r"intermediate certificate #1 .* has expired"):
        verify_x509_svid(issued.cert_chain, root.x509_bundle(), now=NOW)


def test_expired_root() -> None:
    root = TestCA("example.org", not_before=NOW - dt.timedelta(days=2), not_after=NOW - dt.timedelta(days=1))
    issued = root.issue_leaf(not_before=NOW - dt.timedelta(hours=1), not_after=NOW + dt.timedelta(hours=1))
    with pytest.raises(VerificationError, match=r"does not chain.*not valid at validation time"):
        verify_x509_svid(issued.cert_chain, root.x509_bundle(), now=NOW)


def test_leaf_in_wrong_trust_domain(ca: TestCA, other_ca: TestCA) -> None:
    """A CA of other.org signing an example.org ID is refused even when other.org's bundle is trusted."""
    issued = other_ca.issue_leaf("spiffe://example.org/admin")
    bundles = BundleSet([other_ca.x509_bundle(), ca.x509_bundle()])
    with pytest.raises(
        VerificationError, match=re.escape("does not chain to the X.509 bundle of trust domain example.org")
    ):
        verify_x509_svid(issued.cert_chain, bundles, now=NOW)


def test_unknown_trust_domain(ca: TestCA, other_ca: TestCA) -> None:
    svid = other_ca.issue_svid("/web")
    with pytest.raises(VerificationError, match=r"no X.509 bundle for trust domain other.org \(unknown"):
        verify_x509_svid(svid.cert_chain, BundleSet([ca.x509_bundle()]), now=NOW)
    with pytest.raises(VerificationError, match=re.escape("the only bundle given is for example.org")):
        verify_x509_svid(svid.cert_chain, ca.x509_bundle(), now=NOW)
    with pytest.raises(VerificationError, match="unknown trust domain"):
        verify_x509_svid(svid.cert_chain, lambda td: None, now=NOW)


def test_bundle_source_returning_wrong_domain(ca: TestCA, other_ca: TestCA) -> None:
    svid = other_ca.issue_svid("/web")
    with pytest.raises(VerificationError, match=re.escape("returned the bundle of example.org")):
        verify_x509_svid(svid.cert_chain, lambda td: ca.x509_bundle(), now=NOW)


def test_empty_bundle(ca: TestCA) -> None:
    with pytest.raises(VerificationError, match="has no authorities"):
        verify_x509_svid(ca.issue_svid("/w").cert_chain, X509Bundle(ca.trust_domain, ()), now=NOW)


def test_chain_to_a_foreign_bundle(ca: TestCA) -> None:
    """Same trust domain name, different CA: the signature cannot chain to the bundle's roots."""
    impostor = TestCA("example.org", now=NOW)
    svid = impostor.issue_svid("/web")
    with pytest.raises(
        VerificationError, match=re.escape("does not chain to the X.509 bundle of trust domain example.org")
    ):
        verify_x509_svid(svid.cert_chain, ca.x509_bundle(), now=NOW)


def test_foreign_intermediate_in_chain(ca: TestCA) -> None:
    foreign = TestCA("example.org", now=NOW).issue_intermediate()
    svid = foreign.issue_svid("/web")
    with pytest.raises(VerificationError, match="does not chain"):
        verify_x509_svid(svid.cert_chain, ca.x509_bundle(), now=NOW)


def test_missing_intermediate(ca: TestCA) -> None:
    svid = ca.issue_intermediate().issue_svid("/web")
    with pytest.raises(VerificationError, match="does not chain"):
        verify_x509_svid(svid.cert_chain[:1], ca.x509_bundle(), now=NOW)


def test_empty_chain(ca: TestCA) -> None:
    with pytest.raises(VerificationError, match="empty chain"):
        verify_x509_svid([], ca.x509_bundle(), now=NOW)


INTERMEDIATE_CASES = [
    ({"ca": False}, "does not have the CA flag set"),
    ({"key_cert_sign": False}, "lacks keyCertSign"),
    ({"basic_constraints": False}, "has no basicConstraints"),
    ({"key_usage": False}, "has no keyUsage"),
]


@pytest.mark.parametrize(("defect", "message"), INTERMEDIATE_CASES, ids=[m for _, m in INTERMEDIATE_CASES])
def test_broken_intermediate(ca: TestCA, defect: dict[str, bool], message: str) -> None:
    broken = ca.issue_intermediate(**defect)  # type: ignore[arg-type]
    issued = broken.issue_leaf("/behind-broken-intermediate")
    with pytest.raises(VerificationError, match=re.escape(message)):
        verify_x509_svid(issued.cert_chain, ca.x509_bundle(), now=NOW)
    with pytest.raises(SvidError, match=re.escape(message)):
        X509Svid.parse_der(issued.chain_der(), issued.key_der())
    with pytest.raises(SvidError, match=re.escape(message)):
        broken.issue_svid("/refused")


def test_leaf_signed_by_non_ca_not_listed_as_intermediate(ca: TestCA) -> None:
    """A leaf signed by another leaf's key fails path validation even if the fake issuer is not in the chain."""
    victim = ca.issue_svid("/victim")
    fake = TestCA.__new__(TestCA)
    fake.__dict__.update(ca.__dict__)
    fake.key = victim.private_key
    fake.certificate = victim.leaf
    fake.intermediates = ()
    issued = fake.issue_leaf("/escalated")
    with pytest.raises(VerificationError, match="does not chain"):
        verify_x509_svid(issued.cert_chain, ca.x509_bundle(), now=NOW)
    chained = IssuedCertificate((issued.leaf, victim.leaf), issued.private_key)
    with pytest.raises(VerificationError, match="does not have the CA flag set"):
        verify_x509_svid(chained.cert_chain, ca.x509_bundle(), now=NOW)


def test_leaf_without_aki_and_eku_still_verifies(ca: TestCA) -> None:
    """SPIFFE does not require AKI or EKU on a leaf; other implementations' SVIDs may lack them."""
    issued = ca.issue_leaf("/minimal", aki=False, eku=False, ski=False)
    assert verify_x509_svid(issued.cert_chain, ca.x509_bundle(), now=NOW)[0].path == "/minimal"


def test_bundle_holding_an_intermediate_as_anchor(ca: TestCA) -> None:
    inter = ca.issue_intermediate()
    svid = inter.issue_svid("/w")
    bundle = X509Bundle(ca.trust_domain, (inter.certificate,))
    _, chain = verify_x509_svid(svid.cert_chain[:1], bundle, now=NOW)
    assert chain == [svid.leaf, inter.certificate]


def test_verified_chain_types(ca: TestCA) -> None:
    _, chain = verify_x509_svid(ca.issue_svid("/w").cert_chain, ca.x509_bundle(), now=NOW)
    assert all(isinstance(c, x509.Certificate) for c in chain)


def test_unsupported_key_type_in_leaf(ca: TestCA) -> None:
    """A DSA leaf (signed by a real CA) is refused cleanly by parser and verifier, not with a stray exception."""
    from cryptography.hazmat.primitives.asymmetric import dsa

    dsa_key = dsa.generate_private_key(2048)
    good = ca.issue_leaf("/dsa")
    leaf = (
        x509.CertificateBuilder()
        .subject_name(good.leaf.subject)
        .issuer_name(ca.certificate.subject)
        .public_key(dsa_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(good.leaf.not_valid_before_utc)
        .not_valid_after(good.leaf.not_valid_after_utc)
    )
    for extension in good.leaf.extensions:
        if not isinstance(extension.value, x509.SubjectKeyIdentifier):
            leaf = leaf.add_extension(extension.value, extension.critical)
    cert = leaf.sign(ca.key, hashes.SHA256())
    with pytest.raises(VerificationError, match="leaf certificate: unsupported public key type"):
        verify_x509_svid([cert], ca.x509_bundle(), now=NOW)
    with pytest.raises(SvidError, match="unsupported public key type"):
        X509Svid.parse_der(cert.public_bytes(serialization.Encoding.DER), good.key_der())
