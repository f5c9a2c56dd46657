"""A brand-new server joining a trust domain others serve: it publishes its new CA at once but signs nothing for
``join_grace``, so agents that sync with the other servers learn the CA before any SVID it signs reaches them.

Two in-process servers share one SQLite file (as two processes sharing it or PostgreSQL would): the first
server of the trust domain signs at once; the joining one refuses every signing RPC with UNAVAILABLE (which
agents treat as "fail over / retry") and reports NOT_SERVING until the grace ends, then signs SVIDs that
verify against the shared bundle; restarted with its data dir it has no grace period.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support.inproc import TD, RunningServer, cleanup, free_socket_dir, make_config
from support.nodeapi import Agent, csr_der, ec_key
from support.procs import wait_for

from tessera.proto import admin_pb2 as apb
from tessera.proto import node_pb2 as npb
from tessera.sdk.bundle import SpiffeBundle, X509Bundle
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.svid import parse_der_certificates
from tessera.sdk.verify import verify_x509_svid
from tessera.server.api.node import JoinGrace, join_grace_needed
from tessera.server.api.status import ApiError

# Long enough that the refusals below run inside it even on a slow machine (each takes milliseconds); the
# test waits for its end with a deadline, never a sleep.
GRACE = "8s"


def ski(cert: x509.Certificate) -> str:
    return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()


def issuer(leaf: x509.Certificate) -> str:
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki is not None
    return aki.hex()


def active_ca(server: RunningServer) -> str:
    with server.admin() as admin:
        slots = admin.stub.GetCA(apb.GetCARequest()).slots
    key_id: str = next(s.key_id for s in slots if s.kind == "x509" and s.state == "active")
    return key_id


def stored_bundle(server: RunningServer) -> SpiffeBundle:
    """The trust domain's bundle as stored in the shared datastore (read through the server's publisher)."""
    publisher = server.app._publisher
    assert publisher is not None
    bundle, _ = publisher.stored()
    assert bundle is not None
    return bundle


def health(server: RunningServer) -> int:
    with grpc.insecure_channel(f"unix:{server.config.socket_path}") as channel:
        status: int = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    return status


def refusal(call: object) -> str:
    """``call()`` must fail with UNAVAILABLE; its message."""
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()
    details: str = info.value.details()
    return details


def sign(agent: Agent, entry_id: str) -> list[x509.Certificate]:
    response = agent.stub().BatchSignX509SVID(
        npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=entry_id, csr=csr_der(ec_key()))]),
        timeout=30,
    )
    return parse_der_certificates(response.results[0].cert_chain)


@pytest.fixture
def shared(tmp_path: Path) -> Iterator[tuple[Path, str, list[Path]]]:
    socks = [free_socket_dir() for _ in range(3)]
    try:
        yield tmp_path, f"sqlite:///{tmp_path / 'shared.sqlite3'}", socks
    finally:
        for sock in socks:
            cleanup(sock)


def test_joining_server_signs_only_after_its_grace_period(shared: tuple[Path, str, list[Path]]) -> None:
    root, url, socks = shared
    a = RunningServer(make_config(root / "a", socks[0] / "api.sock", datastore=url, join_grace=GRACE))
    b: RunningServer | None = None
    try:
        # The first server of the trust domain has nobody to wait for: it serves and signs at once.
        assert health(a) == health_pb2.HealthCheckResponse.SERVING
        agent = Agent(a)
        with a.admin() as admin:
            agent.attest_join_token(admin.token().token)
            entry = admin.create_entry(f"spiffe://{TD}/ha/join", agent.spiffe_id)
            token_for_b = admin.token().token

        b = RunningServer(make_config(root / "b", socks[1] / "api.sock", datastore=url, join_grace=GRACE))
        # B's new CA is in the stored bundle at once, next to A's.
        ca_a, ca_b = active_ca(a), active_ca(b)
        assert ca_a != ca_b
        assert {ca_a, ca_b} <= {ski(c) for c in stored_bundle(b).x509_authorities}

        # Within the grace period B signs for nobody: attestation (the join token is not spent), agent SVID
        # renewal, workload X509-SVIDs and JWT-SVIDs all answer UNAVAILABLE, and its health says so.
        newcomer = Agent(b)
        message = refusal(lambda: newcomer.attest_join_token(token_for_b))
        assert f"this server just joined trust domain {TD}" in message and "retry in " in message, message
        agent.server = b
        agent.reset_channel()
        assert "just joined" in refusal(lambda: agent.stub().RenewAgent(npb.RenewAgentRequest(csr=csr_der(agent.key))))
        assert "just joined" in refusal(lambda: sign(agent, entry.id))
        assert "just joined" in refusal(
            lambda: agent.stub().MintJWTSVID(npb.MintJWTSVIDRequest(entry_id=entry.id, audience=["db"]), timeout=30)
        )
        assert health(b) == health_pb2.HealthCheckResponse.NOT_SERVING
        # Sync signs nothing and stays open, so B still hands out entries meanwhile.
        assert [e.id for e in agent.stub().Sync(npb.SyncRequest(), timeout=30).entries] == [entry.id]
        assert b.app._join_grace.remaining() > 0, "the refusals above must have run within the grace period"

        # After the grace period B serves and signs; what it signs verifies against the shared bundle.
        joined = b
        wait_for(lambda: health(joined) == health_pb2.HealthCheckResponse.SERVING, 30, "B SERVING after its grace")
        result = newcomer.attest_join_token(token_for_b)  # the same token: the refusal did not spend it
        bundle = SpiffeBundle.from_document(TD, result.trust_bundle)
        assert {ca_a, ca_b} <= {ski(c) for c in bundle.x509_authorities}
        verify_x509_svid(newcomer.chain, bundle.x509_bundle())
        assert issuer(newcomer.chain[0]) == ca_b
        chain = sign(agent, entry.id)
        assert issuer(chain[0]) == ca_b
        spiffe_id, _ = verify_x509_svid(chain, X509Bundle.parse_pem(TD, a.bundle_pem()))  # A's view of the store
        assert str(spiffe_id) == f"spiffe://{TD}/ha/join"
        token = agent.stub().MintJWTSVID(npb.MintJWTSVIDRequest(entry_id=entry.id, audience=["db"]), timeout=30).token
        JwtSvid.parse_and_validate(token, stored_bundle(a).jwt_bundle(), ["db"])

        # Restarted with its data dir (journal present), B's CA is already known: no grace period.
        b.stop()
        b = RunningServer(make_config(root / "b", socks[1] / "api.sock", datastore=url, join_grace=GRACE))
        assert b.app._join_grace.remaining() == 0
        assert health(b) == health_pb2.HealthCheckResponse.SERVING
        agent.server = b
        agent.reset_channel()
        verify_x509_svid(sign(agent, entry.id), X509Bundle.parse_pem(TD, b.bundle_pem()))
    finally:
        if b is not None:
            b.stop()
        a.stop()


def test_join_grace_zero_turns_it_off(shared: tuple[Path, str, list[Path]]) -> None:
    root, url, socks = shared
    a = RunningServer(make_config(root / "a", socks[0] / "api.sock", datastore=url))
    try:
        c = RunningServer(make_config(root / "c", socks[2] / "api.sock", datastore=url, join_grace="0"))
        try:
            assert c.app._join_grace.remaining() == 0
            assert health(c) == health_pb2.HealthCheckResponse.SERVING
            with c.admin() as admin:
                Agent(c).attest_join_token(admin.token().token)
        finally:
            c.stop()
    finally:
        a.stop()


def test_join_grace_decision() -> None:
    mine = {"x509:new", "jwt:new"}
    # A brand-new CA and other servers' authorities in the store: wait.
    assert join_grace_needed(fresh_ca=True, mine=mine, stored={"x509:other", "jwt:other"})
    # The first server of a trust domain (nothing stored, or only what it published itself): no wait.
    assert not join_grace_needed(fresh_ca=True, mine=mine, stored=None)
    assert not join_grace_needed(fresh_ca=True, mine=mine, stored=set(mine))
    # A restart with its journal: its CA was published before, whatever else the store holds.
    assert not join_grace_needed(fresh_ca=False, mine=mine, stored={"x509:other"})


def test_join_grace_refusal_names_the_remaining_seconds() -> None:
    now = [100.0]
    grace = JoinGrace(TrustDomain.parse(TD), until=104.2, clock=lambda: now[0])
    with pytest.raises(ApiError) as info:
        grace.check()
    assert info.value.code == grpc.StatusCode.UNAVAILABLE
    assert info.value.message == (
        f"this server just joined trust domain {TD}; its new CA is being published to agents; retry in 5s"
    )
    now[0] = 104.2
    assert grace.remaining() == 0
    grace.check()  # over: no error
    assert JoinGrace.none(TrustDomain.parse(TD)).remaining() == 0
