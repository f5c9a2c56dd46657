"""The Workload API of a real agent, fed hostile requests: random and mutated JWT-SVIDs to validate, random
audiences and SPIFFE IDs to mint for. Every answer is a caller-error status (or a correct success), never
UNKNOWN or INTERNAL, and the agent keeps serving."""

from __future__ import annotations

import base64
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from hardening_support import agent_proc, server_proc
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from support.inproc import TD
from support.procs import TesseraAgent, short_dir

from tessera.proto import workload_pb2 as wpb
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

pytestmark = pytest.mark.slow

AGENT_ID = f"spiffe://{TD}/host/wl-fuzz"
FUZZ = settings(
    max_examples=60, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)  # fmt: skip
OK, INVALID, DENIED = grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED


@dataclass
class World:
    agent: TesseraAgent
    stub: Any
    token: str


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    root = short_dir("thard-")
    server = server_proc(root)
    agent: TesseraAgent | None = None
    channel: grpc.Channel | None = None
    try:
        server.start_and_wait()
        server.write_bundle(root / "bundle.pem")
        server.admin(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/wl", "--parent-id", AGENT_ID, "--selector", "unix:uid:0"
        )  # fmt: skip
        agent = agent_proc(root, server, "agent", "--join-token", server.join_token(AGENT_ID)).start_and_wait()
        channel = grpc.insecure_channel(f"unix:{agent.socket}")
        stub = WorkloadApiStub(channel)
        token = stub.FetchJWTSVID(wpb.JWTSVIDRequest(audience=["db"]), metadata=SECURITY_METADATA, timeout=30)
        yield World(agent, stub, token.svids[0].svid)
    finally:
        if channel is not None:
            channel.close()
        if agent is not None:
            agent.stop()
        server.stop()
        shutil.rmtree(root, ignore_errors=True)


def code(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert "Traceback" not in (exc.details() or "")
        return exc.code()
    return OK


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
)


@FUZZ
@given(st.sampled_from(["alg", "kid", "typ", "crit"]), json_values)
@example("kid", {"a": 1})
@example("kid", [1, 2])
@example("alg", ["ES256"])
@example("typ", {"t": "JWT"})
@example("alg", "none")
@example("alg", "HS256")
def test_validate_with_hostile_headers(world: World, name: str, value: Any) -> None:
    header_b64, claims_b64, signature = world.token.split(".")
    header = json.loads(base64.urlsafe_b64decode(header_b64 + "=" * (-len(header_b64) % 4)))
    header[name] = value
    token = ".".join((_b64(json.dumps(header).encode()), claims_b64, signature))
    request = wpb.ValidateJWTSVIDRequest(audience="db", svid=token)
    result = code(lambda: world.stub.ValidateJWTSVID(request, metadata=SECURITY_METADATA, timeout=30))
    assert result in {OK, INVALID}, result


@FUZZ
@given(st.text(max_size=300), st.text(max_size=40))
def test_validate_random_tokens(world: World, token: str, audience: str) -> None:
    request = wpb.ValidateJWTSVIDRequest(audience=audience, svid=token)
    result = code(lambda: world.stub.ValidateJWTSVID(request, metadata=SECURITY_METADATA, timeout=30))
    assert result == INVALID, result


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=30), st.just("a" * 5000)), max_size=30), st.text(max_size=60))
def test_fetch_jwt_with_hostile_audiences_and_ids(world: World, audience: list[str], spiffe_id: str) -> None:
    request = wpb.JWTSVIDRequest(audience=audience, spiffe_id=spiffe_id)
    result = code(lambda: world.stub.FetchJWTSVID(request, metadata=SECURITY_METADATA, timeout=30))
    assert result in {OK, INVALID, DENIED}, result


def test_the_valid_token_still_validates_and_the_agent_is_healthy(world: World) -> None:
    request = wpb.ValidateJWTSVIDRequest(audience="db", svid=world.token)
    response = world.stub.ValidateJWTSVID(request, metadata=SECURITY_METADATA, timeout=30)
    assert response.spiffe_id == f"spiffe://{TD}/wl"
    assert world.agent.healthy()
    assert "Traceback" not in world.agent.output()
