"""The shared table of hostile JWT-SVIDs (tests/support/hostile_jwts.py) against the agent's ValidateJWTSVID.

A real Workload API endpoint (relay, internal gRPC server, servicer) on its own event loop thread, trusting the
table's bundles as the server would hand them over (SPIFFE bundle documents), with its clock at the table's
instant. Every token the SDK refuses, the agent refuses with INVALID_ARGUMENT and exactly the SDK's message: one
validator behind both (tests/sdk_core/test_sdk_jwtsvid_hostile.py runs the same rows against the SDK).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from agent_testlib import start_endpoint, stop_endpoint
from google.protobuf import json_format
from support.hostile_jwts import AUDIENCE, HOSTILE, NOW, SUB, Hostile, Trust, valid_token

from tessera.agent.bundles import parse_bundle_document
from tessera.agent.cache import WorkloadCache
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.errors import TesseraError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

WHEN = dt.datetime.fromtimestamp(NOW, dt.UTC)


@pytest.fixture(scope="module")
def trust() -> Trust:
    return Trust()


@pytest.fixture(scope="module")
def stub(trust: Trust) -> Iterator[Any]:
    cache = WorkloadCache(trust.ca.trust_domain.id_string, clock=lambda: NOW)
    cache.set_bundles(
        {
            b.trust_domain.id_string: parse_bundle_document(b.trust_domain.id_string, b.to_document())
            for b in trust.spiffe_bundles()
        }
    )
    cache.mark_ready()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="agent-endpoint", daemon=True)
    thread.start()
    ep, path = asyncio.run_coroutine_threadsafe(start_endpoint(cache), loop).result(60)
    try:
        with grpc.insecure_channel(f"unix:{path}") as channel:
            yield WorkloadApiStub(channel)
    finally:
        asyncio.run_coroutine_threadsafe(stop_endpoint(ep), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def validate(stub: Any, token: str, audience: str) -> Any:
    request = wpb.ValidateJWTSVIDRequest(audience=audience, svid=token)
    return stub.ValidateJWTSVID(request, metadata=SECURITY_METADATA, timeout=30)


def test_the_control_token_validates_with_the_sdks_claims(trust: Trust, stub: Any) -> None:
    token = valid_token(trust)
    response = validate(stub, token, AUDIENCE)
    assert response.spiffe_id == SUB
    expected = JwtSvid.parse_and_validate(token, trust.jwt_bundles(), AUDIENCE, now=WHEN).claims
    assert json_format.MessageToDict(response.claims) == expected


@pytest.mark.parametrize("row", HOSTILE, ids=[h.name for h in HOSTILE])
def test_the_agent_refuses_what_the_sdk_refuses(trust: Trust, stub: Any, row: Hostile) -> None:
    token = row.build(trust)
    with pytest.raises(TesseraError) as sdk:
        JwtSvid.parse_and_validate(token, trust.jwt_bundles(), row.audience, now=WHEN)
    with pytest.raises(grpc.RpcError) as agent:
        validate(stub, token, row.audience)
    assert agent.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert agent.value.details() == str(sdk.value)
    assert row.message in agent.value.details()
