"""Every admin and node RPC, fed random, malformed, oversized and out-of-range fields, answers with a status
code that names the caller's mistake (never UNKNOWN or INTERNAL, which mean a server bug), and the daemon keeps
serving afterwards. One real server (TLS node API, admin socket, SQLite) serves the whole module.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.inproc import TD, RunningServer, cleanup, free_socket_dir, make_config
from support.nodeapi import Agent, csr_der, ec_key

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.proto import node_pb2 as npb
from tessera.server.api.msglimits import limit_for

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXISTS = grpc.StatusCode.ALREADY_EXISTS
DENIED = grpc.StatusCode.PERMISSION_DENIED
FAILED = grpc.StatusCode.FAILED_PRECONDITION
TOO_BIG = grpc.StatusCode.RESOURCE_EXHAUSTED
UNAUTH = grpc.StatusCode.UNAUTHENTICATED

RPC_FUZZ = settings(
    max_examples=int(os.environ.get("TESSERA_RPC_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    database=None,
)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("hostile-rpc")
    sock_dir = free_socket_dir()
    srv = RunningServer(make_config(data / "server", sock_dir / "api.sock"))
    try:
        yield srv
    finally:
        srv.stop()
        cleanup(sock_dir)


@pytest.fixture(scope="module")
def admin(server: RunningServer) -> Iterator[agrpc.AdminStub]:
    with server.admin() as client:
        yield client.stub


@pytest.fixture(scope="module")
def agent(server: RunningServer) -> Agent:
    a = Agent(server)
    with server.admin() as client:
        a.attest_join_token(client.token().token)
    return a


def status_of(call: Callable[[], Any]) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        assert exc.details() and "Traceback" not in exc.details(), exc.details()
        return code
    return OK


def assert_healthy(server: RunningServer) -> None:
    with grpc.insecure_channel(f"unix:{server.config.socket_path}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


# ------------------------------------------------------------------------------------ field strategies

AGENT_PARENT = f"spiffe://{TD}/spire/agent/fuzz"
ids = st.one_of(
    st.sampled_from(
        ["", f"spiffe://{TD}/ok", f"spiffe://{TD}", "spiffe://other.org/x", f"spiffe://{TD}/../x", AGENT_PARENT]
    ),
    st.text(max_size=40),
    st.builds(lambda s: f"spiffe://{TD}/" + s, st.text(max_size=40)),
    st.just(f"spiffe://{TD}/" + "a" * 3000),
)
selector_types = st.one_of(st.sampled_from(["unix", "", "a:b", " unix"]), st.text(max_size=10), st.just("t" * 200))
selector_values = st.one_of(st.sampled_from(["uid:0", "", "\x00"]), st.text(max_size=20), st.just("v" * 3000))
selectors = st.lists(st.builds(npb.Selector, type=selector_types, value=selector_values), max_size=70)
ttl32 = st.one_of(st.sampled_from([0, 1, 59, 60, 3600, -1, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1))
int64 = st.one_of(st.sampled_from([0, -1, 2**63 - 1, -(2**63)]), st.integers(-(2**63), 2**63 - 1))
dns = st.lists(
    st.one_of(st.sampled_from(["", "ok.example.org", "*.x", "1.2.3.4", "a" * 300]), st.text(max_size=20)),
    max_size=70,
)
entries = st.builds(
    npb.Entry,
    id=st.one_of(st.just(""), st.text(max_size=20), st.just("x" * 200)),
    spiffe_id=ids,
    parent_id=ids,
    selectors=selectors,
    x509_svid_ttl=ttl32,
    jwt_svid_ttl=ttl32,
    dns_names=dns,
    hint=st.one_of(st.text(max_size=20), st.just("h" * 2000)),
    admin=st.booleans(),
    downstream=st.booleans(),
    federates_with=st.lists(st.one_of(st.text(max_size=15), st.just(TD), st.just("b.test")), max_size=3),
    expires_at=int64,
    revision=st.integers(0, 2**64 - 1),
    created_at=int64,
    node=st.booleans(),
)

ENTRY_CODES = {OK, INVALID, NOT_FOUND, EXISTS, FAILED, grpc.StatusCode.ABORTED}


@RPC_FUZZ
@given(entries)
def test_create_and_update_entry_fuzz(server: RunningServer, admin: agrpc.AdminStub, entry: npb.Entry) -> None:
    code = status_of(lambda: admin.CreateEntry(apb.CreateEntryRequest(entry=entry), timeout=30))
    assert code in ENTRY_CODES, code
    code = status_of(lambda: admin.UpdateEntry(apb.UpdateEntryRequest(entry=entry), timeout=30))
    assert code in ENTRY_CODES, code


@RPC_FUZZ
@given(ids, ids, selectors, st.integers(-(2**31), 2**31 - 1), st.text(max_size=60))
def test_list_entries_fuzz(
    admin: agrpc.AdminStub, spiffe_id: str, parent: str, sels: list[npb.Selector], size: int, token: str
) -> None:
    request = apb.ListEntriesRequest(
        spiffe_id=spiffe_id, parent_id=parent, selectors=sels, page_size=size, page_token=token
    )
    assert status_of(lambda: admin.ListEntries(request, timeout=30)) in {OK, INVALID}


@RPC_FUZZ
@given(st.text(max_size=300), ids)
def test_get_delete_and_agent_rpcs_fuzz(admin: agrpc.AdminStub, entry_id: str, agent_id: str) -> None:
    assert status_of(lambda: admin.GetEntry(apb.GetEntryRequest(id=entry_id), timeout=30)) in {INVALID, NOT_FOUND}
    assert status_of(lambda: admin.DeleteEntry(apb.DeleteEntryRequest(id=entry_id), timeout=30)) in {INVALID, NOT_FOUND}
    for call in (
        lambda: admin.GetAgent(apb.GetAgentRequest(spiffe_id=agent_id), timeout=30),
        lambda: admin.EvictAgent(apb.EvictAgentRequest(spiffe_id=agent_id), timeout=30),
        lambda: admin.BanAgent(apb.BanAgentRequest(spiffe_id=agent_id), timeout=30),
    ):
        assert status_of(call) in {INVALID, NOT_FOUND, OK}


@RPC_FUZZ
@given(st.integers(-(2**31), 2**31 - 1), st.text(max_size=80))
def test_list_agents_fuzz(admin: agrpc.AdminStub, size: int, token: str) -> None:
    request = apb.ListAgentsRequest(page_size=size, page_token=token)
    assert status_of(lambda: admin.ListAgents(request, timeout=30)) in {OK, INVALID}


@RPC_FUZZ
@given(int64, ids)
def test_join_token_fuzz(admin: agrpc.AdminStub, ttl: int, spiffe_id: str) -> None:
    request = apb.CreateJoinTokenRequest(ttl=ttl, spiffe_id=spiffe_id)
    code = status_of(lambda: admin.CreateJoinToken(request, timeout=30))
    assert code in {OK, INVALID}
    if ttl < 0:
        assert code == INVALID


@RPC_FUZZ
@given(
    st.one_of(ids, st.sampled_from(["spiffe://b.test", "b.test", "spiffe://b.test/x"])),
    st.one_of(st.binary(max_size=300), st.just(b"{}"), st.just(b'{"keys": []}'), st.just(b"[]")),
    st.sampled_from([0, 1, 7, -1]),
)
def test_federated_bundle_fuzz(admin: agrpc.AdminStub, td: str, data: bytes, fmt: int) -> None:
    request = apb.SetFederatedBundleRequest(id=td, data=data, format=fmt)  # type: ignore[arg-type]
    assert status_of(lambda: admin.SetFederatedBundle(request, timeout=30)) in {OK, INVALID}
    delete = apb.DeleteFederatedBundleRequest(id=td)
    assert status_of(lambda: admin.DeleteFederatedBundle(delete, timeout=30)) in {OK, INVALID, NOT_FOUND}
    assert status_of(lambda: admin.GetBundle(apb.GetBundleRequest(format=fmt), timeout=30)) in {OK, INVALID}  # type: ignore[arg-type]


urls = st.one_of(
    st.sampled_from(["", "https://b.example:8443/", "http://b.example/", "ftp://x", "https://", "https://[::1"]),
    st.text(max_size=40),
)


@RPC_FUZZ
@given(
    st.one_of(st.sampled_from(["b.test", "", TD, "B.TEST", "spiffe://b.test"]), st.text(max_size=20)),
    urls,
    st.one_of(st.sampled_from(["https_web", "https_spiffe", ""]), st.text(max_size=12)),
    ids,
    st.one_of(st.binary(max_size=200), st.just(b"")),
    st.sampled_from([0, 1, 9]),
)
def test_trust_admin_federation_fuzz(
    server: RunningServer, td: str, url: str, profile: str, endpoint_id: str, bundle: bytes, fmt: int
) -> None:
    with grpc.insecure_channel(f"unix:{server.config.socket_path}") as channel:
        trust = agrpc.TrustAdminStub(channel)  # type: ignore[no-untyped-call]
        relationship = apb.FederationRelationship(
            trust_domain=td, bundle_endpoint_url=url, profile=profile, endpoint_spiffe_id=endpoint_id
        )
        request = apb.CreateFederationRelationshipRequest(
            relationship=relationship, bundle=bundle, bundle_format=fmt  # type: ignore[arg-type]
        )
        allowed = {OK, INVALID, EXISTS, NOT_FOUND, FAILED}
        assert status_of(lambda: trust.CreateFederationRelationship(request, timeout=30)) in allowed
        assert status_of(lambda: trust.UpdateFederationRelationship(request, timeout=30)) in allowed
        get = apb.GetFederationRelationshipRequest(trust_domain=td)
        assert status_of(lambda: trust.GetFederationRelationship(get, timeout=30)) in {OK, INVALID, NOT_FOUND}
        assert status_of(lambda: trust.DeleteFederationRelationship(get, timeout=30)) in {OK, INVALID, NOT_FOUND}


@RPC_FUZZ
@given(
    st.one_of(st.sampled_from(["x509", "jwt", ""]), st.text(max_size=8)),
    st.one_of(st.text(max_size=60), st.just("f" * 40)),
    st.booleans(),
    st.sampled_from(["serial", "entry_id", "agent_id"]),
    st.one_of(st.text(max_size=60), ids),
    st.booleans(),
)
def test_trust_admin_authority_and_revocation_fuzz(
    server: RunningServer, kind: str, key_id: str, force: bool, target: str, value: str, cut_off: bool
) -> None:
    with grpc.insecure_channel(f"unix:{server.config.socket_path}") as channel:
        trust = agrpc.TrustAdminStub(channel)  # type: ignore[no-untyped-call]
        authority = apb.AuthorityRequest(kind=kind, key_id=key_id, force=force)
        allowed = {INVALID, NOT_FOUND, FAILED}
        assert status_of(lambda: trust.TaintAuthority(authority, timeout=30)) in allowed
        assert status_of(lambda: trust.RevokeAuthority(authority, timeout=30)) in allowed
        revoke = apb.RevokeX509SVIDsRequest(cut_off=cut_off, **{target: value})
        assert status_of(lambda: trust.RevokeX509SVIDs(revoke, timeout=30)) in {OK, INVALID, NOT_FOUND, FAILED}
        listed = apb.ListRevokedX509SVIDsRequest()
        assert status_of(lambda: trust.ListRevokedX509SVIDs(listed, timeout=30)) == OK


def test_oversized_admin_messages(server: RunningServer, admin: agrpc.AdminStub) -> None:
    big = npb.Entry(
        spiffe_id=f"spiffe://{TD}/big",
        parent_id=AGENT_PARENT,
        selectors=[npb.Selector(type="unix", value=f"uid:{i}") for i in range(10_000)],
    )
    assert status_of(lambda: admin.CreateEntry(apb.CreateEntryRequest(entry=big), timeout=30)) == INVALID
    huge_bundle = apb.SetFederatedBundleRequest(id="spiffe://b.test", data=b"x" * (2 * 1024 * 1024))
    assert status_of(lambda: admin.SetFederatedBundle(huge_bundle, timeout=30)) == INVALID
    assert_healthy(server)


# --------------------------------------------------------------------------------------------- node API


@RPC_FUZZ
@given(st.text(max_size=30), st.binary(max_size=2000), st.one_of(st.binary(max_size=200), st.just(b"")))
def test_attest_fuzz(server: RunningServer, attestor: str, payload: bytes, csr: bytes) -> None:
    agent = Agent(server)
    code = status_of(lambda: agent.attest(attestor, payload, csr=csr))
    assert code in {INVALID, DENIED, UNAUTH, NOT_FOUND, FAILED}, code


def test_attest_with_an_oversized_payload(server: RunningServer) -> None:
    agent = Agent(server)
    code = status_of(lambda: agent.attest("x509pop", os.urandom(8 * 1024 * 1024)))
    assert code in {INVALID, TOO_BIG}, code
    assert_healthy(server)


@RPC_FUZZ
@given(st.lists(st.builds(npb.X509SignRequest, entry_id=st.text(max_size=40), csr=st.binary(max_size=300)), max_size=8))
def test_batch_sign_fuzz(agent: Agent, requests: list[npb.X509SignRequest]) -> None:
    request = npb.BatchSignX509SVIDRequest(requests=requests)
    code = status_of(lambda: agent.stub().BatchSignX509SVID(request, timeout=30))
    assert code in {OK, INVALID, NOT_FOUND, DENIED}, code
    if not requests:
        assert code in {OK, INVALID}


def test_batch_sign_oversized(agent: Agent, server: RunningServer) -> None:
    with server.admin() as client:
        entry = client.create_entry(f"spiffe://{TD}/hostile/batch", agent.spiffe_id)
    csr = csr_der(ec_key())
    too_many = npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=entry.id, csr=csr)] * 501)
    assert status_of(lambda: agent.stub().BatchSignX509SVID(too_many, timeout=60)) == INVALID
    # Larger than any batch an agent sends: refused by size before it is parsed (api.msglimits).
    too_large = npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=entry.id, csr=csr)] * 5000)
    exhausted = grpc.StatusCode.RESOURCE_EXHAUSTED
    assert status_of(lambda: agent.stub().BatchSignX509SVID(too_large, timeout=60)) == exhausted
    huge_csr = npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=entry.id, csr=b"\x30" * 100_000)])
    assert status_of(lambda: agent.stub().BatchSignX509SVID(huge_csr, timeout=60)) == INVALID


@RPC_FUZZ
@given(st.text(max_size=40), st.lists(st.one_of(st.text(max_size=30), st.just("a" * 5000)), max_size=20))
def test_mint_jwt_fuzz(agent: Agent, entry_id: str, audience: list[str]) -> None:
    request = npb.MintJWTSVIDRequest(entry_id=entry_id, audience=audience)
    # Over the method's receive limit the request is refused before it is parsed (RESOURCE_EXHAUSTED).
    too_big = request.ByteSize() > limit_for("/tessera.node.v1.Node/MintJWTSVID")
    expected = {TOO_BIG} if too_big else {INVALID, NOT_FOUND, DENIED}
    assert status_of(lambda: agent.stub().MintJWTSVID(request, timeout=30)) in expected


@RPC_FUZZ
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.text(max_size=100))
def test_sync_fuzz(agent: Agent, entries_revision: int, bundles_revision: int, token: str) -> None:
    request = npb.SyncRequest(entries_revision=entries_revision, bundles_revision=bundles_revision, page_token=token)
    assert status_of(lambda: agent.stub().Sync(request, timeout=30)) in {OK, INVALID}


@RPC_FUZZ
@given(st.binary(max_size=500))
def test_renew_agent_fuzz(agent: Agent, csr: bytes) -> None:
    request = npb.RenewAgentRequest(csr=csr)
    assert status_of(lambda: agent.stub().RenewAgent(request, timeout=30)) in {INVALID}


def test_renewal_cannot_change_the_agent_id(server: RunningServer) -> None:
    thief = Agent(server)
    with server.admin() as client:
        thief.attest_join_token(client.token().token)
    other = f"spiffe://{TD}/spire/agent/someone-else"
    renewed = thief.stub().RenewAgent(npb.RenewAgentRequest(csr=csr_der(ec_key(), sans=[other])), timeout=30)
    assert renewed.svid.spiffe_id == thief.spiffe_id


def test_node_rpcs_without_a_client_certificate(server: RunningServer) -> None:
    channel, stub = Agent(server).anonymous_stub()
    try:
        for call in (
            lambda: stub.Sync(npb.SyncRequest(), timeout=30),
            lambda: stub.BatchSignX509SVID(npb.BatchSignX509SVIDRequest(), timeout=30),
            lambda: stub.MintJWTSVID(npb.MintJWTSVIDRequest(entry_id="x", audience=["a"]), timeout=30),
            lambda: stub.RenewAgent(npb.RenewAgentRequest(csr=csr_der(ec_key())), timeout=30),
        ):
            assert status_of(call) in {UNAUTH, DENIED}
    finally:
        channel.close()


def test_the_server_is_still_serving_after_all_of_it(server: RunningServer, agent: Agent) -> None:
    assert_healthy(server)
    with server.admin() as client:
        entry = client.create_entry(f"spiffe://{TD}/hostile/after", agent.spiffe_id)
    response = agent.stub().BatchSignX509SVID(
        npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=entry.id, csr=csr_der(ec_key()))]),
        timeout=30,
    )
    assert len(response.results) == 1 and response.results[0].cert_chain
