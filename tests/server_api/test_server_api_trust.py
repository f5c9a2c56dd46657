"""The running server with TrustAdmin: SVID revocation reaching agents as CRLs, CA taint/revoke reaching Sync
and the bundle, the HTTPS bundle endpoint, and federation between two servers."""

from __future__ import annotations

import json
import ssl
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from server_api_support import (
    TD,
    Agent,
    RunningServer,
    cleanup,
    csr_der,
    ec_key,
    free_socket_dir,
    make_config,
    running_server,
)
from support.procs import wait_for

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.proto import node_pb2 as npb
from tessera.sdk.bundle import SpiffeBundle, X509Bundle
from tessera.sdk.svid import parse_der_certificates, spiffe_id_from_certificate


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    with running_server(tmp_path / "server", federation_bind_address="127.0.0.1:0") as srv:
        yield srv


def trust_admin(server: RunningServer) -> tuple[object, agrpc.TrustAdminStub]:
    admin = server.admin()
    return admin, agrpc.TrustAdminStub(admin.channel)  # type: ignore[no-untyped-call]


def joined(server: RunningServer) -> Agent:
    agent = Agent(server)
    with server.admin() as admin:
        agent.attest_join_token(admin.token().token)
    return agent


def revoked_serials(crls: list[bytes]) -> set[int]:
    return {r.serial_number for der in crls for r in x509.load_der_x509_crl(der)}


def test_revoked_svids_reach_agents_as_crls(server: RunningServer) -> None:
    agent = joined(server)
    with server.admin() as admin:
        entry = admin.create_entry(f"spiffe://{TD}/revoked", agent.spiffe_id)
    stub = agent.stub()
    first = stub.Sync(npb.SyncRequest())
    assert first.crls and not revoked_serials(list(first.crls))  # one (empty) CRL per CA
    signed = stub.BatchSignX509SVID(
        npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=entry.id, csr=csr_der(ec_key()))])
    )
    leaf = parse_der_certificates(signed.results[0].cert_chain)[0]
    admin, trust = trust_admin(server)
    with admin:  # type: ignore[attr-defined]
        response = trust.RevokeX509SVIDs(apb.RevokeX509SVIDsRequest(serial=format(leaf.serial_number, "x")))
        assert [r.serial for r in response.revoked] == [format(leaf.serial_number, "x")]
        listed = trust.ListRevokedX509SVIDs(apb.ListRevokedX509SVIDsRequest()).revoked
        assert [r.spiffe_id for r in listed] == [entry.spiffe_id]
    later = stub.Sync(npb.SyncRequest(entries_revision=first.entries_revision, bundles_revision=first.bundles_revision))
    assert later.bundles_revision > first.bundles_revision
    assert leaf.serial_number in revoked_serials(list(later.crls))
    assert later.renew_agent_svid is False


def test_a_revoked_agent_svid_asks_the_agent_to_renew(server: RunningServer) -> None:
    agent = joined(server)
    admin, trust = trust_admin(server)
    with admin:  # type: ignore[attr-defined]
        trust.RevokeX509SVIDs(apb.RevokeX509SVIDsRequest(agent_id=agent.spiffe_id))
    assert agent.stub().Sync(npb.SyncRequest()).renew_agent_svid is True
    with server.admin() as admin:
        entry = admin.create_entry(f"spiffe://{TD}/after-revocation", agent.spiffe_id)
    batch = npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=entry.id, csr=csr_der(ec_key()))])
    with pytest.raises(grpc.RpcError) as info:
        agent.stub().BatchSignX509SVID(batch)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    key = ec_key()
    renewed = agent.stub().RenewAgent(npb.RenewAgentRequest(csr=csr_der(key)))
    agent.key, agent.chain = key, parse_der_certificates(renewed.svid.cert_chain)
    agent.reset_channel()
    assert agent.stub().Sync(npb.SyncRequest()).renew_agent_svid is False
    assert len(agent.stub().BatchSignX509SVID(batch).results) == 1


def test_taint_and_revoke_a_ca(server: RunningServer) -> None:
    agent = joined(server)
    with server.admin() as admin:
        old = next(s.key_id for s in admin.stub.GetCA(apb.GetCARequest()).slots if s.kind == "x509")
        admin.stub.PrepareCA(apb.PrepareCARequest())
        admin.stub.ActivateCA(apb.ActivateCARequest())
    admin, trust = trust_admin(server)
    with admin:  # type: ignore[attr-defined]
        tainted = trust.TaintAuthority(apb.AuthorityRequest(kind="x509", key_id=old)).slots
        assert any(s.key_id == old and s.tainted for s in tainted)
        sync = agent.stub().Sync(npb.SyncRequest())
        assert old in sync.tainted_authorities and sync.renew_agent_svid is True
        key = ec_key()  # the agent re-issues its SVID from the new CA
        renewed = agent.stub().RenewAgent(npb.RenewAgentRequest(csr=csr_der(key)))
        agent.key, agent.chain = key, parse_der_certificates(renewed.svid.cert_chain)
        agent.reset_channel()
        trust.RevokeAuthority(apb.AuthorityRequest(kind="x509", key_id=old))
    wait_for(
        lambda: (
            old
            not in {
                c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
                for c in X509Bundle.parse_pem(TD, server.bundle_pem()).authorities
            }
        ),
        30,
        "the revoked CA to leave the bundle",
    )
    assert agent.stub().Sync(npb.SyncRequest()).renew_agent_svid is False


def _https_get(port: int) -> tuple[bytes, x509.Certificate]:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # a foreign server authenticates the endpoint by bundle; checked below
    with urllib.request.urlopen(f"https://127.0.0.1:{port}/", context=ctx, timeout=10) as response:
        body = response.read()
    cert = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())
    return body, cert


def test_bundle_endpoint_serves_the_document_with_the_server_svid(server: RunningServer) -> None:
    port = server.app.endpoint_port
    assert port
    body, cert = _https_get(port)
    served = SpiffeBundle.from_document(TD, body)
    assert set(served.x509_authorities) == set(X509Bundle.parse_pem(TD, server.bundle_pem()).authorities)
    assert json.loads(body)["spiffe_refresh_hint"] > 0
    assert str(spiffe_id_from_certificate(cert)) == f"spiffe://{TD}/tessera/server"


def test_two_trust_domains_federate(tmp_path: Path, server: RunningServer) -> None:
    sock = free_socket_dir()
    other = RunningServer(make_config(tmp_path / "b", sock / "api.sock", trust_domain="b.test"))
    try:
        with server.admin() as admin:
            a_doc = admin.stub.GetBundle(apb.GetBundleRequest(format=apb.BundleFormat.BUNDLE_FORMAT_SPIFFE)).data
        admin, trust = trust_admin(other)
        with admin:  # type: ignore[attr-defined]
            created = trust.CreateFederationRelationship(
                apb.CreateFederationRelationshipRequest(
                    relationship=apb.FederationRelationship(
                        trust_domain=TD,
                        bundle_endpoint_url=f"https://127.0.0.1:{server.app.endpoint_port}/",
                        profile="https_spiffe",
                        endpoint_spiffe_id=f"spiffe://{TD}/tessera/server",
                    ),
                    bundle=a_doc,
                    bundle_format=apb.BundleFormat.BUNDLE_FORMAT_SPIFFE,
                )
            )
            assert created.trust_domain == TD
            refreshed = trust.RefreshFederatedBundle(apb.GetFederationRelationshipRequest(trust_domain=TD))
            assert refreshed.has_bundle and not refreshed.last_error and refreshed.last_refresh
        b_agent = Agent(other)
        with other.admin() as admin:
            b_agent.attest_join_token(admin.token().token)
        bundles = b_agent.stub().Sync(npb.SyncRequest()).bundles
        assert set(bundles) >= {"spiffe://b.test", f"spiffe://{TD}"}
        assert SpiffeBundle.from_document(TD, bundles[f"spiffe://{TD}"]).x509_authorities
    finally:
        other.stop()
        cleanup(sock)


def test_metrics_and_rate_limits_are_wired(tmp_path: Path) -> None:
    sock = free_socket_dir()
    srv = RunningServer(
        make_config(tmp_path / "m", sock / "api.sock", metrics_bind_address="127.0.0.1:0", attestation_rate_limit=3)
    )
    try:
        with srv.admin() as admin:
            tokens = [admin.token().token for _ in range(4)]
        for token in tokens[:3]:
            Agent(srv).attest_join_token(token)
        with pytest.raises(grpc.RpcError) as info:
            Agent(srv).attest_join_token(tokens[3])
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        with urllib.request.urlopen(f"http://127.0.0.1:{srv.app.metrics_port}/metrics", timeout=10) as response:
            text = response.read().decode()
        assert 'tessera_server_rate_limited_total{limit="attestation"} 1.0' in text
        assert 'tessera_server_svids_issued_total{kind="x509"} 3.0' in text
        assert "tessera_server_ca_expiry_seconds" in text and "tessera_server_node_rpcs_total" in text
    finally:
        srv.stop()
        cleanup(sock)
