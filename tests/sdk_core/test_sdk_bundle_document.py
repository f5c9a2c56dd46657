"""The SPIFFE bundle document and JWT bundle JWKS: round trips, exact shape, and every malformed case refused."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from tessera.sdk.bundle import JwtBundle, SpiffeBundle, X509Bundle, public_key_from_jwk, public_key_to_jwk
from tessera.sdk.errors import BundleError
from tessera.sdk.keys import PublicKey, generate_key, key_id, public_keys_equal
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.testing import TestCA

TD = TrustDomain("example.org")


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


def _jwt_keys() -> dict[str, PublicKey]:
    keys: list[PublicKey] = [
        generate_key("ec-p256").public_key(),
        generate_key("ec-p384").public_key(),
        generate_key("rsa-2048").public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ]
    return {key_id(k): k for k in keys}


def doc_of(bundle: SpiffeBundle) -> dict[str, Any]:
    parsed = json.loads(bundle.to_document())
    assert isinstance(parsed, dict)
    return parsed


def test_round_trip(ca: TestCA) -> None:
    second_root = TestCA("example.org", key_kind="rsa-2048").certificate
    bundle = SpiffeBundle(TD, (ca.certificate, second_root), _jwt_keys(), sequence=42, refresh_hint=300)
    again = SpiffeBundle.from_document("example.org", bundle.to_document())
    assert again == bundle
    assert again.sequence == 42 and again.refresh_hint == 300
    assert again.x509_bundle() == X509Bundle(TD, (ca.certificate, second_root))
    assert again.jwt_bundle() == JwtBundle(TD, bundle.jwt_authorities)
    assert again != SpiffeBundle(TD, (ca.certificate,), bundle.jwt_authorities, 42, 300)


def test_document_shape(ca: TestCA) -> None:
    jwt_key = generate_key().public_key()
    doc = doc_of(SpiffeBundle(TD, (ca.certificate,), {"kid-1": jwt_key}, sequence=7))
    assert doc["spiffe_sequence"] == 7
    assert "spiffe_refresh_hint" not in doc  # unset: consumers use their default
    x509_entry, jwt_entry = doc["keys"]
    assert x509_entry["use"] == "x509-svid"
    assert "kid" not in x509_entry
    assert len(x509_entry["x5c"]) == 1
    assert base64.b64decode(x509_entry["x5c"][0]) == ca.certificate.public_bytes(serialization.Encoding.DER)
    assert x509_entry["kty"] == "EC" and x509_entry["crv"] == "P-256"
    assert jwt_entry["use"] == "jwt-svid" and jwt_entry["kid"] == "kid-1"
    assert "x5c" not in jwt_entry


def test_refresh_hint_written_when_set(ca: TestCA) -> None:
    assert doc_of(SpiffeBundle(TD, (ca.certificate,), {}, refresh_hint=60))["spiffe_refresh_hint"] == 60


def test_ec_coordinates_are_fixed_length() -> None:
    """A P-256 coordinate with leading zero bytes must still be 32 bytes (43 base64url characters)."""
    for _ in range(5000):
        key = ec.generate_private_key(ec.SECP256R1()).public_key()
        if key.public_numbers().x < 2**248:
            break
    else:
        pytest.fail("no key with a short x coordinate found")
    jwk = public_key_to_jwk(key)
    assert len(jwk["x"]) == 43 and len(jwk["y"]) == 43
    assert base64.urlsafe_b64decode(jwk["x"] + "=")[0] == 0
    assert public_keys_equal(public_key_from_jwk(jwk), key)
    p384 = public_key_to_jwk(generate_key("ec-p384").public_key())
    assert len(p384["x"]) == 64  # 48 bytes


def test_short_ec_coordinates_refused() -> None:
    jwk = public_key_to_jwk(generate_key().public_key())
    raw_x = base64.urlsafe_b64decode(jwk["x"] + "=")
    jwk["x"] = base64.urlsafe_b64encode(raw_x[1:]).rstrip(b"=").decode()
    with pytest.raises(BundleError, match="exactly 32 bytes"):
        public_key_from_jwk(jwk)


def test_parse_spire_style_document(ca: TestCA) -> None:
    """Unknown uses and unknown members are ignored, as the SPIFFE bundle format requires."""
    jwt_key = generate_key().public_key()
    doc = {
        "keys": [
            {
                "use": "x509-svid",
                **public_key_to_jwk(ca.certificate.public_key()),  # type: ignore[arg-type]
                "x5c": [base64.b64encode(ca.certificate.public_bytes(serialization.Encoding.DER)).decode()],
            },
            {"use": "jwt-svid", "kid": "abc", **public_key_to_jwk(jwt_key), "alg": "ES256"},
            {"use": "something-new", "kty": "EC"},
            {"kty": "EC", "crv": "P-256"},
        ],
        "spiffe_sequence": 1,
        "spiffe_refresh_hint": 300,
        "extra": True,
    }
    bundle = SpiffeBundle.from_document(TD, json.dumps(doc))
    assert bundle.x509_authorities == (ca.certificate,)
    assert set(bundle.jwt_authorities) == {"abc"}
    assert bundle.refresh_hint == 300


def test_x5c_consumption_rules(ca: TestCA) -> None:
    """X509-SVID standard 6.2: no or empty x5c -> entry ignored; several values -> only the first counts."""
    other = TestCA("example.org").certificate
    other_b64 = base64.b64encode(other.public_bytes(serialization.Encoding.DER)).decode()
    entries = [
        _x509_entry(ca, x5c=None),
        _x509_entry(ca, x5c=[]),
        _x509_entry(ca, x5c=[*_x509_entry(ca)["x5c"], other_b64]),
    ]
    bundle = SpiffeBundle.from_document(TD, json.dumps({"keys": entries}))
    assert bundle.x509_authorities == (ca.certificate,)
    # Written documents always carry exactly one certificate per entry.
    written = doc_of(SpiffeBundle(TD, (ca.certificate, other), {}))
    assert [len(e["x5c"]) for e in written["keys"]] == [1, 1]


def test_sequence_defaults_to_zero(ca: TestCA) -> None:
    bundle = SpiffeBundle.from_document(TD, json.dumps({"keys": [_x509_entry(ca)]}))
    assert bundle.sequence == 0 and bundle.refresh_hint is None
    assert bundle.x509_authorities == (ca.certificate,)


@pytest.mark.parametrize(
    "entry",
    [
        {"use": "jwt-svid", "kid": "k", "kty": "oct", "k": "c2VjcmV0"},
        {"use": "jwt-svid", "kid": "k", "kty": "EC", "crv": "P-192", "x": "AA", "y": "AA"},
        {"use": "jwt-svid", "kid": "k", "kty": "OKP", "crv": "X25519", "x": "AA"},
        {"use": "jwt-svid", "kid": "k", "x": "AA"},
        {"use": "x509-svid", "x5c": ["AAAA"]},  # no kty: an unknown key type, whatever the x5c holds
        {"use": "x509-svid", "kty": "PQC", "x5c": ["AAAA"]},
    ],
)
def test_unknown_key_types_are_ignored(ca: TestCA, entry: dict[str, Any]) -> None:
    """The bundle format: clients MUST ignore JWK elements with an unknown key type."""
    doc = {"keys": [_x509_entry(ca), entry]}
    bundle = SpiffeBundle.from_document(TD, json.dumps(doc))
    assert bundle.x509_authorities == (ca.certificate,)
    assert bundle.jwt_authorities == {}
    assert len(JwtBundle.from_jwks(TD, json.dumps(doc))) == 0


def _x509_entry(ca: TestCA, **overrides: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "use": "x509-svid",
        **public_key_to_jwk(ca.certificate.public_key()),  # type: ignore[arg-type]
        "x5c": [base64.b64encode(ca.certificate.public_bytes(serialization.Encoding.DER)).decode()],
    }
    entry.update(overrides)
    return {k: v for k, v in entry.items() if v is not None}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda ca: "not json", "not valid JSON"),
        (lambda ca: [], "must be a JSON object"),
        (lambda ca: {"spiffe_sequence": 1}, "no 'keys' array"),
        (lambda ca: {"keys": {}}, "no 'keys' array"),
        (lambda ca: {"keys": ["x"]}, "must be a JSON object"),
        (lambda ca: {"keys": [_x509_entry(ca, x5c="AAAA")]}, "'x5c' must be a list"),
        (lambda ca: {"keys": [_x509_entry(ca, x5c=[1])]}, "'x5c' must be a list"),
        (lambda ca: {"keys": [_x509_entry(ca, kid="k")]}, "must not have a 'kid'"),
        (lambda ca: {"keys": [_x509_entry(ca, x5c=["!!notbase64"])]}, "invalid certificate"),
        (lambda ca: {"keys": [_x509_entry(ca, x5c=["AAAA"])]}, "invalid certificate"),
        (
            lambda ca: {"keys": [_x509_entry(ca, **public_key_to_jwk(generate_key().public_key()))]},
            "does not match its x5c certificate",
        ),
        (lambda ca: {"keys": [{"use": "jwt-svid", **public_key_to_jwk(generate_key().public_key())}]}, "no 'kid'"),
        (lambda ca: {"keys": [{"use": "jwt-svid", "kid": "k", "kty": "EC", "crv": "P-256", "x": "AA"}]}, "'y'"),
        (
            lambda ca: {
                "keys": [{"use": "jwt-svid", "kid": "k", **public_key_to_jwk(generate_key().public_key())}] * 2
            },
            "appears twice",
        ),
        (lambda ca: {"keys": [], "spiffe_sequence": -1}, "spiffe_sequence"),
        (lambda ca: {"keys": [], "spiffe_sequence": "1"}, "spiffe_sequence"),
        (lambda ca: {"keys": [], "spiffe_sequence": True}, "spiffe_sequence"),
        (lambda ca: {"keys": [], "spiffe_refresh_hint": "5m"}, "spiffe_refresh_hint"),
        (lambda ca: {"keys": [], "spiffe_refresh_hint": -5}, "spiffe_refresh_hint"),
    ],
)
def test_malformed_documents(ca: TestCA, mutate: Any, message: str) -> None:
    doc = mutate(ca)
    data = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(BundleError, match=message):
        SpiffeBundle.from_document(TD, data)


def test_invalid_ec_point_refused() -> None:
    jwk = public_key_to_jwk(generate_key().public_key())
    jwk["y"] = jwk["x"]  # (x, x) is almost surely not on the curve
    with pytest.raises(BundleError, match="valid EC public key"):
        public_key_from_jwk(jwk)


def test_padded_base64url_refused() -> None:
    jwk = public_key_to_jwk(generate_key("rsa-2048").public_key())
    jwk["e"] = "AQAB=="
    with pytest.raises(BundleError, match="unpadded base64url"):
        public_key_from_jwk(jwk)


def test_constructor_validation(ca: TestCA) -> None:
    with pytest.raises(BundleError, match="sequence"):
        SpiffeBundle(TD, (), {}, sequence=-1)
    with pytest.raises(BundleError, match="refresh hint"):
        SpiffeBundle(TD, (), {}, refresh_hint=-1)
    with pytest.raises(BundleError, match="trust domain"):
        SpiffeBundle.from_document("Bad TD", b'{"keys": []}')


def test_from_bundles(ca: TestCA) -> None:
    combined = SpiffeBundle.from_bundles(ca.x509_bundle(), ca.jwt_bundle(), sequence=3)
    assert combined == ca.spiffe_bundle(sequence=3, refresh_hint=None)
    assert SpiffeBundle.from_bundles(None, ca.jwt_bundle()).x509_authorities == ()
    with pytest.raises(BundleError, match=r"is for example\.org but JWT bundle is for other\.org"):
        SpiffeBundle.from_bundles(ca.x509_bundle(), TestCA("other.org").jwt_bundle())
    with pytest.raises(BundleError, match="at least"):
        SpiffeBundle.from_bundles(None, None)


# ------------------------------------------------------------------------------------------------ JWT bundles


def test_jwt_bundle_jwks_round_trip() -> None:
    bundle = JwtBundle(TD, _jwt_keys())
    data = bundle.to_jwks()
    parsed = json.loads(data)
    assert all(entry["kid"] for entry in parsed["keys"])
    assert JwtBundle.from_jwks("example.org", data) == bundle
    assert len(bundle) == 4 and next(iter(bundle.keys)) in bundle


def test_jwt_bundle_from_spiffe_document_skips_x509_entries(ca: TestCA) -> None:
    document = ca.spiffe_bundle().to_document()
    bundle = JwtBundle.from_jwks(TD, document)
    assert bundle == ca.jwt_bundle()


def test_jwt_bundle_rejections() -> None:
    with pytest.raises(BundleError, match="no 'kid'"):
        JwtBundle.from_jwks(TD, json.dumps({"keys": [public_key_to_jwk(generate_key().public_key())]}))
    with pytest.raises(BundleError, match="key ID is empty"):
        JwtBundle(TD, {"": generate_key().public_key()})
    assert len(JwtBundle.from_jwks(TD, b'{"keys": []}')) == 0


def test_jwt_bundle_equality_and_hash() -> None:
    key = generate_key().public_key()
    same = serialization.load_der_public_key(
        key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    a = JwtBundle(TD, {"k": key})
    b = JwtBundle(TD, {"k": same})  # type: ignore[dict-item]
    assert a == b and hash(a) == hash(b)
    assert a != JwtBundle(TD, {"other": key})
    assert a != JwtBundle("other.org", {"k": key})


@pytest.mark.parametrize(
    ("jwk", "message"),
    [
        ({"kty": "oct", "k": "c2VjcmV0"}, "unsupported key type"),
        ({"kty": "EC", "crv": "P-192", "x": "AA", "y": "AA"}, "unsupported EC curve"),
        ({"kty": "OKP", "crv": "X448", "x": "AA"}, "unsupported OKP curve"),
    ],
)
def test_public_key_from_unknown_jwk_is_an_error(jwk: dict[str, Any], message: str) -> None:
    with pytest.raises(BundleError, match=message):
        public_key_from_jwk(jwk)
