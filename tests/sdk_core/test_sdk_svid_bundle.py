"""X509Svid, X509Bundle, BundleSet and the test CA: encodings, construction checks and profile of issued certs."""

from __future__ import annotations

import datetime as dt
import re
from typing import TypeVar

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID

from tessera.sdk.bundle import BundleSet, JwtBundle, X509Bundle
from tessera.sdk.errors import BundleError, SvidError
from tessera.sdk.keys import KEY_KINDS, generate_key, key_id, key_kind, private_key_to_der
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import (
    X509Svid,
    certificates_to_der,
    certificates_to_pem,
    parse_der_certificates,
    parse_pem_certificates,
    spiffe_id_from_certificate,
)
from tessera.sdk.testing import TestCA
from tessera.sdk.x509profile import build_ca_certificate, build_x509_svid, check_x509_svid_leaf


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


E = TypeVar("E", bound=x509.ExtensionType)


def ext(cert: x509.Certificate, cls: type[E]) -> x509.Extension[E]:
    return cert.extensions.get_extension_for_class(cls)


# ---------------------------------------------------------------------------------------------- keys


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048"])
def test_generate_key_kinds(kind: str) -> None:
    key = generate_key(kind)
    assert key_kind(key) == kind
    assert kind in KEY_KINDS


def test_generate_key_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown key kind 'dsa'"):
        generate_key("dsa")


def test_key_id_is_the_ski_value() -> None:
    key = generate_key()
    expected = x509.SubjectKeyIdentifier.from_public_key(key.public_key()).digest.hex()
    assert key_id(key.public_key()) == expected
    assert len(expected) == 40


# ---------------------------------------------------------------------------------------------- profile


def test_issued_leaf_follows_profile(ca: TestCA) -> None:
    svid = ca.issue_svid("/web", dns_names=["web.example.org"])
    leaf = svid.leaf
    assert svid.spiffe_id == SpiffeId.parse("spiffe://example.org/web")
    bc = ext(leaf, x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext(leaf, x509.KeyUsage)
    assert ku.critical
    assert ku.value.digital_signature and not ku.value.key_cert_sign and not ku.value.crl_sign
    assert not ku.value.key_encipherment  # EC key: no key encipherment
    eku = ext(leaf, x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
    san = ext(leaf, x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/web"]
    assert san.get_values_for_type(x509.DNSName) == ["web.example.org"]
    aki = ext(leaf, x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ext(ca.certificate, x509.SubjectKeyIdentifier).value.digest
    assert ext(leaf, x509.SubjectKeyIdentifier).value.digest == bytes.fromhex(key_id(svid.private_key.public_key()))
    assert leaf.serial_number > 0
    assert leaf.not_valid_before_utc <= dt.datetime.now(dt.UTC) - dt.timedelta(seconds=5)


def test_rsa_leaf_has_key_encipherment(ca: TestCA) -> None:
    svid = ca.issue_svid("/rsa", key_kind="rsa-2048")
    assert isinstance(svid.private_key, rsa.RSAPrivateKey)
    assert ext(svid.leaf, x509.KeyUsage).value.key_encipherment


def test_ca_certificate_profile(ca: TestCA) -> None:
    cert = ca.certificate
    bc = ext(cert, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(cert, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert ext(cert, x509.SubjectAlternativeName).value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org"
    ]
    ext(cert, x509.SubjectKeyIdentifier)
    with pytest.raises(x509.ExtensionNotFound):
        ext(cert, x509.AuthorityKeyIdentifier)  # self-signed: no AKI needed
    inter = ca.issue_intermediate()
    assert (
        ext(inter.certificate, x509.AuthorityKeyIdentifier).value.key_identifier
        == ext(cert, x509.SubjectKeyIdentifier).value.digest
    )


def test_leaf_not_after_is_capped_at_issuer() -> None:
    short = TestCA("example.org", ttl=dt.timedelta(minutes=10))
    svid = short.issue_svid("/w", ttl=86400)
    assert svid.leaf.not_valid_after_utc == short.certificate.not_valid_after_utc


def test_intermediate_not_after_is_capped_at_issuer() -> None:
    root_key = generate_key()
    now = dt.datetime.now(dt.UTC)
    root = build_ca_certificate(
        subject_key=root_key, issuer_cert=None, issuer_key=root_key, trust_domain="example.org",
        not_before=now, not_after=now + dt.timedelta(hours=1),
    )  # fmt: skip
    inter = build_ca_certificate(
        subject_key=generate_key(), issuer_cert=root, issuer_key=root_key, trust_domain="example.org",
        not_before=now, not_after=now + dt.timedelta(days=3),
    )  # fmt: skip
    assert inter.not_valid_after_utc == root.not_valid_after_utc


def test_self_signed_ca_must_use_own_key() -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(ValueError, match="own key"):
        build_ca_certificate(
            subject_key=generate_key(), issuer_cert=None, issuer_key=generate_key(), trust_domain="example.org",
            not_before=now, not_after=now + dt.timedelta(hours=1),
        )  # fmt: skip


def test_leaf_needs_a_path(ca: TestCA) -> None:
    now = dt.datetime.now(dt.UTC)
    with pytest.raises(SvidError, match="no path"):
        build_x509_svid(
            public_key=generate_key().public_key(), spiffe_id="spiffe://example.org", issuer_cert=ca.certificate,
            issuer_key=ca.key, not_before=now, not_after=now + dt.timedelta(hours=1),
        )  # fmt: skip


def test_empty_subject_makes_san_critical(ca: TestCA) -> None:
    now = dt.datetime.now(dt.UTC)
    leaf = build_x509_svid(
        public_key=generate_key().public_key(), spiffe_id="spiffe://example.org/x", issuer_cert=ca.certificate,
        issuer_key=ca.key, not_before=now, not_after=now + dt.timedelta(hours=1), subject=x509.Name([]),
    )  # fmt: skip
    assert ext(leaf, x509.SubjectAlternativeName).critical
    assert check_x509_svid_leaf(leaf) == SpiffeId.parse("spiffe://example.org/x")


def test_naive_datetimes_are_refused(ca: TestCA) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        build_x509_svid(
            public_key=generate_key().public_key(), spiffe_id="spiffe://example.org/x", issuer_cert=ca.certificate,
            issuer_key=ca.key, not_before=dt.datetime(2026, 1, 1), not_after=dt.datetime(2026, 1, 2),
        )  # fmt: skip


# ---------------------------------------------------------------------------------------------- X509Svid


def test_svid_der_and_pem_round_trip(ca: TestCA) -> None:
    svid = ca.issue_intermediate().issue_svid("/db", hint="internal")
    assert len(svid.cert_chain) == 2
    again = X509Svid.parse_der(svid.chain_der(), svid.key_der(), hint="internal")
    assert again == svid
    assert X509Svid.parse_pem(svid.chain_pem(), svid.key_pem(), hint="internal") == svid
    assert svid.key_pem().startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8
    assert svid.expires_at == svid.leaf.not_valid_after_utc
    assert svid.expires_at.tzinfo is not None
    assert "PRIVATE" not in repr(svid) and "spiffe://example.org/db" in repr(svid)


def test_svid_rejects_key_that_does_not_match_leaf(ca: TestCA) -> None:
    svid = ca.issue_svid("/web")
    other = generate_key()
    with pytest.raises(SvidError, match="does not match the leaf"):
        X509Svid(svid.spiffe_id, svid.cert_chain, other)
    with pytest.raises(SvidError, match="does not match the leaf"):
        X509Svid.parse_der(svid.chain_der(), ca.issue_svid("/x").key_der())


def test_svid_rejects_wrong_declared_id(ca: TestCA) -> None:
    svid = ca.issue_svid("/web")
    with pytest.raises(SvidError, match=re.escape("leaf certificate names spiffe://example.org/web")):
        X509Svid(SpiffeId.parse("spiffe://example.org/other"), svid.cert_chain, svid.private_key)


def test_svid_rejects_empty_chain_and_garbage() -> None:
    with pytest.raises(SvidError, match="empty certificate chain"):
        X509Svid.parse_der(b"", private_key_to_der(generate_key()))
    with pytest.raises(SvidError, match="not DER"):
        X509Svid.parse_der(b"hello", b"")
    with pytest.raises(SvidError, match="not PEM"):
        X509Svid.parse_pem(b"hello", b"")


def test_svid_rejects_pem_where_der_is_expected(ca: TestCA) -> None:
    svid = ca.issue_svid("/web")
    with pytest.raises(SvidError):
        X509Svid.parse_der(svid.chain_pem(), svid.key_der())
    with pytest.raises(SvidError, match="private key"):
        X509Svid.parse_der(svid.chain_der(), svid.key_pem())


def test_svid_rejects_truncated_chain(ca: TestCA) -> None:
    svid = ca.issue_svid("/web")
    with pytest.raises(SvidError, match="truncated"):
        X509Svid.parse_der(svid.chain_der()[:-3], svid.key_der())


def test_svid_hint_limit(ca: TestCA) -> None:
    svid = ca.issue_svid("/web")
    X509Svid(svid.spiffe_id, svid.cert_chain, svid.private_key, hint="h" * 1024)
    with pytest.raises(SvidError, match="hint"):
        X509Svid(svid.spiffe_id, svid.cert_chain, svid.private_key, hint="h" * 1025)


def test_certificate_helpers(ca: TestCA) -> None:
    svid = ca.issue_intermediate().issue_svid("/x")
    chain = list(svid.cert_chain)
    assert parse_der_certificates(certificates_to_der(chain)) == chain
    assert parse_pem_certificates(certificates_to_pem(chain)) == chain
    assert parse_der_certificates(b"") == []
    assert spiffe_id_from_certificate(svid.leaf) == SpiffeId.parse("spiffe://example.org/x")
    with pytest.raises(SvidError, match="0 URI SANs"):
        spiffe_id_from_certificate(ca.issue_leaf(None).leaf)


# ---------------------------------------------------------------------------------------------- bundles


def test_x509_bundle_der_pem_round_trip(ca: TestCA) -> None:
    other = TestCA("example.org")
    bundle = X509Bundle(ca.trust_domain, (ca.certificate, other.certificate, ca.certificate))
    assert len(bundle) == 2  # duplicates collapse
    assert X509Bundle.parse_der("example.org", bundle.der()) == bundle
    assert X509Bundle.parse_pem(TrustDomain("example.org"), bundle.pem()) == bundle
    assert bundle.contains(other.certificate)
    assert not bundle.contains(TestCA().certificate)


def test_x509_bundle_rejects_empty_and_garbage() -> None:
    with pytest.raises(BundleError, match="empty"):
        X509Bundle.parse_der("example.org", b"")
    with pytest.raises(BundleError, match="empty"):
        X509Bundle.parse_pem("example.org", b"")
    with pytest.raises(BundleError, match="not DER"):
        X509Bundle.parse_der("example.org", b"\x01\x02")
    with pytest.raises(BundleError, match="trust domain"):
        X509Bundle.parse_der("Example.org", b"")


def test_bundle_set_by_trust_domain(ca: TestCA) -> None:
    other = TestCA("other.org")
    bundles = BundleSet([ca.x509_bundle(), other.x509_bundle()])
    assert bundles.get(TrustDomain("other.org")) == other.x509_bundle()
    assert bundles.get("spiffe://example.org") == ca.x509_bundle()
    assert bundles.get("example.org") == ca.x509_bundle()
    assert bundles.get("missing.org") is None
    assert bundles.get("Not A TD") is None
    assert bundles(TrustDomain("other.org")) == other.x509_bundle()
    assert set(bundles) == {TrustDomain("example.org"), TrustDomain("other.org")}
    smaller = bundles.without(TrustDomain("other.org"))
    assert len(smaller) == 1 and len(bundles) == 2
    replaced = bundles.with_bundle(X509Bundle(TrustDomain("other.org"), (ca.certificate,)))
    assert replaced[TrustDomain("other.org")].authorities == (ca.certificate,)
    assert bundles[TrustDomain("other.org")].authorities == (other.certificate,)


def test_jwt_bundle_set(ca: TestCA) -> None:
    jwt_bundles = BundleSet([ca.jwt_bundle()])
    found = jwt_bundles.get("example.org")
    assert isinstance(found, JwtBundle)
    assert found.get(ca.jwt_kid) is not None
