"""The shared table of hostile JWT-SVIDs (tests/support/hostile_jwts.py) against the SDK's validator.

The agent's ValidateJWTSVID runs the same table over a real socket (tests/agent/test_agent_jwt_hostile.py).
"""

from __future__ import annotations

import datetime as dt

import pytest
from support.hostile_jwts import AUDIENCE, HOSTILE, NOW, SUB, Hostile, Trust, valid_token

from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import SpiffeId

WHEN = dt.datetime.fromtimestamp(NOW, dt.UTC)


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust()


def test_the_control_token_validates(trust: Trust) -> None:
    svid = JwtSvid.parse_and_validate(valid_token(trust), trust.jwt_bundles(), AUDIENCE, now=WHEN)
    assert svid.spiffe_id == SpiffeId.parse(SUB)


@pytest.mark.parametrize("row", HOSTILE, ids=[h.name for h in HOSTILE])
def test_the_sdk_refuses(trust: Trust, row: Hostile) -> None:
    token = row.build(trust)
    with pytest.raises(row.error) as refused:
        JwtSvid.parse_and_validate(token, trust.jwt_bundles(), row.audience, now=WHEN)
    assert type(refused.value) is row.error
    assert row.message in str(refused.value)
    assert token not in str(refused.value)  # a bearer token is never echoed back
