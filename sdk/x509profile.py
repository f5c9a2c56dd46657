"""The X509-SVID certificate profile, written once.

The server's CA, the upstream-signed intermediates and the test CA all build certificates here, and
parsers and verifiers check leaves and signing certificates here, so "what an X509-SVID looks like" has a
single source of truth (SPIFFE X509-SVID standard, plus what Python 3.13's strict verification demands:
AKI on leaves, SKI on CAs, critical basicConstraints).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from tessera.sdk.errors import SpiffeIdError, SvidError, TesseraError
from tessera.sdk.keys import PrivateKey, PublicKey, as_public_key, public_keys_equal, signature_hash
from tessera.sdk.spiffeid import SpiffeId, TrustDomain

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: What ``cryptography`` raises, lazily, when a certificate's fields or extensions are malformed. Parsers
#: force these errors at parse time and turn them into Tessera errors, so hostile input fails cleanly.
MALFORMED_CERTIFICATE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)


def load_der_certificate(der: bytes, what: str = "certificate") -> x509.Certificate:
    """Loads one DER certificate and parses its extensions and key now, raising :class:`SvidError` if bad."""
    try:
        cert = x509.load_der_x509_certificate(der)
    except MALFORMED_CERTIFICATE_ERRORS as exc:
        raise SvidError(f"{what} is not valid DER: {exc}") from None
    check_parseable(cert, what)
    return cert


def check_parseable(cert: x509.Certificate, what: str = "certificate", error: type[TesseraError] = SvidError) -> None:
    """Forces ``cryptography``'s lazy parsing of the parts Tessera reads (extensions, key, validity)."""
    try:
        _ = cert.extensions
        as_public_key(cert.public_key())
        _ = (cert.not_valid_before_utc, cert.not_valid_after_utc, cert.subject, cert.issuer)
    except SvidError as exc:
        raise error(f"{what}: {exc}") from None
    except MALFORMED_CERTIFICATE_ERRORS as exc:
        raise error(f"{what} is malformed: {exc}") from None


DEFAULT_CA_COMMON_NAME = "Tessera CA"
DEFAULT_ORGANIZATION = "Tessera"


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError("certificate times must be timezone-aware datetimes")
    return value.astimezone(dt.UTC)


def _public(key: PrivateKey | PublicKey) -> PublicKey:
    if hasattr(key, "public_key"):
        return as_public_key(key.public_key())
    return as_public_key(key)


def subject_key_identifier(cert: x509.Certificate) -> bytes:
    """The certificate's SKI, or the RFC 5280 method-1 value computed from its key when the extension is absent."""
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(as_public_key(cert.public_key())).digest


def _ca_key_usage() -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )


def _leaf_key_usage_for(*, rsa_key: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


def build_ca_certificate(
    *,
    subject_key: PrivateKey | PublicKey,
    issuer_cert: x509.Certificate | None,
    issuer_key: PrivateKey,
    trust_domain: TrustDomain | str,
    not_before: dt.datetime,
    not_after: dt.datetime,
    serial: int | None = None,
    common_name: str = DEFAULT_CA_COMMON_NAME,
    subject: x509.Name | None = None,
    path_length: int | None = None,
) -> x509.Certificate:
    """A CA certificate for the trust domain: self-signed when ``issuer_cert`` is None, else an intermediate.

    An intermediate's notAfter is capped at its issuer's, because a certificate outliving its issuer is
    unusable after the issuer expires and only hides the real expiry from operators.
    """
    td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain.parse(trust_domain)
    public_key = _public(subject_key)
    not_before = _utc(not_before)
    not_after = _utc(not_after)
    if subject is None:
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEFAULT_ORGANIZATION),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
    if issuer_cert is None:
        issuer_name = subject
        if not public_keys_equal(_public(issuer_key), public_key):
            raise ValueError("a self-signed CA certificate must be signed by its own key")
    else:
        issuer_name = issuer_cert.subject
        not_after = min(not_after, issuer_cert.not_valid_after_utc)
        not_before = max(not_before, issuer_cert.not_valid_before_utc)
    if not_after <= not_before:
        raise ValueError("CA certificate would be valid for no time at all (notAfter <= notBefore)")
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(public_key)
        .serial_number(serial if serial is not None else x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ca_key_usage(), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(td.id_string)]), critical=False)
    )
    if issuer_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier(subject_key_identifier(issuer_cert), None, None), critical=False
        )
    return builder.sign(issuer_key, signature_hash(issuer_key))  # type: ignore[arg-type]


def build_x509_svid(
    *,
    public_key: PublicKey | PrivateKey,
    spiffe_id: SpiffeId | str,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    not_before: dt.datetime,
    not_after: dt.datetime,
    dns_names: Sequence[str] = (),
    ip_addresses: Sequence[IPAddress | str] = (),
    serial: int | None = None,
    subject: x509.Name | None = None,
) -> x509.Certificate:
    """An X509-SVID leaf exactly per the SPIFFE profile, signed by ``issuer_key``.

    notAfter is capped at the issuer's notAfter (a leaf must never outlive the CA that vouches for it).
    The ID must have a path: a bare trust domain ID names the domain, not a workload.

    This is the server's hot path (every SVID of a batch). The builder is created in one call with all its
    fields, the constant extensions are DER-encoded once, and the issuer's name, validity and AKI are read
    once per CA: the fluent ``add_extension`` chain copied the builder and re-checked duplicates six times
    per certificate, and re-encoding constant extensions is pure waste. The checks the fluent setters make
    (serial range, dates after 1950) are made here; the DER produced is byte-for-byte what the fluent
    builder produces (tests/perf/test_perf_x509profile.py compares them).
    """
    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    if not sid.is_workload_id():
        raise SvidError(f"{sid} has no path; an X509-SVID names a workload, so its ID needs a path")
    public_key = _public(public_key)
    issuer = _issuer_parts(issuer_cert)
    not_before = max(_utc(not_before), issuer.not_before)
    not_after = min(_utc(not_after), issuer.not_after)
    if not_after <= not_before:
        raise SvidError("X509-SVID would be valid for no time at all (the issuing CA has expired?)")
    if not_before < _EARLIEST_TIME:
        raise ValueError("certificate notBefore must be on or after 1950-01-01")
    if serial is None:
        serial = x509.random_serial_number() or 1
    elif not isinstance(serial, int) or serial <= 0 or serial.bit_length() >= 160:
        raise ValueError("certificate serial must be a positive integer of at most 159 bits (RFC 5280)")
    if subject is None:
        if dns_names:
            subject = x509.Name(
                [
                    x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEFAULT_ORGANIZATION),
                    x509.NameAttribute(NameOID.COMMON_NAME, dns_names[0]),
                ]
            )
        else:
            subject = _DEFAULT_LEAF_SUBJECT
    general_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(sid))]
    general_names += [x509.DNSName(name) for name in dns_names]
    general_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    extensions: list[x509.Extension[x509.ExtensionType]] = [
        _LEAF_BASIC_CONSTRAINTS,
        _LEAF_KEY_USAGE_RSA if isinstance(public_key, rsa.RSAPublicKey) else _LEAF_KEY_USAGE,
        _LEAF_EXTENDED_KEY_USAGE,
        x509.Extension(_SKI_OID, False, x509.SubjectKeyIdentifier.from_public_key(public_key)),
        issuer.authority_key_identifier,
        # An empty subject makes the SAN the only name, and RFC 5280 then requires it to be critical.
        x509.Extension(_SAN_OID, len(subject) == 0, x509.SubjectAlternativeName(general_names)),
    ]
    builder = x509.CertificateBuilder(
        issuer_name=issuer.name,
        subject_name=subject,
        public_key=public_key,
        serial_number=serial,
        not_valid_before=not_before.replace(tzinfo=None),
        not_valid_after=not_after.replace(tzinfo=None),
        extensions=extensions,
    )
    return builder.sign(issuer_key, signature_hash(issuer_key))  # type: ignore[arg-type]


_EARLIEST_TIME = dt.datetime(1950, 1, 1, tzinfo=dt.UTC)
_SKI_OID = ExtensionOID.SUBJECT_KEY_IDENTIFIER
_SAN_OID = ExtensionOID.SUBJECT_ALTERNATIVE_NAME
_DEFAULT_LEAF_SUBJECT = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, DEFAULT_ORGANIZATION)])


def _preencoded(value: x509.ExtensionType, critical: bool) -> x509.Extension[x509.ExtensionType]:
    """An extension whose DER (``cryptography``'s own encoding of ``value``) is computed once, not per leaf."""
    return x509.Extension(value.oid, critical, x509.UnrecognizedExtension(value.oid, value.public_bytes()))


_LEAF_BASIC_CONSTRAINTS = _preencoded(x509.BasicConstraints(ca=False, path_length=None), critical=True)
_LEAF_KEY_USAGE = _preencoded(_leaf_key_usage_for(rsa_key=False), critical=True)
_LEAF_KEY_USAGE_RSA = _preencoded(_leaf_key_usage_for(rsa_key=True), critical=True)
_LEAF_EXTENDED_KEY_USAGE = _preencoded(
    x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
)


@dataclass(frozen=True, slots=True)
class _IssuerParts:
    certificate: x509.Certificate
    """Held so that the cache key, ``id(certificate)``, cannot be reused by another object."""
    name: x509.Name
    not_before: dt.datetime
    not_after: dt.datetime
    authority_key_identifier: x509.Extension[x509.ExtensionType]


_ISSUER_CACHE_SIZE = 16
_issuer_cache: dict[int, _IssuerParts] = {}


def _issuer_parts(issuer_cert: x509.Certificate) -> _IssuerParts:
    """What every leaf takes from its issuer, read (and the AKI encoded) once per CA certificate object.

    A server holds a handful of CAs over its life (rotation), tests make many: the cache is small and simply
    starts over when full. Concurrent callers may both compute an entry; both results are equal.
    """
    parts = _issuer_cache.get(id(issuer_cert))
    if parts is not None and parts.certificate is issuer_cert:
        return parts
    aki = x509.AuthorityKeyIdentifier(subject_key_identifier(issuer_cert), None, None)
    parts = _IssuerParts(
        certificate=issuer_cert,
        name=issuer_cert.subject,
        not_before=issuer_cert.not_valid_before_utc,
        not_after=issuer_cert.not_valid_after_utc,
        authority_key_identifier=_preencoded(aki, critical=False),
    )
    if len(_issuer_cache) >= _ISSUER_CACHE_SIZE:
        _issuer_cache.clear()
    _issuer_cache[id(issuer_cert)] = parts
    return parts


# --------------------------------------------------------------------------------------------------------
# Checks


def uri_sans(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return []
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def check_x509_svid_leaf(cert: x509.Certificate, error: type[TesseraError] = SvidError) -> SpiffeId:
    """Checks the leaf rules of the X509-SVID profile and returns its SPIFFE ID.

    Raises ``error`` (SvidError by default; the verifier passes VerificationError) naming the broken rule.
    Validity dates are not checked here: a parsed SVID may be expired, verification decides about time.
    """
    uris = uri_sans(cert)
    if not uris:
        raise error("leaf certificate has no URI SAN; an X509-SVID carries exactly one SPIFFE ID")
    if len(uris) > 1:
        raise error(f"leaf certificate has {len(uris)} URI SANs; an X509-SVID must have exactly one")
    try:
        sid = SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise error(f"leaf certificate's URI SAN is not a valid SPIFFE ID: {exc}") from None
    if not sid.is_workload_id():
        raise error(f"leaf certificate's SPIFFE ID {sid} has no path; a workload SVID ID needs one")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise error("leaf certificate has no basicConstraints extension") from None
    if bc.ca:
        raise error("leaf certificate has the CA flag set (basicConstraints cA=true)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise error("leaf certificate has no keyUsage extension") from None
    if ku.key_cert_sign:
        raise error("leaf certificate has keyCertSign in keyUsage; only CA certificates may sign certificates")
    if ku.crl_sign:
        raise error("leaf certificate has cRLSign in keyUsage; only CA certificates may sign CRLs")
    if not ku.digital_signature:
        raise error("leaf certificate lacks digitalSignature in keyUsage")
    return sid


def check_signing_certificate(
    cert: x509.Certificate, error: type[TesseraError] = SvidError, what: str = "intermediate certificate"
) -> None:
    """Checks that a certificate may sign others: CA flag and keyCertSign (as go-spiffe requires)."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise error(f"{what} {cert.subject.rfc4514_string()!r} has no basicConstraints; it cannot be a CA") from None
    if not bc.ca:
        raise error(f"{what} {cert.subject.rfc4514_string()!r} does not have the CA flag set (cA=false)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise error(f"{what} {cert.subject.rfc4514_string()!r} has no keyUsage; keyCertSign is required") from None
    if not ku.key_cert_sign:
        raise error(f"{what} {cert.subject.rfc4514_string()!r} lacks keyCertSign in keyUsage")
