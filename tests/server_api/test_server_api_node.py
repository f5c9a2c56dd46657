"""The node API end to end: a real server (TLS, SQLite, CA) and an agent-side client over real sockets."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import tempfile
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.verification import PolicyBuilder, Store
from server_api_support import (
    TD,
    Agent,
    HostPki,
    RunningServer,
    cleanup,
    code_of,
    csr_der,
    ec_key,
    free_socket_dir,
    make_config,
    pem_certs,
    pem_key,
    running_server,
    sign_challenge,
    trust_bundle,
)

from tessera.proto import admin_pb2 as apb
from tessera.proto import node_pb2 as npb
from tessera.sdk.bundle import X509Bundle
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.svid import parse_der_certificates, spiffe_id_from_certificate
from tessera.sdk.verify import verify_x509_svid
from tessera.server.api import node as node_module
from tessera.server.attestation.x509pop import fingerprint


@pytest.fixture(scope="module")
def pki() -> HostPki:
    return HostPki.create()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: HostPki) -> Iterator[RunningServer]:
    data = tmp_path_factory.mktemp("node-api")
    ca_file = pki.write_root(data / "x509pop-roots.pem")
    with running_server(data / "server", x509pop_ca_bundle=[str(ca_file)]) as srv:
        yield srv


def joined(server: RunningServer) -> Agent:
    agent = Agent(server)
    with server.admin() as admin:
        token = admin.token().token
    agent.attest_join_token(token)
    return agent


def _x509_bundle(server: RunningServer) -> X509Bundle:
    return X509Bundle.parse_pem(TD, server.bundle_pem())


# ------------------------------------------------------------------------------------------- attestation


def test_join_token_attestation_issues_an_agent_svid_with_the_token_id(server: RunningServer) -> None:
    agent = Agent(server)
    with server.admin() as admin:
        token = admin.token()
    result = agent.attest_join_token(token.token)
    assert result.svid.spiffe_id == f"spiffe://{TD}/tessera/agent/join_token/{token.id}" == token.spiffe_id
    assert token.id not in token.token and token.token not in result.svid.spiffe_id
    assert agent.selectors == [f"join_token:id:{token.id}"]
    assert result.reattestable is False
    sid, _ = verify_x509_svid(agent.chain, trust_bundle(result).x509_bundle())
    assert str(sid) == result.svid.spiffe_id
    # The agent SVID passes the same checks as workload SVIDs.
    roots = list(trust_bundle(result).x509_authorities)
    PolicyBuilder().store(Store(roots)).build_client_verifier().verify(agent.chain[0], agent.chain[1:])
    assert _tls13_handshake(agent.chain, agent.key, pem_certs(roots)) == "TLSv1.3"
    assert result.svid.expires_at == int(agent.chain[0].not_valid_after_utc.timestamp())
    with server.admin() as admin:
        shown = admin.stub.GetAgent(apb.GetAgentRequest(spiffe_id=result.svid.spiffe_id)).agent
    assert shown.attestor == "join_token" and shown.serial == format(agent.chain[0].serial_number, "x")


def test_join_token_with_a_chosen_agent_id(server: RunningServer) -> None:
    agent = Agent(server)
    with server.admin() as admin:
        token = admin.token(spiffe_id=f"spiffe://{TD}/nodes/db-1")
    assert agent.attest_join_token(token.token).svid.spiffe_id == f"spiffe://{TD}/nodes/db-1"


def test_a_join_token_works_once(server: RunningServer) -> None:
    with server.admin() as admin:
        token = admin.token().token
    Agent(server).attest_join_token(token)
    assert code_of(lambda: Agent(server).attest_join_token(token)) == grpc.StatusCode.PERMISSION_DENIED


def test_concurrent_use_of_one_join_token_has_exactly_one_winner(server: RunningServer) -> None:
    with server.admin() as admin:
        token = admin.token().token
    outcomes: list[str] = []

    def attempt() -> None:
        try:
            Agent(server).attest_join_token(token)
            outcomes.append("ok")
        except grpc.RpcError as exc:
            outcomes.append(exc.code().name)

    threads = [threading.Thread(target=attempt) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(outcomes) == ["PERMISSION_DENIED"] * 5 + ["ok"]


def test_an_expired_join_token_is_refused(server: RunningServer) -> None:
    secret = "expired-token-for-test-0123456789"
    server.app.datastore.create_join_token(secret, int(time.time()) - 1)
    assert code_of(lambda: Agent(server).attest_join_token(secret)) == grpc.StatusCode.PERMISSION_DENIED


def test_unknown_token_and_malformed_attestation_requests(server: RunningServer) -> None:
    assert code_of(lambda: Agent(server).attest_join_token("no-such-token")) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: Agent(server).attest("tpm", b"x")) == grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(lambda: Agent(server).attest("join_token", b"")) == grpc.StatusCode.INVALID_ARGUMENT


def test_a_bad_agent_csr_does_not_spend_the_token(server: RunningServer) -> None:
    with server.admin() as admin:
        token = admin.token().token
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    agent = Agent(server)
    assert (
        code_of(lambda: agent.attest("join_token", token.encode(), csr=b"garbage")) == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert (
        code_of(lambda: agent.attest("join_token", token.encode(), csr=csr_der(weak)))
        == grpc.StatusCode.INVALID_ARGUMENT
    )
    agent.attest_join_token(token)  # still usable


def test_x509pop_attestation_is_challenge_response(server: RunningServer, pki: HostPki) -> None:
    key, leaf = pki.host("host1", dns=["host1.example.org"])
    agent = Agent(server)
    challenges: list[bytes] = []

    def answer(challenge: bytes) -> bytes:
        challenges.append(challenge)
        return sign_challenge(key, challenge)

    result = agent.attest("x509pop", pki.payload(leaf), answer)
    assert result.svid.spiffe_id == f"spiffe://{TD}/tessera/agent/x509pop/{fingerprint(leaf)}"
    assert result.reattestable is True
    assert set(agent.selectors) >= {
        "x509pop:subject:cn:host1",
        "x509pop:san:dns:host1.example.org",
        f"x509pop:ca:fingerprint:{fingerprint(pki.inter)}",
        f"x509pop:ca:fingerprint:{fingerprint(pki.root)}",
    }
    assert challenges[0].endswith(f"spiffe://{TD}".encode())
    # A recorded answer is worthless: the next attestation gets a new nonce.
    replayed = sign_challenge(key, challenges[0])
    assert code_of(lambda: Agent(server).attest("x509pop", pki.payload(leaf), lambda _c: replayed)) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # x509pop may attest again (a new SVID replaces the old one).
    again = Agent(server)
    again.attest("x509pop", pki.payload(leaf), lambda c: sign_challenge(key, c))
    assert again.spiffe_id == agent.spiffe_id
    assert code_of(lambda: agent.stub().Sync(npb.SyncRequest())) == grpc.StatusCode.PERMISSION_DENIED


def test_x509pop_with_the_wrong_key_or_an_untrusted_certificate_is_refused(server: RunningServer, pki: HostPki) -> None:
    _key, leaf = pki.host("host2")
    other = ec_key()
    assert code_of(lambda: Agent(server).attest("x509pop", pki.payload(leaf), lambda c: sign_challenge(other, c))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    stranger = HostPki.create("Elsewhere")
    skey, sleaf = stranger.host("host3")
    assert (
        code_of(lambda: Agent(server).attest("x509pop", stranger.payload(sleaf), lambda c: sign_challenge(skey, c)))
        == grpc.StatusCode.PERMISSION_DENIED
    )
    assert code_of(lambda: Agent(server).attest("x509pop", b"\x30\x03junk", lambda c: b"")) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


# ------------------------------------------------------------------------------------ peer authorization


def test_calls_without_a_client_certificate_are_refused(server: RunningServer) -> None:
    channel, stub = Agent(server).anonymous_stub()
    with channel:
        assert code_of(lambda: stub.Sync(npb.SyncRequest())) == grpc.StatusCode.PERMISSION_DENIED
        assert code_of(lambda: stub.RenewAgent(npb.RenewAgentRequest(csr=csr_der(ec_key())))) == (
            grpc.StatusCode.PERMISSION_DENIED
        )


def test_an_evicted_agent_is_refused_on_every_call(server: RunningServer) -> None:
    agent = joined(server)
    agent.stub().Sync(npb.SyncRequest())
    with server.admin() as admin:
        admin.stub.EvictAgent(apb.EvictAgentRequest(spiffe_id=agent.spiffe_id))
    stub = agent.stub()
    assert code_of(lambda: stub.Sync(npb.SyncRequest())) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: stub.RenewAgent(npb.RenewAgentRequest(csr=csr_der(agent.key)))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )


def test_a_banned_agent_is_refused_and_cannot_attest_again(server: RunningServer, pki: HostPki) -> None:
    key, leaf = pki.host("banned-host")
    agent = Agent(server)
    agent.attest("x509pop", pki.payload(leaf), lambda c: sign_challenge(key, c))
    with server.admin() as admin:
        admin.stub.BanAgent(apb.BanAgentRequest(spiffe_id=agent.spiffe_id))
        assert admin.stub.GetAgent(apb.GetAgentRequest(spiffe_id=agent.spiffe_id)).agent.banned
    assert code_of(lambda: agent.stub().Sync(npb.SyncRequest())) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(lambda: Agent(server).attest("x509pop", pki.payload(leaf), lambda c: sign_challenge(key, c))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    with server.admin() as admin:  # evicting lifts the ban
        admin.stub.EvictAgent(apb.EvictAgentRequest(spiffe_id=agent.spiffe_id))
    Agent(server).attest("x509pop", pki.payload(leaf), lambda c: sign_challenge(key, c))


def test_renewal_replaces_the_agent_svid_and_retires_the_old_one(server: RunningServer) -> None:
    agent = joined(server)
    old_chain = agent.chain
    new_key = ec_key()
    renewed = agent.stub().RenewAgent(npb.RenewAgentRequest(csr=csr_der(new_key)))
    chain = parse_der_certificates(renewed.svid.cert_chain)
    assert renewed.svid.spiffe_id == agent.spiffe_id
    assert chain[0].serial_number != old_chain[0].serial_number
    assert spiffe_id_from_certificate(chain[0]).path == agent.spiffe_id.split(TD, 1)[1]
    # The old certificate is still within its validity, but no longer the agent's current SVID.
    assert code_of(lambda: agent.stub().Sync(npb.SyncRequest())) == grpc.StatusCode.PERMISSION_DENIED
    agent.key, agent.chain = new_key, chain
    agent.reset_channel()
    agent.stub().Sync(npb.SyncRequest())
    assert code_of(lambda: agent.stub().RenewAgent(npb.RenewAgentRequest(csr=b"nope"))) == (
        grpc.StatusCode.INVALID_ARGUMENT
    )


# ------------------------------------------------------------------------------------------------- sync


def test_sync_full_then_incremental(server: RunningServer) -> None:
    agent = joined(server)
    other = joined(server)
    with server.admin() as admin:
        mine = admin.create_entry(f"spiffe://{TD}/sync/a", agent.spiffe_id)
        admin.create_entry(f"spiffe://{TD}/sync/other", other.spiffe_id)
        alias = admin.create_entry(
            f"spiffe://{TD}/groups/{agent.spiffe_id.rsplit('/', 1)[1]}", "", agent.selectors, node=True
        )
        via_alias = admin.create_entry(f"spiffe://{TD}/sync/via-alias", alias.spiffe_id)
    stub = agent.stub()
    full = stub.Sync(npb.SyncRequest())
    assert full.full is True and not full.next_page_token
    assert {e.id for e in full.entries} == {mine.id, via_alias.id}
    assert f"spiffe://{TD}" in full.bundles and full.bundles_revision > 0 and full.entries_revision > 0

    quiet = stub.Sync(npb.SyncRequest(entries_revision=full.entries_revision, bundles_revision=full.bundles_revision))
    assert quiet.full is False and not quiet.entries and not quiet.removed_entry_ids and not quiet.bundles
    assert quiet.entries_revision == full.entries_revision

    with server.admin() as admin:
        changed = npb.Entry()
        changed.CopyFrom(mine)
        changed.hint = "changed"
        admin.stub.UpdateEntry(apb.UpdateEntryRequest(entry=changed))
        admin.stub.DeleteEntry(apb.DeleteEntryRequest(id=via_alias.id))
        admin.create_entry(f"spiffe://{TD}/sync/other-2", other.spiffe_id)
    delta = stub.Sync(npb.SyncRequest(entries_revision=full.entries_revision, bundles_revision=full.bundles_revision))
    assert delta.full is False
    assert [(e.id, e.hint) for e in delta.entries] == [(mine.id, "changed")]
    assert list(delta.removed_entry_ids) == [via_alias.id]
    assert delta.entries_revision > full.entries_revision

    # Node alias membership changes force a full sync.
    with server.admin() as admin:
        admin.stub.DeleteEntry(apb.DeleteEntryRequest(id=alias.id))
    after_alias = stub.Sync(
        npb.SyncRequest(entries_revision=delta.entries_revision, bundles_revision=full.bundles_revision)
    )
    assert after_alias.full is True and {e.id for e in after_alias.entries} == {mine.id}


def test_sync_pages_a_large_first_sync(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> None:
    agent = joined(server)
    with server.admin() as admin:
        ids = {admin.create_entry(f"spiffe://{TD}/paged/{i}", agent.spiffe_id).id for i in range(7)}
    monkeypatch.setattr(node_module, "SYNC_PAGE_SIZE", 3)
    stub = agent.stub()
    seen: list[str] = []
    request = npb.SyncRequest()
    revisions = set()
    for _ in range(10):
        response = stub.Sync(request)
        assert response.full
        seen.extend(e.id for e in response.entries)
        revisions.add(response.entries_revision)
        if not response.next_page_token:
            break
        request = npb.SyncRequest(page_token=response.next_page_token)
    assert sorted(seen) == sorted(ids) and len(revisions) == 1
    assert code_of(lambda: stub.Sync(npb.SyncRequest(page_token="forged"))) == grpc.StatusCode.INVALID_ARGUMENT


def test_bundles_are_resent_when_the_bundles_revision_changes(server: RunningServer) -> None:
    agent = joined(server)
    first = agent.stub().Sync(npb.SyncRequest())
    with server.admin() as admin:
        admin.stub.SetFederatedBundle(
            apb.SetFederatedBundleRequest(id="spiffe://partner.test", data=pem_certs([HostPki.create("P").root]))
        )
    second = agent.stub().Sync(
        npb.SyncRequest(entries_revision=first.entries_revision, bundles_revision=first.bundles_revision)
    )
    assert second.bundles_revision > first.bundles_revision
    assert set(second.bundles) >= {f"spiffe://{TD}", "spiffe://partner.test"}
    with server.admin() as admin:
        admin.stub.DeleteFederatedBundle(apb.DeleteFederatedBundleRequest(id="spiffe://partner.test"))


# -------------------------------------------------------------------------------------------- signing


def _tls13_handshake(chain: list[x509.Certificate], key: object, bundle_pem: bytes) -> str:
    """Serves the SVID over TLS 1.3 and connects with VERIFY_X509_STRICT against the bundle; returns the version."""
    with tempfile.NamedTemporaryFile(suffix=".pem") as f:
        f.write(pem_certs(chain) + pem_key(key))
        f.flush()
        server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        server_ctx.load_cert_chain(f.name)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client_ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    client_ctx.check_hostname = False
    client_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    client_ctx.load_verify_locations(cadata=bundle_pem.decode())
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except BaseException as exc:  # reported by the client side
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    with client_ctx.wrap_socket(b) as c:
        version = c.version() or ""
        c.sendall(b"x")
    t.join(10)
    assert not errors
    return version


def test_batch_sign_uses_the_entry_never_the_csr(server: RunningServer) -> None:
    agent = joined(server)
    with server.admin() as admin:
        e1 = admin.create_entry(f"spiffe://{TD}/web", agent.spiffe_id, dns_names=["web.example.org"], x509_svid_ttl=600)
        e2 = admin.create_entry(f"spiffe://{TD}/db", agent.spiffe_id, ["unix:uid:2000"])
    k1, k2 = ec_key(), rsa.generate_private_key(public_exponent=65537, key_size=2048)
    response = agent.stub().BatchSignX509SVID(
        npb.BatchSignX509SVIDRequest(
            requests=[
                npb.X509SignRequest(entry_id=e1.id, csr=csr_der(k1, sans=[f"spiffe://{TD}/admin"])),
                npb.X509SignRequest(entry_id=e2.id, csr=csr_der(k2)),
            ]
        )
    )
    assert [r.entry_id for r in response.results] == [e1.id, e2.id]
    bundle_pem = server.bundle_pem()
    bundle = X509Bundle.parse_pem(TD, bundle_pem)
    for result, entry, key in zip(response.results, (e1, e2), (k1, k2), strict=True):
        chain = parse_der_certificates(result.cert_chain)
        sid, _ = verify_x509_svid(chain, bundle)
        assert str(sid) == entry.spiffe_id
        verifier = PolicyBuilder().store(Store(list(bundle.authorities))).build_client_verifier()
        verified = verifier.verify(chain[0], chain[1:])
        assert [str(s.value) for s in verified.subjects or []] == [entry.spiffe_id, *entry.dns_names]
        assert result.expires_at == int(chain[0].not_valid_after_utc.timestamp())
        assert _tls13_handshake(chain, key, bundle_pem) == "TLSv1.3"
    leaf1 = parse_der_certificates(response.results[0].cert_chain)[0]
    life = leaf1.not_valid_after_utc - leaf1.not_valid_before_utc
    assert dt.timedelta(seconds=600) <= life <= dt.timedelta(seconds=620)
    dns = leaf1.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(x509.DNSName)
    assert dns == ["web.example.org"]


def test_batch_sign_refusals(server: RunningServer) -> None:
    agent, other = joined(server), joined(server)
    with server.admin() as admin:
        mine = admin.create_entry(f"spiffe://{TD}/refusals/mine", agent.spiffe_id)
        theirs = admin.create_entry(f"spiffe://{TD}/refusals/theirs", other.spiffe_id)
    stub = agent.stub()

    def sign(*requests: npb.X509SignRequest) -> object:
        return lambda: stub.BatchSignX509SVID(npb.BatchSignX509SVIDRequest(requests=list(requests)))

    good = npb.X509SignRequest(entry_id=mine.id, csr=csr_der(ec_key()))
    assert code_of(sign(good, npb.X509SignRequest(entry_id=theirs.id, csr=csr_der(ec_key())))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    # Authorization is decided before the CSRs are judged: nothing is learnt about another agent's entries.
    assert code_of(sign(npb.X509SignRequest(entry_id=theirs.id, csr=b"garbage"))) == grpc.StatusCode.PERMISSION_DENIED
    assert code_of(sign(npb.X509SignRequest(entry_id="0f0e0d0c-no-such-entry", csr=csr_der(ec_key())))) == (
        grpc.StatusCode.NOT_FOUND
    )
    assert code_of(sign(*([good] * 501))) == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as info:
        sign(good, npb.X509SignRequest(entry_id=mine.id, csr=b"\x30\x82garbage"))()
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and mine.id in (info.value.details() or "")
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    for key in (weak, ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256K1())):
        assert (
            code_of(sign(npb.X509SignRequest(entry_id=mine.id, csr=csr_der(key)))) == grpc.StatusCode.INVALID_ARGUMENT
        )
    assert code_of(sign(npb.X509SignRequest(entry_id="", csr=csr_der(ec_key())))) == grpc.StatusCode.INVALID_ARGUMENT
    # A full batch of 500 is fine.
    assert len(stub.BatchSignX509SVID(npb.BatchSignX509SVIDRequest(requests=[good] * 500)).results) == 500


def test_mint_jwt_svid_for_an_authorized_entry(server: RunningServer) -> None:
    agent, other = joined(server), joined(server)
    with server.admin() as admin:
        mine = admin.create_entry(f"spiffe://{TD}/jwt/mine", agent.spiffe_id, jwt_svid_ttl=120)
        theirs = admin.create_entry(f"spiffe://{TD}/jwt/theirs", other.spiffe_id)
    stub = agent.stub()
    minted = stub.MintJWTSVID(npb.MintJWTSVIDRequest(entry_id=mine.id, audience=["svc-a", "svc-b"]))
    bundle = trust_bundle(agent.result)  # type: ignore[arg-type]
    svid = JwtSvid.parse_and_validate(minted.token, bundle.jwt_bundle(), ["svc-a"])
    assert str(svid.spiffe_id) == mine.spiffe_id and set(svid.audience) == {"svc-a", "svc-b"}
    assert 100 <= minted.expires_at - time.time() <= 121
    assert (
        code_of(lambda: stub.MintJWTSVID(npb.MintJWTSVIDRequest(entry_id=mine.id))) == grpc.StatusCode.INVALID_ARGUMENT
    )
    assert code_of(lambda: stub.MintJWTSVID(npb.MintJWTSVIDRequest(entry_id=theirs.id, audience=["a"]))) == (
        grpc.StatusCode.PERMISSION_DENIED
    )
    assert code_of(lambda: stub.MintJWTSVID(npb.MintJWTSVIDRequest(entry_id="missing", audience=["a"]))) == (
        grpc.StatusCode.NOT_FOUND
    )


def test_the_server_presents_its_own_svid_with_dns_and_ip_sans(server: RunningServer) -> None:
    pem = ssl.get_server_certificate(("127.0.0.1", server.port))
    leaf = x509.load_pem_x509_certificate(pem.encode())
    assert str(spiffe_id_from_certificate(leaf)) == f"spiffe://{TD}/tessera/server"
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    chain_ok = any(_issued_by(leaf, ca) for ca in _x509_bundle(server).authorities)
    assert chain_ok


def _issued_by(leaf: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        leaf.verify_directly_issued_by(ca)
    except Exception:
        return False
    return True


def test_the_daemon_survives_all_of_it(server: RunningServer) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    agent = joined(server)
    with grpc.secure_channel(
        server.address,
        grpc.ssl_channel_credentials(server.bundle_pem(), pem_key(agent.key), pem_certs(agent.chain)),
    ) as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_upstream_authority_end_to_end(tmp_path_factory: pytest.TempPathFactory) -> None:
    """With an upstream CA the bundle is the upstream root, and every chain runs through the server's intermediate."""
    from cryptography.hazmat.primitives import serialization

    data = tmp_path_factory.mktemp("upstream")
    upstream = HostPki.create("Upstream")
    (data / "up.pem").write_bytes(pem_certs([upstream.root]))
    (data / "up.key").write_bytes(pem_key(upstream.root_key))
    sock_dir = free_socket_dir()
    srv = RunningServer(
        make_config(
            data / "server",
            sock_dir / "api.sock",
            upstream_authority_cert=str(data / "up.pem"),
            upstream_authority_key=str(data / "up.key"),
        )
    )
    try:
        bundle = X509Bundle.parse_pem(TD, srv.bundle_pem())
        assert [c.public_bytes(serialization.Encoding.DER) for c in bundle.authorities] == [
            upstream.root.public_bytes(serialization.Encoding.DER)
        ]
        agent = joined(srv)
        assert len(agent.chain) == 2
        verify_x509_svid(agent.chain, bundle)
        with srv.admin() as admin:
            e = admin.create_entry(f"spiffe://{TD}/up/web", agent.spiffe_id)
        # mTLS with a chain (leaf + server intermediate) verified against the upstream root.
        response = agent.stub().BatchSignX509SVID(
            npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=e.id, csr=csr_der(ec_key()))])
        )
        chain = parse_der_certificates(response.results[0].cert_chain)
        assert len(chain) == 2 and chain[1].issuer == upstream.root.subject
        sid, _ = verify_x509_svid(chain, bundle)
        assert str(sid) == e.spiffe_id
    finally:
        srv.stop()
        cleanup(sock_dir)


def test_signing_follows_entry_changes_at_once(server: RunningServer) -> None:
    agent = joined(server)
    with server.admin() as admin:
        e = admin.create_entry(f"spiffe://{TD}/changing", agent.spiffe_id, dns_names=["one.example.org"])
    stub = agent.stub()

    def dns() -> list[str]:
        response = stub.BatchSignX509SVID(
            npb.BatchSignX509SVIDRequest(requests=[npb.X509SignRequest(entry_id=e.id, csr=csr_der(ec_key()))])
        )
        leaf = parse_der_certificates(response.results[0].cert_chain)[0]
        return leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.DNSName
        )

    assert dns() == ["one.example.org"]
    with server.admin() as admin:
        changed = npb.Entry()
        changed.CopyFrom(e)
        del changed.dns_names[:]
        changed.dns_names.append("two.example.org")
        admin.stub.UpdateEntry(apb.UpdateEntryRequest(entry=changed))
    assert dns() == ["two.example.org"]
    with server.admin() as admin:
        admin.stub.DeleteEntry(apb.DeleteEntryRequest(id=e.id))
    assert code_of(dns) == grpc.StatusCode.NOT_FOUND
