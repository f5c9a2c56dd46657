"""One table of hostile JWT-SVIDs, run against every path that validates them.

- The SDK's validator (``tests/sdk_core/test_sdk_jwtsvid_hostile.py``) and the agent's ValidateJWTSVID over a real
  Workload API socket (``tests/agent/test_agent_jwt_hostile.py``) both take their cases from :data:`HOSTILE`: the
  agent once had a copy of its own that had drifted weaker (no ``crit`` refusal, no compact-JWS shape check, no
  algorithm-fits-key check), and a table per path would drift the same way.
- Each row builds its token from one :class:`Trust` (the keys and bundles both paths trust) and one instant, so
  the two paths judge the very same bytes against the very same keys at the very same time.
- A row names the SDK error class and a fragment of its message; the agent must answer INVALID_ARGUMENT with
  exactly the SDK's message (an actionable one, never a traceback).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from tessera.sdk.bundle import BundleSet, JwtBundle, SpiffeBundle
from tessera.sdk.errors import SvidError, TesseraError, VerificationError
from tessera.sdk.jwtsvid import DEFAULT_LEEWAY, MAX_TOKEN_LENGTH
from tessera.sdk.keys import PrivateKey, generate_key, key_id
from tessera.sdk.testing import TestCA

#: The instant every token is judged at (2026-06-01T12:00:00Z): the SDK gets it as ``now``, the agent as its clock.
NOW = 1_780_315_200.0
AUDIENCE = "svc"
SUB = "spiffe://example.org/web"
SKEW = DEFAULT_LEEWAY.total_seconds()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Trust:
    """What both validators trust: example.org with an EC P-256, an EC P-384 and an RSA JWT key, and the federated
    other.org with a key of its own. Keys are made once per instance (RSA is slow)."""

    @cached_property
    def ca(self) -> TestCA:
        return TestCA("example.org")

    @cached_property
    def other(self) -> TestCA:
        return TestCA("other.org")

    @cached_property
    def ec_key(self) -> PrivateKey:
        return self.ca.jwt_key

    @cached_property
    def p384_key(self) -> PrivateKey:
        return generate_key("ec-p384")

    @cached_property
    def rsa_key(self) -> PrivateKey:
        return generate_key("rsa-2048")

    def kid(self, key: PrivateKey) -> str:
        return key_id(key.public_key())

    def spiffe_bundles(self) -> tuple[SpiffeBundle, ...]:
        """The bundles as the server hands them to the agent (SPIFFE bundle documents parse back to these)."""
        keys = {self.kid(k): k.public_key() for k in (self.ec_key, self.p384_key, self.rsa_key)}
        own = SpiffeBundle(self.ca.trust_domain, (self.ca.certificate,), keys, sequence=1)
        return own, self.other.spiffe_bundle()

    def jwt_bundles(self) -> BundleSet[JwtBundle]:
        return BundleSet(b.jwt_bundle() for b in self.spiffe_bundles())


def claims(**overrides: Any) -> dict[str, Any]:
    """A JWT-SVID's claims at :data:`NOW`; an override of None removes the claim."""
    base: dict[str, Any] = {"sub": SUB, "aud": [AUDIENCE], "exp": int(NOW) + 300, "iat": int(NOW)}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not None}


def sign(
    header: Mapping[str, Any] | str,
    payload: Mapping[str, Any] | str,
    key: PrivateKey | None = None,
    alg: str = "",
) -> str:
    """A compact JWS built by hand, so a row can carry what PyJWT refuses to write (raw JSON text included).

    Signed with ``key`` by ``alg`` (default: the header's), whatever key the ``kid`` names; without a key the
    signature part is junk (for headers that must be refused before any key is looked up).
    """
    header_text = header if isinstance(header, str) else json.dumps(header)
    payload_text = payload if isinstance(payload, str) else json.dumps(payload)
    signing_input = f"{b64(header_text.encode())}.{b64(payload_text.encode())}"
    if key is None:
        return f"{signing_input}.{b64(b'not a signature')}"
    algorithm = jwt.algorithms.get_default_algorithms()[alg or str(json.loads(header_text)["alg"])]
    return f"{signing_input}.{b64(algorithm.sign(signing_input.encode(), key))}"


def es256(t: Trust, payload: Mapping[str, Any] | str, **header: Any) -> str:
    """Signed like a real example.org JWT-SVID (ES256 with the P-256 key), header entries overridden by ``header``."""
    full = {"alg": "ES256", "kid": t.kid(t.ec_key), "typ": "JWT", **header}
    return sign({k: v for k, v in full.items() if v is not None}, payload, t.ec_key)


def valid_token(t: Trust) -> str:
    """The control: validates on every path (so a refusal in the table is never the set-up's fault)."""
    return es256(t, claims())


def _hs256_with_public_key(t: Trust) -> str:
    """The classic algorithm confusion: HMAC keyed with the (public) PEM of the key the kid names."""
    secret = t.ec_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "kid": t.kid(t.ec_key)}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims()).encode())}"
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


def _oversized(t: Trust) -> str:
    return es256(t, claims(padding="x" * MAX_TOKEN_LENGTH))


def _tampered(t: Trust) -> str:
    head, _, signature = valid_token(t).split(".")
    return f"{head}.{b64(json.dumps(claims(sub='spiffe://example.org/admin')).encode())}.{signature}"


@dataclass(frozen=True, slots=True)
class Hostile:
    name: str
    build: Callable[[Trust], str]
    error: type[TesseraError]  # what the SDK raises
    message: str  # a fragment of the SDK's message
    audience: str = AUDIENCE


HOSTILE: tuple[Hostile, ...] = (
    # -- shape and header ----------------------------------------------------------------------------------
    Hostile("two parts", lambda t: valid_token(t).rsplit(".", 1)[0], SvidError, "not a compact JWS"),
    Hostile("four parts", lambda t: valid_token(t) + ".e30", SvidError, "not a compact JWS"),
    Hostile("empty signature", lambda t: valid_token(t).rsplit(".", 1)[0] + ".", SvidError, "no signature"),
    Hostile("padded base64", lambda t: valid_token(t) + "==", SvidError, "not a compact JWS"),
    Hostile("space inside", lambda t: " " + valid_token(t), SvidError, "not a compact JWS"),
    Hostile("oversized", _oversized, SvidError, f"above the limit of {MAX_TOKEN_LENGTH}"),
    Hostile(
        "header not JSON",
        lambda t: f"{b64(b'{not json')}.{valid_token(t).split('.', 1)[1]}",
        SvidError,
        "header is malformed",
    ),
    Hostile(
        "header a JSON array",
        lambda t: f"{b64(b'[1]')}.{valid_token(t).split('.', 1)[1]}",
        SvidError,
        "header is malformed",
    ),
    Hostile("payload not JSON", lambda t: es256(t, "{not json"), SvidError, "is malformed"),
    Hostile("payload a JSON array", lambda t: es256(t, "[1, 2]"), SvidError, "is malformed"),
    Hostile(
        "crit header",
        lambda t: es256(t, claims(), crit=["x-tessera"], **{"x-tessera": 1}),
        SvidError,
        "critical extension",
    ),
    Hostile(
        # RFC 7797's b64, an extension PyJWT understands (so it lets it through): the JWT-SVID profile has none.
        "crit b64",
        lambda t: es256(t, claims(), crit=["b64"], b64=True),
        SvidError,
        "critical extensions ['b64']",
    ),
    Hostile("alg none", lambda t: sign({"alg": "none", "kid": t.kid(t.ec_key)}, claims()), SvidError, "'none' is not"),
    Hostile("HS256 keyed with the public key", _hs256_with_public_key, SvidError, "'HS256' is not allowed"),
    Hostile(
        # RFC 7515 section 4: names must be unique, or the last one counts (PyJWT's json): never the first.
        "duplicate alg, the last one none",
        lambda t: sign(f'{{"alg": "ES256", "kid": "{t.kid(t.ec_key)}", "alg": "none"}}', claims(), t.ec_key, "ES256"),
        SvidError,
        "'none' is not allowed",
    ),
    Hostile("no kid", lambda t: es256(t, claims(), kid=None), SvidError, "no 'kid'"),
    Hostile("kid not a string", lambda t: es256(t, claims(), kid=["k"]), SvidError, "must be a string"),
    Hostile("typ at+jwt", lambda t: es256(t, claims(), typ="at+jwt"), SvidError, "'typ'"),
    # -- keys ----------------------------------------------------------------------------------------------
    Hostile(
        "ES256 header over the RSA key",
        lambda t: sign({"alg": "ES256", "kid": t.kid(t.rsa_key)}, claims(), t.ec_key),
        VerificationError,
        "algorithm ES256 does not match the type of the key",
    ),
    Hostile(
        "RS256 header over the EC key",
        lambda t: sign({"alg": "RS256", "kid": t.kid(t.ec_key)}, claims(), t.rsa_key),
        VerificationError,
        "algorithm RS256 does not match the type of the key",
    ),
    Hostile(
        "PS256 header over the EC key",
        lambda t: sign({"alg": "PS256", "kid": t.kid(t.ec_key)}, claims(), t.rsa_key),
        VerificationError,
        "algorithm PS256 does not match the type of the key",
    ),
    Hostile(
        "ES256 header over the P-384 key",
        lambda t: sign({"alg": "ES256", "kid": t.kid(t.p384_key)}, claims(), t.p384_key),
        VerificationError,
        "algorithm ES256 does not match the type of the key",
    ),
    Hostile(
        "unknown kid",
        lambda t: es256(t, claims(), kid="not-in-the-bundle"),
        VerificationError,
        "'not-in-the-bundle' is not in the JWT bundle of trust domain example.org",
    ),
    Hostile(
        "key of other.org signing for example.org",
        lambda t: sign({"alg": "ES256", "kid": t.other.jwt_kid}, claims(), t.other.jwt_key),
        VerificationError,
        "is not in the JWT bundle of trust domain example.org",
    ),
    Hostile(
        "sub of a trust domain without a bundle",
        lambda t: es256(t, claims(sub="spiffe://unknown.org/web")),
        VerificationError,
        "no JWT bundle for trust domain unknown.org",
    ),
    Hostile(
        "signed by another key under a known kid",
        lambda t: sign({"alg": "ES256", "kid": t.kid(t.ec_key)}, claims(), generate_key()),
        VerificationError,
        "signature does not verify",
    ),
    Hostile("payload changed after signing", _tampered, VerificationError, "signature does not verify"),
    # -- claims --------------------------------------------------------------------------------------------
    Hostile("no sub", lambda t: es256(t, claims(sub=None)), SvidError, "no 'sub'"),
    Hostile(
        "sub not a SPIFFE ID",
        lambda t: es256(t, claims(sub="https://example.org/web")),
        SvidError,
        "not a valid SPIFFE ID",
    ),
    Hostile("no aud", lambda t: es256(t, claims(aud=None)), SvidError, "'aud' claim is missing"),
    Hostile("aud empty", lambda t: es256(t, claims(aud=[])), SvidError, "'aud' claim is empty"),
    Hostile("aud not strings", lambda t: es256(t, claims(aud=[1])), SvidError, "'aud' claim is missing or not"),
    Hostile("wrong audience", valid_token, VerificationError, "does not include the expected ['other']", "other"),
    Hostile("no exp", lambda t: es256(t, claims(exp=None)), SvidError, "no 'exp'"),
    Hostile("exp not a number", lambda t: es256(t, claims(exp="tomorrow")), SvidError, "'exp' must be a number"),
    Hostile("exp out of range", lambda t: es256(t, claims(exp=10**300)), SvidError, "'exp' claim is out of range"),
    Hostile("nbf out of range", lambda t: es256(t, claims(nbf=1e300)), SvidError, "'nbf' claim is out of range"),
    Hostile(
        "expired beyond the skew",
        lambda t: es256(t, claims(iat=int(NOW - 400), exp=int(NOW - SKEW - 1))),
        VerificationError,
        "has expired",
    ),
    Hostile(
        "not yet valid beyond the skew",
        lambda t: es256(t, claims(nbf=int(NOW + SKEW + 1))),
        VerificationError,
        "not yet valid",
    ),
    Hostile(
        "issued in the future beyond the skew",
        lambda t: es256(t, claims(iat=int(NOW + SKEW + 1), exp=int(NOW + 600))),
        VerificationError,
        "issued in the future",
    ),
    Hostile("jti not a string", lambda t: es256(t, claims(jti=7)), SvidError, "'jti' must be a string"),
)


def _unique_names() -> None:
    names = [h.name for h in HOSTILE]
    duplicated = {n for n in names if names.count(n) > 1}
    if duplicated:
        raise AssertionError(f"hostile JWT table: duplicate row names {sorted(duplicated)}")


_unique_names()

__all__ = ["AUDIENCE", "HOSTILE", "NOW", "SKEW", "SUB", "Hostile", "Trust", "claims", "sign", "valid_token"]
