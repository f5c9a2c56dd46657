"""JWT-SVID minting and validation: allowed algorithms only, kid required, audience, expiry, subject rules."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import re
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from tessera.sdk.bundle import BundleSet, JwtBundle
from tessera.sdk.errors import SvidError, VerificationError
from tessera.sdk.jwtsvid import DEFAULT_LEEWAY, JwtSvid, mint_jwt_svid
from tessera.sdk.keys import PrivateKey, generate_key, key_id
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.testing import TestCA

NOW = dt.datetime(2026, 6, 1, 12, 0, 0, tzinfo=dt.UTC)
SUB = "spiffe://example.org/web"


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org", now=NOW)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], key: PrivateKey | None = None, secret: bytes = b"") -> str:
    """Builds a compact JWS by hand so tests can produce headers PyJWT would refuse to write."""
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    alg = str(header.get("alg"))
    if alg == "none":
        signature = b""
    elif alg == "HS256":
        signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    else:
        algorithm = jwt.algorithms.get_default_algorithms()[alg]
        signature = algorithm.sign(signing_input.encode(), key)
    return f"{signing_input}.{b64(signature)}"


def claims(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "sub": SUB,
        "aud": ["svc"],
        "exp": int((NOW + dt.timedelta(minutes=5)).timestamp()),
        "iat": int(NOW.timestamp()),
    }
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def validate(token: str, ca: TestCA, audience: str | list[str] = "svc", now: dt.datetime = NOW) -> JwtSvid:
    return JwtSvid.parse_and_validate(token, ca.jwt_bundle(), audience, now=now)


# ------------------------------------------------------------------------------------------------ happy paths


def test_minted_token_validates(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", ["svc", "other"], ttl=300)
    svid = validate(token, ca)
    assert svid.spiffe_id == SpiffeId.parse(SUB)
    assert svid.audience == ("svc", "other")
    assert svid.expires_at == NOW + dt.timedelta(seconds=300)
    assert svid.issued_at == NOW
    assert svid.token == token and svid.kid == ca.jwt_kid
    assert token not in repr(svid)
    header = jwt.get_unverified_header(token)
    assert header == {"alg": "ES256", "kid": ca.jwt_kid, "typ": "JWT"}
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == ["svc", "other"]


def test_single_audience_is_still_a_list(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", "svc")
    assert jwt.decode(token, options={"verify_signature": False})["aud"] == ["svc"]


def test_every_expected_audience_must_be_present(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", ["a", "b"])
    assert validate(token, ca, ["a", "b"]).audience == ("a", "b")
    with pytest.raises(VerificationError, match=re.escape("does not include the expected ['c']")):
        validate(token, ca, ["a", "c"])


@pytest.mark.parametrize(("kind", "alg"), [("ec-p256", "ES256"), ("ec-p384", "ES384"), ("rsa-2048", "RS256")])
def test_key_kinds(kind: str, alg: str) -> None:
    key = generate_key(kind)
    kid = key_id(key.public_key())
    token = mint_jwt_svid(key, kid, SUB, "svc", NOW + dt.timedelta(minutes=1), NOW)
    assert jwt.get_unverified_header(token)["alg"] == alg
    bundle = JwtBundle("example.org", {kid: key.public_key()})
    assert JwtSvid.parse_and_validate(token, bundle, "svc", now=NOW).spiffe_id == SpiffeId.parse(SUB)


@pytest.mark.parametrize("alg", ["PS256", "RS512", "ES256"])
def test_other_allowed_algorithms_validate(alg: str) -> None:
    key = generate_key("ec-p256" if alg.startswith("ES") else "rsa-2048")
    token = forge({"alg": alg, "kid": "k1", "typ": "JOSE"}, claims(), key)
    bundle = JwtBundle("example.org", {"k1": key.public_key()})
    assert JwtSvid.parse_and_validate(token, bundle, "svc", now=NOW).spiffe_id == SpiffeId.parse(SUB)


def test_aud_as_plain_string_accepted(ca: TestCA) -> None:
    token = forge({"alg": "ES256", "kid": ca.jwt_kid}, claims(aud="svc"), ca.jwt_key)
    assert validate(token, ca).audience == ("svc",)


def test_bundle_sources(ca: TestCA) -> None:
    other = TestCA("other.org")
    token = ca.mint_jwt_svid("/web", "svc")
    bundles = BundleSet([other.jwt_bundle(), ca.jwt_bundle()])
    assert JwtSvid.parse_and_validate(token, bundles, "svc", now=NOW).spiffe_id.path == "/web"
    assert JwtSvid.parse_and_validate(token, bundles.get, "svc", now=NOW).spiffe_id.path == "/web"


def test_parse_insecure(ca: TestCA) -> None:
    stranger = generate_key()
    token = forge({"alg": "ES256", "kid": "unknown"}, claims(), stranger)
    svid = JwtSvid.parse_insecure(token, hint="mine")
    assert svid.spiffe_id == SpiffeId.parse(SUB) and svid.hint == "mine"
    assert JwtSvid.parse_insecure(token, "svc", now=NOW).audience == ("svc",)
    with pytest.raises(VerificationError, match="audience"):
        JwtSvid.parse_insecure(token, "nope", now=NOW)
    with pytest.raises(VerificationError, match="expired"):
        JwtSvid.parse_insecure(token, "svc", now=NOW + dt.timedelta(hours=1))
    with pytest.raises(SvidError, match="not allowed"):
        JwtSvid.parse_insecure(forge({"alg": "none", "kid": "k"}, claims()))


# ------------------------------------------------------------------------------------------------ rejections


@pytest.mark.parametrize("alg", ["none", "HS256"])
def test_disallowed_algorithms(ca: TestCA, alg: str) -> None:
    public_pem = ca.jwt_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # HS256 keyed with the public key: the classic algorithm-confusion forgery.
    token = forge({"alg": alg, "kid": ca.jwt_kid}, claims(), secret=public_pem)
    with pytest.raises(SvidError, match=f"algorithm '{alg}' is not allowed"):
        validate(token, ca)


def test_algorithm_not_matching_key_type(ca: TestCA) -> None:
    rsa_key = generate_key("rsa-2048")
    token = forge({"alg": "RS256", "kid": ca.jwt_kid}, claims(), rsa_key)
    with pytest.raises(VerificationError, match="does not match the type of the key"):
        validate(token, ca)


def test_es_algorithm_with_a_key_of_another_curve(ca: TestCA) -> None:
    p384 = generate_key("ec-p384")
    token = forge({"alg": "ES256", "kid": "k384"}, claims(), p384)
    bundle = JwtBundle("example.org", {"k384": p384.public_key()})
    with pytest.raises(VerificationError, match="does not match the type of the key"):
        JwtSvid.parse_and_validate(token, bundle, "svc", now=NOW)


def test_missing_kid(ca: TestCA) -> None:
    token = forge({"alg": "ES256"}, claims(), ca.jwt_key)
    with pytest.raises(SvidError, match="no 'kid'"):
        validate(token, ca)
    with pytest.raises(SvidError, match="no 'kid'"):
        validate(forge({"alg": "ES256", "kid": ""}, claims(), ca.jwt_key), ca)


def test_unknown_kid(ca: TestCA) -> None:
    token = forge({"alg": "ES256", "kid": "not-in-bundle"}, claims(), ca.jwt_key)
    with pytest.raises(
        VerificationError, match=re.escape("'not-in-bundle' is not in the JWT bundle of trust domain example.org")
    ):
        validate(token, ca)


def test_signature_by_another_key_under_a_known_kid(ca: TestCA) -> None:
    token = forge({"alg": "ES256", "kid": ca.jwt_kid}, claims(), generate_key())
    with pytest.raises(VerificationError, match="signature"):
        validate(token, ca)


def test_tampered_payload(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", "svc")
    head, _, sig = token.split(".")
    forged_payload = b64(json.dumps(claims(sub="spiffe://example.org/admin")).encode())
    with pytest.raises(VerificationError, match="signature"):
        validate(f"{head}.{forged_payload}.{sig}", ca)


def test_wrong_audience(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", "svc")
    with pytest.raises(VerificationError, match="audience"):
        validate(token, ca, "another-service")


def test_expired_with_leeway(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", "svc", ttl=60)
    expiry = NOW + dt.timedelta(seconds=60)
    validate(token, ca, now=expiry + DEFAULT_LEEWAY)  # inside the leeway
    with pytest.raises(VerificationError, match="has expired"):
        validate(token, ca, now=expiry + DEFAULT_LEEWAY + dt.timedelta(seconds=1))
    with pytest.raises(VerificationError, match="has expired"):
        JwtSvid.parse_and_validate(
            token, ca.jwt_bundle(), "svc", now=expiry + dt.timedelta(seconds=1), leeway=dt.timedelta(0)
        )


def test_default_clock_rejects_old_token(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", "svc")  # minted at NOW (2026-06-01), long expired in real time
    with pytest.raises(VerificationError, match="has expired"):
        JwtSvid.parse_and_validate(token, ca.jwt_bundle(), "svc")


def test_not_yet_valid(ca: TestCA) -> None:
    token = forge(
        {"alg": "ES256", "kid": ca.jwt_kid}, claims(nbf=int((NOW + dt.timedelta(minutes=2)).timestamp())), ca.jwt_key
    )
    with pytest.raises(VerificationError, match="not yet valid"):
        validate(token, ca)


def test_issued_in_the_future_refused_beyond_the_leeway_only(ca: TestCA) -> None:
    """As PyJWT (which the agent's own copy used) and go-spiffe: an iat from the future means a wrong clock."""
    inside = int((NOW + DEFAULT_LEEWAY).timestamp())
    validate(forge({"alg": "ES256", "kid": ca.jwt_kid}, claims(iat=inside), ca.jwt_key), ca)
    beyond = forge({"alg": "ES256", "kid": ca.jwt_kid}, claims(iat=inside + 1), ca.jwt_key)
    with pytest.raises(VerificationError, match="issued in the future"):
        validate(beyond, ca)


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize("value", [1e300, -1e300, 10**400])
def test_time_claims_out_of_range_are_svid_errors(ca: TestCA, name: str, value: float) -> None:
    """Never an OverflowError or a bare ValueError from the date conversion: callers catch SvidError."""
    token = forge({"alg": "ES256", "kid": ca.jwt_kid}, claims(**{name: value}), ca.jwt_key)
    with pytest.raises(SvidError, match=f"'{name}' claim is out of range"):
        validate(token, ca)


@pytest.mark.parametrize(
    ("sub", "message"),
    [
        ("https://example.org/web", "not a valid SPIFFE ID"),
        ("spiffe://EXAMPLE.org/web", "not a valid SPIFFE ID"),
        ("spiffe://example.org/a//b", "not a valid SPIFFE ID"),
        (None, "no 'sub'"),
        (42, "no 'sub'"),
    ],
)
def test_bad_subject(ca: TestCA, sub: Any, message: str) -> None:
    token = forge({"alg": "ES256", "kid": ca.jwt_kid}, claims(sub=sub), ca.jwt_key)
    with pytest.raises(SvidError, match=message):
        validate(token, ca)


def test_subject_in_unknown_trust_domain(ca: TestCA) -> None:
    token = forge({"alg": "ES256", "kid": ca.jwt_kid}, claims(sub="spiffe://other.org/web"), ca.jwt_key)
    with pytest.raises(VerificationError, match=re.escape("the only bundle given is for example.org")):
        validate(token, ca)
    with pytest.raises(VerificationError, match="unknown trust domain"):
        JwtSvid.parse_and_validate(token, BundleSet([ca.jwt_bundle()]), "svc", now=NOW)


def test_key_of_one_domain_cannot_sign_for_another(ca: TestCA) -> None:
    """A key trusted for other.org cannot vouch for an example.org subject: only example.org's bundle is used."""
    other = TestCA("other.org")
    token = forge({"alg": "ES256", "kid": other.jwt_kid}, claims(sub="spiffe://example.org/admin"), other.jwt_key)
    bundles = BundleSet([ca.jwt_bundle(), other.jwt_bundle()])
    with pytest.raises(VerificationError, match=re.escape("not in the JWT bundle of trust domain example.org")):
        JwtSvid.parse_and_validate(token, bundles, "svc", now=NOW)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"exp": None}, "no 'exp'"),
        ({"exp": "tomorrow"}, "'exp' must be a number"),
        ({"aud": None}, "'aud' claim is missing"),
        ({"aud": []}, "'aud' claim is empty"),
        ({"aud": [""]}, "'aud' claim is empty"),
        ({"aud": [1]}, "'aud' claim is missing or not"),
    ],
)
def test_bad_claims(ca: TestCA, overrides: dict[str, Any], message: str) -> None:
    token = forge({"alg": "ES256", "kid": ca.jwt_kid}, claims(**overrides), ca.jwt_key)
    with pytest.raises(SvidError, match=message):
        validate(token, ca)


@pytest.mark.parametrize(("typ", "ok"), [("JWT", True), ("JOSE", True), ("at+jwt", False), ("jwt", False)])
def test_typ_header(ca: TestCA, typ: str, ok: bool) -> None:
    token = forge({"alg": "ES256", "kid": ca.jwt_kid, "typ": typ}, claims(), ca.jwt_key)
    if ok:
        validate(token, ca)
    else:
        with pytest.raises(SvidError, match="'typ'"):
            validate(token, ca)


def test_crit_header_refused(ca: TestCA) -> None:
    token = forge({"alg": "ES256", "kid": ca.jwt_kid, "crit": ["x-custom"], "x-custom": 1}, claims(), ca.jwt_key)
    with pytest.raises(SvidError, match="critical"):
        validate(token, ca)


@pytest.mark.parametrize("token", ["", "abc", "a.b", "a.b.c", "a.b.c.d"])
def test_malformed_tokens(ca: TestCA, token: str) -> None:
    with pytest.raises(SvidError):
        validate(token, ca)


def test_audience_argument_required(ca: TestCA) -> None:
    token = ca.mint_jwt_svid("/web", "svc")
    with pytest.raises(ValueError, match="audience"):
        validate(token, ca, [])


# ------------------------------------------------------------------------------------------------ minting


def test_mint_refuses_ed25519_and_bad_input() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    with pytest.raises(SvidError, match="cannot sign JWT-SVIDs"):
        mint_jwt_svid(ed25519.Ed25519PrivateKey.generate(), "k", SUB, "svc", NOW + dt.timedelta(minutes=1), NOW)
    key = generate_key()
    with pytest.raises(SvidError, match="kid"):
        mint_jwt_svid(key, "", SUB, "svc", NOW + dt.timedelta(minutes=1), NOW)
    with pytest.raises(ValueError, match="audience"):
        mint_jwt_svid(key, "k", SUB, [], NOW + dt.timedelta(minutes=1), NOW)
    with pytest.raises(SvidError, match="expire before"):
        mint_jwt_svid(key, "k", SUB, "svc", NOW, NOW)


def test_mint_extra_claims_cannot_override_subject() -> None:
    key = generate_key()
    token = mint_jwt_svid(
        key, "k", SUB, "svc", NOW + dt.timedelta(minutes=1), NOW, extra_claims={"sub": "spiffe://evil/x", "x": 1}
    )
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["sub"] == SUB and payload["x"] == 1


def test_jwt_bundle_trust_domain_type() -> None:
    assert JwtBundle("example.org", {}).trust_domain == TrustDomain("example.org")
