"""Interoperability with the `spiffe` PyPI package (the reference Python SPIFFE library).

What tessera.sdk writes, the `spiffe` package reads, and the other way round: X509-SVIDs (DER and PEM),
X.509 bundles, JWT bundles, JWT-SVIDs; both refuse the same broken leaves; both packages' generated
Workload API protos load in one process.

The `spiffe` package (0.3.x) has no parser for the SPIFFE bundle *document*: its JwtBundle.parse reads a
plain JWKS through PyJWT and requires a ``kid`` on every entry, so it refuses a document that also carries
``x509-svid`` entries (which have no kid, by the SPIFFE format). The document tests below therefore check a
JWT-only document with that parser, and the X.509 entries with the package's own DER certificate parser.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import spiffe
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.api_jwk import PyJWKSet
from spiffe.bundle.jwt_bundle.errors import ParseJWTBundleError
from spiffe.svid.errors import InvalidLeafCertificateError
from spiffe.utils.certificate_utils import parse_der_certificates as spiffe_parse_der

from tessera.sdk.bundle import JwtBundle, SpiffeBundle, X509Bundle
from tessera.sdk.errors import SpiffeIdError, SvidError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.keys import as_public_key, generate_key, key_id, public_keys_equal
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import X509Svid
from tessera.sdk.testing import IssuedCertificate, TestCA

TD = "example.org"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA(TD)


def der(cert: object) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)  # type: ignore[attr-defined, no-any-return]


# ------------------------------------------------------------------------------------------------ X509-SVIDs


@pytest.mark.parametrize("key_kind", ["ec-p256", "ec-p384", "rsa-2048"])
def test_our_svid_parses_in_spiffe(ca: TestCA, key_kind: str) -> None:
    ours = ca.issue_intermediate().issue_svid("/web", dns_names=["web.local"], key_kind=key_kind)
    theirs = spiffe.X509Svid.parse_raw(ours.chain_der(), ours.key_der())
    assert str(theirs.spiffe_id) == "spiffe://example.org/web"
    assert [der(c) for c in theirs.cert_chain] == [der(c) for c in ours.cert_chain]
    assert public_keys_equal(as_public_key(theirs.private_key.public_key()), ours.private_key.public_key())
    from_pem = spiffe.X509Svid.parse(ours.chain_pem(), ours.key_pem())
    assert str(from_pem.spiffe_id) == str(ours.spiffe_id)


def test_spiffe_serialized_svid_parses_in_ours(ca: TestCA, tmp_path: Path) -> None:
    ours = ca.issue_intermediate().issue_svid("/db")
    theirs = spiffe.X509Svid.parse_raw(ours.chain_der(), ours.key_der())
    directory = tmp_path
    for label, encoding, parse in [
        ("der", serialization.Encoding.DER, X509Svid.parse_der),
        ("pem", serialization.Encoding.PEM, X509Svid.parse_pem),
    ]:
        chain_path, key_path = directory / f"svid.{label}", directory / f"key.{label}"
        theirs.save(chain_path, key_path, encoding)
        again = parse(chain_path.read_bytes(), key_path.read_bytes())
        assert again == ours
        assert again.spiffe_id == SpiffeId.parse(str(theirs.spiffe_id))


def test_spiffe_built_svid_parses_in_ours(ca: TestCA, tmp_path: Path) -> None:
    """An X509Svid object assembled by the spiffe package (its own constructor) round-trips through ours."""
    issued = ca.issue_leaf("/assembled")
    theirs = spiffe.X509Svid(
        spiffe.SpiffeId("spiffe://example.org/assembled"), list(issued.cert_chain), issued.private_key
    )
    directory = tmp_path
    theirs.save(directory / "c.der", directory / "k.der", serialization.Encoding.DER)
    ours = X509Svid.parse_der((directory / "c.der").read_bytes(), (directory / "k.der").read_bytes())
    assert str(ours.spiffe_id) == "spiffe://example.org/assembled"


BROKEN: list[tuple[str, Callable[[TestCA], IssuedCertificate]]] = [
    ("ca_flag", lambda ca: ca.issue_leaf(ca=True)),
    ("key_cert_sign", lambda ca: ca.issue_leaf(key_cert_sign=True)),
    ("crl_sign", lambda ca: ca.issue_leaf(crl_sign=True)),
    ("no_digital_signature", lambda ca: ca.issue_leaf(digital_signature=False, key_encipherment=True)),
    ("two_uri_sans", lambda ca: ca.issue_leaf(uri_sans=["spiffe://example.org/a", "spiffe://example.org/b"])),
    ("no_path", lambda ca: ca.issue_leaf(uri_sans=["spiffe://example.org"])),
    ("no_uri_san", lambda ca: ca.issue_leaf(None, dns_names=["x.local"])),
    ("no_basic_constraints", lambda ca: ca.issue_leaf(basic_constraints=False)),
    ("no_key_usage", lambda ca: ca.issue_leaf(key_usage=False)),
    ("intermediate_not_ca", lambda ca: ca.issue_intermediate(ca=False).issue_leaf()),
    ("intermediate_no_key_cert_sign", lambda ca: ca.issue_intermediate(key_cert_sign=False).issue_leaf()),
]


@pytest.mark.parametrize(("name", "make"), BROKEN, ids=[b[0] for b in BROKEN])
def test_both_packages_refuse_the_same_broken_svids(
    ca: TestCA, name: str, make: Callable[[TestCA], IssuedCertificate]
) -> None:
    issued = make(ca)
    with pytest.raises(SvidError):
        X509Svid.parse_der(issued.chain_der(), issued.key_der())
    with pytest.raises(spiffe.errors.PySpiffeError):
        spiffe.X509Svid.parse_raw(issued.chain_der(), issued.key_der())


def test_the_unbroken_knob_leaf_passes_both(ca: TestCA) -> None:
    issued = ca.issue_leaf("/fine")
    X509Svid.parse_der(issued.chain_der(), issued.key_der())
    spiffe.X509Svid.parse_raw(issued.chain_der(), issued.key_der())


def test_spiffe_refuses_pem_where_der_is_expected_like_ours(ca: TestCA) -> None:
    svid = ca.issue_svid("/w")
    with pytest.raises(spiffe.errors.PySpiffeError):
        spiffe.X509Svid.parse_raw(svid.chain_pem(), svid.key_der())
    with pytest.raises(SvidError):
        X509Svid.parse_der(svid.chain_pem(), svid.key_der())


def test_spiffe_refuses_leaf_without_path(ca: TestCA) -> None:
    issued = ca.issue_leaf(uri_sans=["spiffe://example.org"])
    with pytest.raises(InvalidLeafCertificateError):
        spiffe.X509Svid.parse_raw(issued.chain_der(), issued.key_der())


# ------------------------------------------------------------------------------------------------ X.509 bundles


def test_x509_bundle_both_ways(ca: TestCA, tmp_path: Path) -> None:
    other_root = TestCA(TD).certificate
    ours = X509Bundle(TrustDomain(TD), (ca.certificate, other_root))
    td = spiffe.TrustDomain(TD)
    from_der = spiffe.X509Bundle.parse_raw(td, ours.der())
    from_pem = spiffe.X509Bundle.parse(td, ours.pem())
    assert {der(c) for c in from_der.x509_authorities} == {der(c) for c in ours.authorities}
    assert {der(c) for c in from_pem.x509_authorities} == {der(c) for c in ours.authorities}
    path = tmp_path / "bundle.der"
    from_der.save(path, serialization.Encoding.DER)
    back = X509Bundle.parse_der(TD, path.read_bytes())
    assert {der(c) for c in back.authorities} == {der(c) for c in ours.authorities}
    from_pem.save(path.with_suffix(".pem"), serialization.Encoding.PEM)
    assert len(X509Bundle.parse_pem(TD, path.with_suffix(".pem").read_bytes())) == 2


# ------------------------------------------------------------------------------------------------ JWT bundles / docs


def test_jwt_bundle_jwks_both_ways() -> None:
    keys = {key_id(k.public_key()): k.public_key() for k in (generate_key(), generate_key("rsa-2048"))}
    ours = JwtBundle(TD, keys)
    theirs = spiffe.JwtBundle.parse(spiffe.TrustDomain(TD), ours.to_jwks())
    assert set(theirs.jwt_authorities) == set(keys)
    for kid, key in keys.items():
        assert public_keys_equal(as_public_key(theirs.get_jwt_authority(kid)), key)
    # A JWKS written by PyJWT's own JWK serialiser (what the spiffe package builds on) parses in ours.
    import jwt

    entries = []
    for kid, key in keys.items():
        if isinstance(key, rsa.RSAPublicKey):
            entry = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key))
        else:
            assert isinstance(key, ec.EllipticCurvePublicKey)
            entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
        entry["kid"] = kid
        entries.append(entry)
    assert JwtBundle.from_jwks(TD, json.dumps({"keys": entries})) == ours


def test_jwt_only_spiffe_document_parses_in_spiffe() -> None:
    key = generate_key()
    doc = SpiffeBundle(TrustDomain(TD), (), {"k1": key.public_key()}, sequence=5, refresh_hint=60).to_document()
    theirs = spiffe.JwtBundle.parse(spiffe.TrustDomain(TD), doc)
    assert public_keys_equal(as_public_key(theirs.get_jwt_authority("k1")), key.public_key())


def test_full_spiffe_document_entries_parse_with_spiffe_and_pyjwt(ca: TestCA) -> None:
    document = ca.spiffe_bundle(sequence=9).to_document()
    parsed = json.loads(document)
    # X.509 authorities: the x5c certificate parses with the spiffe package's DER parser.
    x509_entries = [e for e in parsed["keys"] if e["use"] == "x509-svid"]
    certs = spiffe_parse_der(base64.b64decode(x509_entries[0]["x5c"][0]))
    assert [der(c) for c in certs] == [der(ca.certificate)]
    # Every entry is a valid RFC 7517 JWK for PyJWT (the JWK parser the spiffe package uses).
    jwks = PyJWKSet.from_json(document.decode())
    assert len(jwks.keys) == 2
    assert any(k.key_id == ca.jwt_kid for k in jwks.keys)
    # ...and the spiffe package's JwtBundle parser refuses the kid-less x509-svid entry (its limitation).
    with pytest.raises(ParseJWTBundleError):
        spiffe.JwtBundle.parse(spiffe.TrustDomain(TD), document)


def test_spiffe_style_document_parses_in_ours(ca: TestCA) -> None:
    """A document assembled from the spiffe package's objects (its bundles' keys and certs) parses in ours."""
    theirs_x509 = spiffe.X509Bundle.parse_raw(spiffe.TrustDomain(TD), der(ca.certificate))
    theirs_jwt = spiffe.JwtBundle.parse(spiffe.TrustDomain(TD), ca.jwt_bundle().to_jwks())
    import jwt

    keys = []
    for cert in theirs_x509.x509_authorities:
        cert_key = cert.public_key()
        assert isinstance(cert_key, ec.EllipticCurvePublicKey)
        entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(cert_key))
        entry.update({"use": "x509-svid", "x5c": [base64.b64encode(der(cert)).decode()]})
        keys.append(entry)
    for kid, key in theirs_jwt.jwt_authorities.items():
        assert isinstance(key, ec.EllipticCurvePublicKey)
        entry = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key))
        entry.update({"use": "jwt-svid", "kid": kid})
        keys.append(entry)
    doc = json.dumps({"keys": keys, "spiffe_sequence": 3, "spiffe_refresh_hint": 120})
    ours = SpiffeBundle.from_document(TD, doc)
    assert ours == ca.spiffe_bundle(sequence=3, refresh_hint=120)


# ------------------------------------------------------------------------------------------------ JWT-SVIDs


def test_our_jwt_svid_validates_in_spiffe(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", ["svc", "other"], ttl=300, issued_at=dt.datetime.now(dt.UTC))
    bundle = spiffe.JwtBundle.parse(spiffe.TrustDomain(TD), ca.jwt_bundle().to_jwks())
    theirs = spiffe.JwtSvid.parse_and_validate(token, bundle, {"svc"})
    assert str(theirs.spiffe_id) == "spiffe://example.org/web"
    assert set(theirs.audience) == {"svc", "other"}
    assert str(spiffe.JwtSvid.parse_insecure(token, {"other"}).spiffe_id) == "spiffe://example.org/web"
    ours = JwtSvid.parse_and_validate(token, ca.jwt_bundle(), "svc")
    assert ours.expires_at.timestamp() == theirs.expiry


# ------------------------------------------------------------------------------------------------ SPIFFE IDs


@pytest.mark.parametrize(
    "text",
    [
        "spiffe://example.org/a/b",
        "spiffe://example.org",
        "spiffe://example.org/.path",
        "spiffe://example.org/...",
        "spiffe://example.org:80/a",
        "spiffe://example.org/a//b",
        "spiffe://example.org/a/",
        "spiffe://example.org/./a",
        "spiffe://example.org/a?b",
        "spiffe://example.org/%41",
        "spiffe://user@example.org/a",
        "http://example.org/a",
    ],
)
def test_spiffe_id_acceptance_agrees(text: str) -> None:
    try:
        spiffe.SpiffeId(text)
        theirs_ok = True
    except spiffe.errors.PySpiffeError:
        theirs_ok = False
    try:
        SpiffeId.parse(text)
        ours_ok = True
    except SpiffeIdError:
        ours_ok = False
    assert ours_ok == theirs_ok


@pytest.mark.parametrize("text", ["spiffe://Example.org/a", "SPIFFE://example.org/a", "Spiffe://EXAMPLE.ORG"])
def test_upper_case_is_refused_here_but_normalised_by_spiffe(text: str) -> None:
    """A deliberate difference: the SPIFFE ID standard (and go-spiffe) refuse upper case in the scheme and
    trust domain; the spiffe package lower-cases it. Refusing avoids two parties reading one ID two ways."""
    assert str(spiffe.SpiffeId(text)) == text.lower()
    with pytest.raises(SpiffeIdError, match=r"lower case|upper-case"):
        SpiffeId.parse(text)


# ------------------------------------------------------------------------------------------------ protos


def test_both_generated_protos_load_in_one_process() -> None:
    from spiffe._proto import workload_pb2 as spiffe_pb2

    from tessera.proto import workload_pb2 as ours_pb2

    msg = ours_pb2.X509SVIDResponse(svids=[ours_pb2.X509SVID(spiffe_id="spiffe://example.org/w", x509_svid=b"x")])
    theirs = spiffe_pb2.X509SVIDResponse.FromString(msg.SerializeToString())
    assert theirs.svids[0].spiffe_id == "spiffe://example.org/w"
    assert theirs.svids[0].x509_svid == b"x"
