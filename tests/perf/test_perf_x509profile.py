"""build_x509_svid's fast construction produces exactly the certificate the plain fluent builder produces.

The fast path (one-call builder, constant extensions DER-encoded once, issuer parts cached per CA) is only
acceptable if the profile is unchanged to the byte: these tests rebuild each leaf's TBSCertificate with
`cryptography`'s fluent builder from the written-out profile and compare the DER.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.sdk.errors import SvidError
from tessera.sdk.keys import PrivateKey, PublicKey, generate_key, signature_hash
from tessera.sdk.x509profile import build_ca_certificate, build_x509_svid, check_x509_svid_leaf

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)


def _ca(kind: str) -> tuple[x509.Certificate, PrivateKey]:
    key = generate_key(kind)
    cert = build_ca_certificate(
        subject_key=key,
        issuer_cert=None,
        issuer_key=key,
        trust_domain="example.org",
        not_before=NOW - dt.timedelta(hours=1),
        not_after=NOW + dt.timedelta(days=1),
    )
    return cert, key


def _reference(
    public_key: PublicKey,
    spiffe_id: str,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[str] = (),
    subject: x509.Name | None = None,
) -> x509.Certificate:
    """The X509-SVID profile written out with the fluent builder, as the profile module did before."""
    not_before = max(not_before, issuer_cert.not_valid_before_utc)
    not_after = min(not_after, issuer_cert.not_valid_after_utc)
    if subject is None:
        attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera")]
        if dns_names:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0]))
        subject = x509.Name(attrs)
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    names += [x509.DNSName(n) for n in dns_names]
    names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    issuer_ski = issuer_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject)
        .public_key(public_key)
        .serial_number(serial)
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                True, False, isinstance(public_key, rsa.RSAPublicKey), False, False, False, False, False, False
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier(issuer_ski, None, None), critical=False)
        .add_extension(x509.SubjectAlternativeName(names), critical=len(subject) == 0)
    )
    return builder.sign(issuer_key, signature_hash(issuer_key))  # type: ignore[arg-type]


CASES = [
    pytest.param("ec-p256", "ec-p256", (), (), None, id="ec-leaf-ec-ca"),
    pytest.param("ec-p384", "ec-p256", ("web.example.org", "alt.example.org"), ("10.0.0.1", "::1"), None, id="dns-ip"),
    pytest.param("rsa-2048", "ec-p384", ("svc.example.org",), (), None, id="rsa-leaf-p384-ca"),
    pytest.param("ec-p256", "rsa-2048", (), (), x509.Name([]), id="empty-subject-rsa-ca"),
]


@pytest.mark.parametrize(("leaf_kind", "ca_kind", "dns_names", "ips", "subject"), CASES)
def test_fast_leaf_is_byte_identical_to_the_fluent_builder(
    leaf_kind: str, ca_kind: str, dns_names: tuple[str, ...], ips: tuple[str, ...], subject: x509.Name | None
) -> None:
    ca_cert, ca_key = _ca(ca_kind)
    public_key = generate_key(leaf_kind).public_key()
    not_before = NOW - dt.timedelta(hours=2)  # before the CA's: capped at the CA's notBefore
    not_after = NOW + dt.timedelta(days=3)  # after the CA's: capped at the CA's notAfter
    serial = 0x1234567890ABCDEF
    sid = "spiffe://example.org/workload/a"
    fast = build_x509_svid(
        public_key=public_key,
        spiffe_id=sid,
        issuer_cert=ca_cert,
        issuer_key=ca_key,
        dns_names=dns_names,
        ip_addresses=ips,
        subject=subject,
        not_before=not_before,
        not_after=not_after,
        serial=serial,
    )
    reference = _reference(public_key, sid, ca_cert, ca_key, not_before, not_after, serial, dns_names, ips, subject)
    assert fast.tbs_certificate_bytes == reference.tbs_certificate_bytes
    fast.verify_directly_issued_by(ca_cert)
    assert str(check_x509_svid_leaf(fast)) == sid
    # The parsed leaf carries the real extension types, not opaque pre-encoded ones.
    assert fast.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is False
    assert fast.extensions.get_extension_for_class(x509.ExtendedKeyUsage).critical is False


def test_issuer_parts_follow_the_issuer_object() -> None:
    """Two CAs used alternately (rotation) each get their own issuer name, AKI and validity cap."""
    (ca1, key1), (ca2, key2) = _ca("ec-p256"), _ca("ec-p256")
    public_key = generate_key().public_key()
    for ca, key in ((ca1, key1), (ca2, key2), (ca1, key1)):
        leaf = build_x509_svid(
            public_key=public_key,
            spiffe_id="spiffe://example.org/w",
            issuer_cert=ca,
            issuer_key=key,
            not_before=NOW,
            not_after=NOW + dt.timedelta(hours=1),
        )
        leaf.verify_directly_issued_by(ca)
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki == ca.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest


@pytest.mark.parametrize("serial", [0, -5, 1 << 159])
def test_out_of_range_serial_is_refused(serial: int) -> None:
    ca, key = _ca("ec-p256")
    with pytest.raises(ValueError, match="serial"):
        build_x509_svid(
            public_key=ec.generate_private_key(ec.SECP256R1()).public_key(),
            spiffe_id="spiffe://example.org/w",
            issuer_cert=ca,
            issuer_key=key,
            not_before=NOW,
            not_after=NOW + dt.timedelta(hours=1),
            serial=serial,
        )


def test_expired_issuer_still_refused() -> None:
    ca, key = _ca("ec-p256")
    with pytest.raises(SvidError, match="no time at all"):
        build_x509_svid(
            public_key=generate_key().public_key(),
            spiffe_id="spiffe://example.org/w",
            issuer_cert=ca,
            issuer_key=key,
            not_before=NOW + dt.timedelta(days=2),
            not_after=NOW + dt.timedelta(days=3),
        )
