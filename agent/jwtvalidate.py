"""Local JWT-SVID validation against the JWT authorities the agent holds (ValidateJWTSVID)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jwt

from tessera.agent.bundles import TrustBundle
from tessera.agent.errors import AgentError
from tessera.sdk.errors import SpiffeIdError
from tessera.sdk.spiffeid import SpiffeId

CLOCK_SKEW_LEEWAY = 10.0
"""Seconds of clock difference tolerated on exp/nbf/iat (as the SDK's validator): a workload or agent whose clock
is a few seconds behind the server must not refuse a JWT-SVID minted a moment ago."""

ALGORITHMS = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512")


class JwtValidationError(AgentError):
    """The token is not a valid JWT-SVID for the audience (the caller's mistake: InvalidArgument)."""


def validate_jwt_svid(token: str, audience: str, bundles: Mapping[str, TrustBundle]) -> tuple[str, dict[str, Any]]:
    """Returns (SPIFFE ID, claims) of a JWT-SVID signed by a known authority of its own trust domain."""
    try:
        header = jwt.get_unverified_header(token)
        unverified = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError as exc:
        raise JwtValidationError(f"malformed JWT-SVID: {exc}") from exc
    alg = header.get("alg")
    if alg not in ALGORITHMS:
        raise JwtValidationError(f"JWT-SVID algorithm {alg!r} is not allowed")
    kid = header.get("kid")
    if not kid:
        raise JwtValidationError("JWT-SVID header has no key ID (kid)")
    typ = header.get("typ")
    if typ is not None and typ not in ("JWT", "JOSE"):
        raise JwtValidationError(f"JWT-SVID header typ {typ!r} is not JWT or JOSE")
    sub = unverified.get("sub")
    if not isinstance(sub, str):
        raise JwtValidationError("JWT-SVID has no sub claim")
    try:
        spiffe_id = SpiffeId.parse(sub)
    except SpiffeIdError as exc:
        raise JwtValidationError(f"JWT-SVID sub is not a SPIFFE ID: {exc}") from exc
    bundle = bundles.get(spiffe_id.trust_domain.id_string)
    if bundle is None:
        raise JwtValidationError(f"no bundle for trust domain {spiffe_id.trust_domain}")
    key = bundle.jwt_keys.get(kid)
    if key is None:
        raise JwtValidationError(f"key {kid!r} is not a JWT authority of {spiffe_id.trust_domain}")
    try:
        claims: dict[str, Any] = jwt.decode(
            token,
            key=key,
            algorithms=[alg],
            audience=audience,
            options={"require": ["sub", "aud", "exp"]},
            leeway=CLOCK_SKEW_LEEWAY,
        )
    except jwt.PyJWTError as exc:
        raise JwtValidationError(f"JWT-SVID is not valid: {exc}") from exc
    return str(spiffe_id), claims
