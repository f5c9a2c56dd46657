"""JWT-SVIDs: minting (for the server) and parsing/validation (for workloads and the agent).

Validation is deliberately narrower than what PyJWT accepts: only the asymmetric algorithms the JWT-SVID
standard allows (so ``none`` and HMAC with a public key as the secret can never be selected by an
attacker), an algorithm that fits the type of the key it names, a mandatory ``kid`` naming a key of the
*subject's own* trust domain, ``typ`` JWT/JOSE when present, no ``crit`` extension, every expected audience
present in ``aud``, and ``exp``, ``nbf`` and ``iat`` checked against an injectable clock with a small leeway.

This is the one JWT-SVID validator: the agent's ValidateJWTSVID calls it too (a second copy in the agent had
drifted weaker), so a rule added here protects both, and tests/support/hostile_jwts.py runs one table of
hostile tokens against both.

Errors: a token that is not a well-formed JWT-SVID raises :class:`SvidError`; a well-formed one that does
not validate (signature, unknown key or trust domain, audience, expiry) raises :class:`VerificationError`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tessera.sdk.bundle import BundleSet, JwtBundle, bundle_for
from tessera.sdk.errors import SpiffeIdError, SvidError, VerificationError
from tessera.sdk.keys import PrivateKey, PublicKey
from tessera.sdk.spiffeid import SpiffeId, TrustDomain

ALLOWED_ALGORITHMS: frozenset[str] = frozenset(
    {"RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512"}
)
ALLOWED_TYPES = frozenset({"JWT", "JOSE"})
#: Tolerance for clock skew on ``exp`` / ``nbf`` / ``iat``: small, because JWT-SVIDs live only minutes.
DEFAULT_LEEWAY = dt.timedelta(seconds=10)
#: The longest token looked at. Tessera's own are under 30 KiB even at the server's limits (16 audiences of 1 KiB,
#: a 2 KiB SPIFFE ID, an RSA-4096 signature); anything far longer is an attempt to make the validator work.
MAX_TOKEN_LENGTH = 64 * 1024
#: RFC 7515 compact serialization: three unpadded base64url parts (header, payload, signature). An empty signature
#: fits the shape so that an unsigned ``alg: none`` token is told about its algorithm; it is refused after the header.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*")

JwtBundleSource = BundleSet[JwtBundle] | JwtBundle | Callable[[TrustDomain], JwtBundle | None]


def _audiences(audience: str | Iterable[str]) -> tuple[str, ...]:
    values = (audience,) if isinstance(audience, str) else tuple(audience)
    if not values or any(not isinstance(a, str) or not a for a in values):
        raise ValueError("audience must be one or more non-empty strings")
    return values


def _utc(value: dt.datetime | None) -> dt.datetime:
    if value is None:
        return dt.datetime.now(dt.UTC)
    if value.tzinfo is None:
        raise ValueError("times must be timezone-aware datetimes")
    return value.astimezone(dt.UTC)


def _numeric(claims: Mapping[str, Any], name: str, required: bool) -> float | None:
    """A time claim as seconds since the epoch, refused unless it is a number a datetime can hold: comparing or
    converting a huge one later must never fail with anything but :class:`SvidError`."""
    value = claims.get(name)
    if value is None:
        if required:
            raise SvidError(f"JWT-SVID has no {name!r} claim")
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SvidError(f"JWT-SVID claim {name!r} must be a number (seconds since the epoch)")
    try:
        if not math.isfinite(value):
            raise ValueError(value)
        dt.datetime.fromtimestamp(value, dt.UTC)
    except (OverflowError, OSError, ValueError):
        raise SvidError(f"JWT-SVID {name!r} claim is out of range") from None
    return float(value)


@dataclass(frozen=True, slots=True)
class JwtSvid:
    """A parsed JWT-SVID. ``token`` is a bearer credential: never log it."""

    spiffe_id: SpiffeId
    audience: tuple[str, ...]
    expires_at: dt.datetime
    token: str = field(repr=False)
    claims: Mapping[str, Any] = field(repr=False)
    hint: str = ""

    @property
    def issued_at(self) -> dt.datetime | None:
        iat = self.claims.get("iat")
        if isinstance(iat, int | float) and not isinstance(iat, bool):
            return dt.datetime.fromtimestamp(iat, dt.UTC)
        return None

    @property
    def kid(self) -> str:
        return str(jwt.get_unverified_header(self.token)["kid"])

    @classmethod
    def parse_insecure(
        cls,
        token: str,
        audience: str | Iterable[str] | None = None,
        *,
        now: dt.datetime | None = None,
        leeway: dt.timedelta = DEFAULT_LEEWAY,
        hint: str = "",
    ) -> JwtSvid:
        """Parses a JWT-SVID WITHOUT checking its signature (for a workload reading its own token).

        Header and claims rules still apply; audience and expiry are checked only when ``audience`` is given.
        """
        _check_header(token)
        claims = _decode(token, key=None, algorithm=None)
        svid = cls._from_claims(token, claims, hint)
        if audience is not None:
            svid._check_audience_and_time(_audiences(audience), _utc(now), leeway)
        return svid

    @classmethod
    def parse_and_validate(
        cls,
        token: str,
        jwt_bundles: JwtBundleSource,
        audience: str | Iterable[str],
        *,
        now: dt.datetime | None = None,
        leeway: dt.timedelta = DEFAULT_LEEWAY,
        hint: str = "",
    ) -> JwtSvid:
        """Validates a JWT-SVID's signature with the bundle of its subject's trust domain, then its claims.

        Every audience in ``audience`` must appear in the token's ``aud``.
        """
        expected = _audiences(audience)
        header = _check_header(token)
        unverified = cls._from_claims(token, _decode(token, key=None, algorithm=None), hint)
        td = unverified.spiffe_id.trust_domain
        bundle = bundle_for(jwt_bundles, td, "JWT")
        key = bundle.get(header["kid"])
        if key is None:
            raise VerificationError(f"JWT-SVID key ID {header['kid']!r} is not in the JWT bundle of trust domain {td}")
        _check_key_matches_alg(key, header["alg"])
        claims = _decode(token, key=key, algorithm=header["alg"])
        svid = cls._from_claims(token, claims, hint)
        svid._check_audience_and_time(expected, _utc(now), leeway)
        return svid

    @classmethod
    def _from_claims(cls, token: str, claims: Mapping[str, Any], hint: str) -> JwtSvid:
        sub = claims.get("sub")
        if not isinstance(sub, str) or not sub:
            raise SvidError("JWT-SVID has no 'sub' claim")
        try:
            spiffe_id = SpiffeId.parse(sub)
        except SpiffeIdError as exc:
            raise SvidError(f"JWT-SVID 'sub' is not a valid SPIFFE ID: {exc}") from None
        aud = claims.get("aud")
        if isinstance(aud, str):
            audience: tuple[str, ...] = (aud,)
        elif isinstance(aud, list) and all(isinstance(a, str) for a in aud):
            audience = tuple(aud)
        else:
            raise SvidError("JWT-SVID 'aud' claim is missing or not a string / list of strings")
        if not audience or not all(audience):
            raise SvidError("JWT-SVID 'aud' claim is empty")
        exp = _numeric(claims, "exp", required=True)
        assert exp is not None
        _numeric(claims, "nbf", required=False)
        _numeric(claims, "iat", required=False)
        if "jti" in claims and not isinstance(claims["jti"], str):
            raise SvidError("JWT-SVID claim 'jti' must be a string")
        expires_at = dt.datetime.fromtimestamp(exp, dt.UTC)
        return cls(spiffe_id, audience, expires_at, token, dict(claims), hint)

    def _check_audience_and_time(self, expected: tuple[str, ...], now: dt.datetime, leeway: dt.timedelta) -> None:
        missing = [a for a in expected if a not in self.audience]
        if missing:
            raise VerificationError(
                f"JWT-SVID audience {list(self.audience)!r} does not include the expected {missing!r}"
            )
        if now > self.expires_at + leeway:
            raise VerificationError(f"JWT-SVID has expired (exp {self.expires_at.isoformat()})")
        nbf = _numeric(self.claims, "nbf", required=False)
        if nbf is not None and now + leeway < dt.datetime.fromtimestamp(nbf, dt.UTC):
            raise VerificationError("JWT-SVID is not yet valid (nbf is in the future)")
        iat = _numeric(self.claims, "iat", required=False)
        if iat is not None and now + leeway < dt.datetime.fromtimestamp(iat, dt.UTC):
            # As go-spiffe (go-jose) and PyJWT: a token from the future means a wrong clock here or at the issuer.
            raise VerificationError(
                "JWT-SVID was issued in the future (iat is after now): check the clocks of the issuer and this host"
            )


def _check_header(token: str) -> dict[str, Any]:
    if not isinstance(token, str) or not token:
        raise SvidError("JWT-SVID token is empty")
    if len(token) > MAX_TOKEN_LENGTH:
        raise SvidError(f"JWT-SVID is {len(token)} characters long, above the limit of {MAX_TOKEN_LENGTH}")
    if not _COMPACT_JWS.fullmatch(token):
        raise SvidError(
            "JWT-SVID is not a compact JWS (expected three base64url parts separated by dots: header.payload.signature)"
        )
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError as exc:
        raise SvidError(f"JWT-SVID header is malformed: {exc}") from None
    alg = header.get("alg")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGORITHMS:
        raise SvidError(f"JWT-SVID algorithm {alg!r} is not allowed; expected one of {sorted(ALLOWED_ALGORITHMS)}")
    kid = header.get("kid")
    if not isinstance(kid, str) or not kid:
        raise SvidError("JWT-SVID header has no 'kid'; it is required to pick the signing key")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ not in ALLOWED_TYPES):
        raise SvidError(f"JWT-SVID header 'typ' is {typ!r}; only 'JWT' or 'JOSE' are allowed")
    crit = header.get("crit")
    if crit is not None:
        raise SvidError(f"JWT-SVID header has critical extensions {crit!r} this validator does not understand")
    if token.endswith("."):
        raise SvidError("JWT-SVID has no signature (its third part is empty)")
    return header


def _decode(token: str, key: PublicKey | None, algorithm: str | None) -> dict[str, Any]:
    """Decodes the payload; verifies the signature when a key is given (claims are checked by the caller)."""
    options: Any = {  # jwt.types.Options only exists in newer PyJWT releases
        "verify_signature": key is not None,
        "verify_exp": False,
        "verify_nbf": False,
        "verify_iat": False,
        "verify_aud": False,
        "verify_iss": False,
    }
    try:
        if key is None:
            claims = jwt.decode(token, options=options)
        else:
            assert algorithm is not None
            claims = jwt.decode(token, key=key, algorithms=[algorithm], options=options)
    except jwt.InvalidSignatureError:
        raise VerificationError("JWT-SVID signature does not verify with the key named by its 'kid'") from None
    except jwt.DecodeError as exc:
        if key is not None and "signature" in str(exc).lower():
            raise VerificationError(f"JWT-SVID signature does not verify: {exc}") from None
        raise SvidError(f"JWT-SVID is malformed: {exc}") from None
    except (jwt.PyJWTError, json.JSONDecodeError) as exc:
        raise SvidError(f"JWT-SVID is malformed: {exc}") from None
    if not isinstance(claims, dict):
        raise SvidError("JWT-SVID payload is not a JSON object")
    return claims


_ES_CURVES = {"ES256": "secp256r1", "ES384": "secp384r1", "ES512": "secp521r1"}


def _check_key_matches_alg(key: PublicKey, alg: str) -> None:
    """RFC 7518: RS/PS need an RSA key; ES256/384/512 need exactly P-256/P-384/P-521."""
    if alg.startswith(("RS", "PS")):
        ok = isinstance(key, rsa.RSAPublicKey)
    else:
        ok = isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == _ES_CURVES.get(alg)
    if not ok:
        raise VerificationError(f"JWT-SVID algorithm {alg} does not match the type of the key named by its 'kid'")


def algorithm_for_key(private_key: PrivateKey | PublicKey) -> str:
    """The JWS algorithm Tessera signs with for a key: ES256/384/512 by curve, RS256 for RSA."""
    if isinstance(private_key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        by_curve = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
        alg = by_curve.get(private_key.curve.name)
        if alg is None:
            raise SvidError(f"EC curve {private_key.curve.name} cannot sign JWT-SVIDs")
        return alg
    if isinstance(private_key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return "RS256"
    raise SvidError(f"{type(private_key).__name__} keys cannot sign JWT-SVIDs (allowed: RSA and EC P-256/384/521)")


def mint_jwt_svid(
    private_key: PrivateKey,
    kid: str,
    spiffe_id: SpiffeId | str,
    audience: str | Iterable[str],
    expires_at: dt.datetime,
    issued_at: dt.datetime | None = None,
    *,
    extra_claims: Mapping[str, Any] | None = None,
) -> str:
    """Signs a JWT-SVID (compact JWS). ``aud`` is always a list holding every requested audience."""
    if not kid:
        raise SvidError("a JWT-SVID needs a key ID ('kid')")
    sid = spiffe_id if isinstance(spiffe_id, SpiffeId) else SpiffeId.parse(spiffe_id)
    issued = _utc(issued_at)
    expires = _utc(expires_at)
    if expires <= issued:
        raise SvidError("JWT-SVID would expire before it is issued")
    claims: dict[str, Any] = dict(extra_claims or {})
    claims.update(
        {
            "sub": str(sid),
            "aud": list(_audiences(audience)),
            "exp": int(expires.timestamp()),
            "iat": int(issued.timestamp()),
        }
    )
    return jwt.encode(
        claims,
        private_key,
        algorithm=algorithm_for_key(private_key),
        headers={"kid": kid, "typ": "JWT"},
    )
