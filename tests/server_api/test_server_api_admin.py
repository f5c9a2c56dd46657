"""The admin API over its Unix socket: every RPC, its bad inputs and status codes, CA rotation, restart."""

from __future__ import annotations

import json
import ssl
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from server_api_support import (
    TD,
    Agent,
    HostPki,
    RunningServer,
    cleanup,
    code_of,
    free_socket_dir,
    make_config,
    pem_certs,
    running_server,
)

from tessera.proto import admin_pb2 as apb
from tessera.proto import node_pb2 as npb
from tessera.sdk.bundle import SpiffeBundle, X509Bundle
from tessera.sdk.testing import TestCA


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with running_server(tmp_path_factory.mktemp("admin-api") / "server") as srv:
        yield srv


def entry(spiffe_id: str, parent_id: str, *selectors: str, **kw: object) -> npb.Entry:
    sels = [npb.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1]) for s in selectors]
    return npb.Entry(spiffe_id=spiffe_id, parent_id=parent_id, selectors=sels, **kw)  # type: ignore[arg-type]


PARENT = f"spiffe://{TD}/tessera/agent/join_token/some-agent"


def test_admin_socket_directory_is_private_and_healthy(server: RunningServer) -> None:
    sock = server.config.socket_path
    assert sock.parent.stat().st_mode & 0o777 == 0o700
    with grpc.insecure_channel(f"unix:{sock}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_entry_lifecycle_and_listing(server: RunningServer) -> None:
    with server.admin() as admin:
        stub = admin.stub
        created = [
            stub.CreateEntry(
                apb.CreateEntryRequest(entry=entry(f"spiffe://{TD}/list/{i}", PARENT, f"unix:uid:{i}"))
            ).entry
            for i in range(5)
        ]
        assert all(e.id and e.revision and e.created_at for e in created)
        got = stub.GetEntry(apb.GetEntryRequest(id=created[0].id)).entry
        assert got == created[0]
        by_selector = stub.ListEntries(
            apb.ListEntriesRequest(selectors=[npb.Selector(type="unix", value="uid:3")], parent_id=PARENT)
        ).entries
        assert [e.id for e in by_selector] == [created[3].id]
        pages, token = [], ""
        while True:
            page = stub.ListEntries(apb.ListEntriesRequest(parent_id=PARENT, page_size=2, page_token=token))
            pages.append(len(page.entries))
            token = page.next_page_token
            if not token:
                break
        assert sum(pages) == 5 and max(pages) == 2
        changed = npb.Entry()
        changed.CopyFrom(created[1])
        changed.x509_svid_ttl = 300
        changed.dns_names.append("svc.example.org")
        updated = stub.UpdateEntry(apb.UpdateEntryRequest(entry=changed)).entry
        assert updated.revision > created[1].revision and updated.x509_svid_ttl == 300
        stub.DeleteEntry(apb.DeleteEntryRequest(id=created[2].id))
        assert code_of(lambda: stub.GetEntry(apb.GetEntryRequest(id=created[2].id))) == grpc.StatusCode.NOT_FOUND


def test_node_alias_entries_are_parented_to_the_server(server: RunningServer) -> None:
    with server.admin() as admin:
        alias = admin.stub.CreateEntry(
            apb.CreateEntryRequest(entry=entry(f"spiffe://{TD}/groups/web", "", "x509pop:subject:cn:web", node=True))
        ).entry
    assert alias.node and alias.parent_id == f"spiffe://{TD}/tessera/server"


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (entry("not-a-spiffe-id", PARENT, "unix:uid:1"), grpc.StatusCode.INVALID_ARGUMENT),
        (entry(f"spiffe://{TD}/UPPER//x", PARENT, "unix:uid:1"), grpc.StatusCode.INVALID_ARGUMENT),
        (entry("spiffe://other.org/w", PARENT, "unix:uid:1"), grpc.StatusCode.INVALID_ARGUMENT),
        (entry(f"spiffe://{TD}/w", "", "unix:uid:1"), grpc.StatusCode.INVALID_ARGUMENT),
        (entry(f"spiffe://{TD}/w", PARENT), grpc.StatusCode.INVALID_ARGUMENT),
        (
            npb.Entry(spiffe_id=f"spiffe://{TD}/w", parent_id=PARENT, selectors=[npb.Selector(type="unix", value="")]),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (entry(f"spiffe://{TD}/w", PARENT, "unix:uid:1", x509_svid_ttl=-5), grpc.StatusCode.INVALID_ARGUMENT),
        (entry(f"spiffe://{TD}/w", PARENT, "unix:uid:1", dns_names=["bad name!"]), grpc.StatusCode.INVALID_ARGUMENT),
        (entry(f"spiffe://{TD}/tessera/server", PARENT, "unix:uid:1"), grpc.StatusCode.INVALID_ARGUMENT),
        (entry(f"spiffe://{TD}/w", PARENT, "unix:uid:1", id="chosen-id"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_create_entry_refuses_bad_input(server: RunningServer, bad: npb.Entry, code: grpc.StatusCode) -> None:
    with server.admin() as admin, pytest.raises(grpc.RpcError) as info:
        admin.stub.CreateEntry(apb.CreateEntryRequest(entry=bad))
    assert info.value.code() == code and info.value.details()


def test_duplicates_and_unknown_ids(server: RunningServer) -> None:
    with server.admin() as admin:
        stub = admin.stub
        e = entry(f"spiffe://{TD}/dup", PARENT, "unix:uid:7")
        stub.CreateEntry(apb.CreateEntryRequest(entry=e))
        assert code_of(lambda: stub.CreateEntry(apb.CreateEntryRequest(entry=e))) == grpc.StatusCode.ALREADY_EXISTS
        missing = entry(f"spiffe://{TD}/x", PARENT, "unix:uid:1", id="0b9f6a55-0000-4000-8000-000000000000")
        assert code_of(lambda: stub.UpdateEntry(apb.UpdateEntryRequest(entry=missing))) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: stub.UpdateEntry(apb.UpdateEntryRequest(entry=npb.Entry()))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert code_of(lambda: stub.DeleteEntry(apb.DeleteEntryRequest(id=missing.id))) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: stub.DeleteEntry(apb.DeleteEntryRequest())) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(lambda: stub.GetEntry(apb.GetEntryRequest(id="nope"))) == grpc.StatusCode.NOT_FOUND
        assert code_of(lambda: stub.ListEntries(apb.ListEntriesRequest(spiffe_id="http://x"))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert code_of(lambda: stub.ListEntries(apb.ListEntriesRequest(page_token="garbage"))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )
        assert code_of(lambda: stub.ListEntries(apb.ListEntriesRequest(page_size=-1))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )


def test_agent_commands_refuse_bad_ids(server: RunningServer) -> None:
    with server.admin() as admin:
        stub = admin.stub
        for call in (stub.GetAgent, stub.EvictAgent, stub.BanAgent):
            request_type = {stub.GetAgent: apb.GetAgentRequest, stub.EvictAgent: apb.EvictAgentRequest}.get(
                call, apb.BanAgentRequest
            )
            assert code_of(lambda c=call, r=request_type: c(r(spiffe_id="garbage"))) == grpc.StatusCode.INVALID_ARGUMENT
            assert code_of(lambda c=call, r=request_type: c(r(spiffe_id=f"spiffe://{TD}/nobody"))) == (
                grpc.StatusCode.NOT_FOUND
            )
        assert stub.ListAgents(apb.ListAgentsRequest()).agents is not None


def test_join_token_requests_are_checked(server: RunningServer) -> None:
    with server.admin() as admin:
        stub = admin.stub
        for bad in (
            apb.CreateJoinTokenRequest(ttl=-1),
            apb.CreateJoinTokenRequest(ttl=10**9),
            apb.CreateJoinTokenRequest(spiffe_id="nope"),
            apb.CreateJoinTokenRequest(spiffe_id="spiffe://other.org/agent"),
            apb.CreateJoinTokenRequest(spiffe_id=f"spiffe://{TD}"),
            apb.CreateJoinTokenRequest(spiffe_id=f"spiffe://{TD}/tessera/server"),
        ):
            assert code_of(lambda b=bad: stub.CreateJoinToken(b)) == grpc.StatusCode.INVALID_ARGUMENT
        token = stub.CreateJoinToken(apb.CreateJoinTokenRequest(ttl=60))
        assert len(token.token) >= 32 and token.id and token.id not in token.token


def test_bundles(server: RunningServer) -> None:
    with server.admin() as admin:
        stub = admin.stub
        pem = stub.GetBundle(apb.GetBundleRequest()).data
        own = X509Bundle.parse_pem(TD, pem)
        doc = stub.GetBundle(apb.GetBundleRequest(format=apb.BundleFormat.BUNDLE_FORMAT_SPIFFE)).data
        spiffe = SpiffeBundle.from_document(TD, doc)
        assert set(spiffe.x509_authorities) == set(own.authorities) and spiffe.jwt_authorities
        assert json.loads(doc)["keys"]

        partner = TestCA("partner.test")
        set_doc = stub.SetFederatedBundle(
            apb.SetFederatedBundleRequest(
                id="spiffe://partner.test",
                data=partner.spiffe_bundle().to_document(),
                format=apb.BundleFormat.BUNDLE_FORMAT_SPIFFE,
            )
        ).bundle
        assert set_doc.trust_domain == "partner.test" and set_doc.x509_authorities == 1 and set_doc.jwt_authorities == 1
        pem_set = stub.SetFederatedBundle(
            apb.SetFederatedBundleRequest(id="spiffe://pem.test", data=pem_certs([HostPki.create().root]))
        ).bundle
        assert pem_set.x509_authorities == 1
        listed = {b.trust_domain for b in stub.ListFederatedBundles(apb.ListFederatedBundlesRequest()).bundles}
        assert listed == {"partner.test", "pem.test"}
        stub.DeleteFederatedBundle(apb.DeleteFederatedBundleRequest(id="spiffe://pem.test"))
        for bad in (
            apb.SetFederatedBundleRequest(id="spiffe://x.test", data=b"not a bundle"),
            apb.SetFederatedBundleRequest(
                id="spiffe://x.test", data=b"{}", format=apb.BundleFormat.BUNDLE_FORMAT_SPIFFE
            ),
            apb.SetFederatedBundleRequest(id="spiffe://x.test"),
            apb.SetFederatedBundleRequest(id="https://x.test", data=pem),
            apb.SetFederatedBundleRequest(id=f"spiffe://{TD}", data=pem),
        ):
            assert code_of(lambda b=bad: stub.SetFederatedBundle(b)) == grpc.StatusCode.INVALID_ARGUMENT
        assert code_of(
            lambda: stub.DeleteFederatedBundle(apb.DeleteFederatedBundleRequest(id="spiffe://gone.test"))
        ) == (grpc.StatusCode.NOT_FOUND)
        assert code_of(lambda: stub.DeleteFederatedBundle(apb.DeleteFederatedBundleRequest(id=f"spiffe://{TD}"))) == (
            grpc.StatusCode.INVALID_ARGUMENT
        )


def _server_ca_key_id(port: int) -> str:
    leaf = x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port)).encode())
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki is not None
    return aki.hex()


def test_forced_ca_rotation_reaches_the_bundle_and_the_tls_listener(tmp_path: Path) -> None:
    sock_dir = free_socket_dir()
    srv = RunningServer(make_config(tmp_path / "server", sock_dir / "api.sock"))
    try:
        with srv.admin() as admin:
            stub = admin.stub
            slots = stub.GetCA(apb.GetCARequest()).slots
            assert {(s.kind, s.state) for s in slots} == {("x509", "active"), ("jwt", "active")}
            old_active = next(s.key_id for s in slots if s.kind == "x509")
            assert _server_ca_key_id(srv.port) == old_active
            assert code_of(lambda: stub.ActivateCA(apb.ActivateCARequest())) == grpc.StatusCode.FAILED_PRECONDITION
            prepared = stub.PrepareCA(apb.PrepareCARequest()).slots
            new_id = next(s.key_id for s in prepared if s.kind == "x509" and s.state == "prepared")
            assert len(X509Bundle.parse_pem(TD, srv.bundle_pem())) == 2
            agent = Agent(srv)
            agent.attest_join_token(admin.token().token)
            activated = stub.ActivateCA(apb.ActivateCARequest()).slots
            assert {(s.key_id, s.state) for s in activated if s.kind == "x509"} == {
                (old_active, "old"),
                (new_id, "active"),
            }
            assert _server_ca_key_id(srv.port) == new_id
            # The agent's SVID from the old CA still works while that CA is in the bundle.
            agent.stub().Sync(npb.SyncRequest())
    finally:
        srv.stop()
        cleanup(sock_dir)


def test_restart_loses_nothing_and_rotates_nothing(tmp_path: Path) -> None:
    data = tmp_path / "server"
    sock_dir = free_socket_dir()
    config = make_config(data, sock_dir / "api.sock")
    srv = RunningServer(config)
    try:
        with srv.admin() as admin:
            agent = Agent(srv)
            agent.attest_join_token(admin.token().token)
            created = admin.create_entry(f"spiffe://{TD}/kept", agent.spiffe_id)
            spare_token = admin.token().token
            slots_before = {(s.kind, s.key_id, s.state) for s in admin.stub.GetCA(apb.GetCARequest()).slots}
            bundle_before = srv.bundle_pem()
    finally:
        srv.stop()
    srv = RunningServer(config)
    try:
        with srv.admin() as admin:
            assert {(s.kind, s.key_id, s.state) for s in admin.stub.GetCA(apb.GetCARequest()).slots} == slots_before
            assert srv.bundle_pem() == bundle_before
            assert admin.stub.GetEntry(apb.GetEntryRequest(id=created.id)).entry == created
            assert admin.stub.GetAgent(apb.GetAgentRequest(spiffe_id=agent.spiffe_id)).agent.serial
        agent.server = srv  # same agent, same SVID, the restarted server (on a new port)
        agent.reset_channel()
        synced = agent.stub().Sync(npb.SyncRequest())  # the agent SVID from before the restart still works
        assert [e.id for e in synced.entries] == [created.id]
        Agent(srv).attest_join_token(spare_token)
    finally:
        srv.stop()
        cleanup(sock_dir)


def test_reflection_lists_the_services(server: RunningServer) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(f"unix:{server.config.socket_path}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
    assert {"tessera.admin.v1.Admin", "grpc.health.v1.Health"} <= names


def test_a_second_server_on_the_same_socket_is_refused(server: RunningServer, tmp_path: Path) -> None:
    from tessera.server.app import StartupError

    with pytest.raises(StartupError, match="in use"):
        RunningServer(make_config(tmp_path / "second", server.config.socket_path))
    with grpc.insecure_channel(f"unix:{server.config.socket_path}") as channel:  # the first one is unharmed
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status
    assert status == health_pb2.HealthCheckResponse.SERVING


def test_health_follows_the_upkeep(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    from tessera.server import app as app_module

    monkeypatch.setattr(app_module, "MAX_MAINTENANCE_FAILURES", 2)
    sock = free_socket_dir()
    srv = RunningServer(make_config(tmp_path / "server", sock / "api.sock"))

    def status() -> int:
        with grpc.insecure_channel(f"unix:{srv.config.socket_path}") as channel:
            return int(health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status)

    def wait_for(expected: int) -> None:
        deadline = time.monotonic() + 30
        while status() != expected:
            assert time.monotonic() < deadline, f"health never became {expected}"
            time.sleep(0.1)

    try:
        wait_for(health_pb2.HealthCheckResponse.SERVING)
        real = srv.app._maintenance_step

        def failing(force_svid: bool = False) -> None:
            raise RuntimeError("datastore on fire")

        srv.app._maintenance_step = failing  # type: ignore[method-assign]
        wait_for(health_pb2.HealthCheckResponse.NOT_SERVING)
        srv.app._maintenance_step = real  # type: ignore[method-assign]
        wait_for(health_pb2.HealthCheckResponse.SERVING)
    finally:
        srv.stop()
        cleanup(sock)
