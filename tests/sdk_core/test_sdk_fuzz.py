"""Hostile input never escapes as anything but a Tessera error (or ValueError for caller mistakes).

Parsers in the SDK read bytes from the network (Workload API responses, federation documents, tokens in
requests); an unexpected exception type there would turn a bad peer into a crashed stream handler.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tessera.sdk.bundle import JwtBundle, SpiffeBundle, X509Bundle, public_key_from_jwk, public_key_to_jwk
from tessera.sdk.errors import BundleError, SvidError, TesseraError, VerificationError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.keys import generate_key, public_keys_equal
from tessera.sdk.svid import X509Svid, parse_der_certificates
from tessera.sdk.testing import TestCA
from tessera.sdk.verify import verify_x509_svid

CA = TestCA("example.org")
SVID = CA.issue_svid("/fuzz")
CHAIN_DER = SVID.chain_der()
KEY_DER = SVID.key_der()

# TESSERA_FUZZ_EXAMPLES raises the example count for a longer local fuzzing session.
FUZZ = settings(
    max_examples=int(os.environ.get("TESSERA_FUZZ_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_as_chain(data: bytes) -> None:
    with contextlib.suppress(SvidError):
        X509Svid.parse_der(data, KEY_DER)


@pytest.mark.filterwarnings("ignore:Parsed a serial number")  # a corrupted serial may turn non-positive
@FUZZ
@given(st.integers(min_value=0, max_value=len(CHAIN_DER) - 1), st.integers(min_value=0, max_value=255))
def test_corrupted_chain_byte(position: int, value: int) -> None:
    data = bytearray(CHAIN_DER)
    data[position] = value
    try:
        svid = X509Svid.parse_der(bytes(data), KEY_DER)
    except SvidError:
        return
    # Parsing does not check signatures; verification must refuse any change to what the CA signed.
    try:
        verify_x509_svid(svid.cert_chain, CA.x509_bundle())
    except VerificationError:
        return
    assert svid.leaf.tbs_certificate_bytes == SVID.leaf.tbs_certificate_bytes
    assert svid.spiffe_id == SVID.spiffe_id


@FUZZ
@given(st.integers(min_value=0, max_value=len(CHAIN_DER)))
def test_truncated_chain(length: int) -> None:
    try:
        certs = parse_der_certificates(CHAIN_DER[:length])
    except SvidError:
        return
    assert length in (0, len(CHAIN_DER))
    assert len(certs) == (1 if length else 0)


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_as_key_and_bundle(data: bytes) -> None:
    with contextlib.suppress(SvidError):
        X509Svid.parse_der(CHAIN_DER, data)
    with contextlib.suppress(BundleError):
        X509Bundle.parse_der("example.org", data)
    with contextlib.suppress(BundleError):
        X509Bundle.parse_pem("example.org", data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)

jwk_like = st.fixed_dictionaries(
    {},
    optional={
        "use": st.sampled_from(["x509-svid", "jwt-svid", "other"]) | st.text(max_size=5),
        "kty": st.sampled_from(["EC", "RSA", "OKP", "oct"]) | json_values,
        "crv": st.sampled_from(["P-256", "P-384", "Ed25519", "P-192"]) | json_values,
        "kid": st.text(max_size=5) | json_values,
        "x": st.text(max_size=60) | json_values,
        "y": st.text(max_size=60) | json_values,
        "n": st.text(max_size=30) | json_values,
        "e": st.sampled_from(["AQAB", "", "AQAB=="]) | json_values,
        "x5c": st.lists(st.text(max_size=40) | json_values, max_size=2) | json_values,
    },
)


@FUZZ
@given(
    st.fixed_dictionaries(
        {"keys": st.lists(jwk_like, max_size=4)},
        optional={"spiffe_sequence": json_values, "spiffe_refresh_hint": json_values},
    )
    | json_values
)
def test_random_documents(doc: Any) -> None:
    data = json.dumps(doc)
    with contextlib.suppress(BundleError):
        SpiffeBundle.from_document("example.org", data)
    with contextlib.suppress(BundleError):
        JwtBundle.from_jwks("example.org", data)


@FUZZ
@given(st.text(max_size=200))
def test_random_text_documents(text: str) -> None:
    with contextlib.suppress(BundleError):
        SpiffeBundle.from_document("example.org", text)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@FUZZ
@given(json_values, json_values, st.binary(max_size=80))
def test_random_tokens(header: Any, claims: Any, signature: bytes) -> None:
    token = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}.{_b64(signature)}"
    with contextlib.suppress(TesseraError):
        JwtSvid.parse_insecure(token)
    with contextlib.suppress(TesseraError):
        JwtSvid.parse_and_validate(token, CA.jwt_bundle(), "svc")


@FUZZ
@given(st.text(max_size=120))
def test_random_token_text(token: str) -> None:
    with contextlib.suppress(TesseraError):
        JwtSvid.parse_and_validate(token, CA.jwt_bundle(), "svc")


@settings(max_examples=30, deadline=None)
@given(st.sampled_from(["ec-p256", "ec-p384"]))
def test_jwk_round_trip(kind: str) -> None:
    key = generate_key(kind).public_key()
    assert public_keys_equal(public_key_from_jwk(public_key_to_jwk(key)), key)
