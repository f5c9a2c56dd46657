"""Several servers sharing one datastore: one trust bundle holding every server's authorities."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import grpc
from cryptography import x509
from server_api_support import TD, Agent, RunningServer, cleanup, free_socket_dir, make_config
from support.procs import wait_for

from tessera.proto import admin_pb2 as apb
from tessera.proto import node_pb2 as npb
from tessera.sdk.bundle import SpiffeBundle, X509Bundle
from tessera.sdk.keys import generate_key
from tessera.sdk.verify import verify_x509_svid
from tessera.server.api.publisher import _jwt_id, _x509_id, merge


def active_ca(server: RunningServer) -> str:
    with server.admin() as admin:
        slots = admin.stub.GetCA(apb.GetCARequest()).slots
    return next(s.key_id for s in slots if s.kind == "x509" and s.state == "active")


def bundle_key_ids(server: RunningServer) -> set[str]:
    bundle = X509Bundle.parse_pem(TD, server.bundle_pem())
    return {
        c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex() for c in bundle.authorities
    }


def test_two_servers_share_one_bundle_and_serve_each_others_agents(tmp_path: Path) -> None:
    shared = f"sqlite:///{tmp_path / 'shared.sqlite3'}"
    socks = [free_socket_dir(), free_socket_dir()]
    a = RunningServer(make_config(tmp_path / "a", socks[0] / "api.sock", datastore=shared))
    b = RunningServer(make_config(tmp_path / "b", socks[1] / "api.sock", datastore=shared))
    try:
        ca_a, ca_b = active_ca(a), active_ca(b)
        assert ca_a != ca_b
        for server in (a, b):
            wait_for(lambda s=server: bundle_key_ids(s) >= {ca_a, ca_b}, 30, "both CAs in the bundle")

        agent = Agent(a)
        with a.admin() as admin:
            agent.attest_join_token(admin.token().token)
        with b.admin() as admin:
            entry = admin.create_entry(f"spiffe://{TD}/ha/web", agent.spiffe_id)
        # The agent attested at A talks to B: B's TLS listener trusts A's CA, B's store knows the agent.
        agent.server = b
        agent.reset_channel()

        def synced_at_b() -> bool:
            try:
                return [e.id for e in agent.stub().Sync(npb.SyncRequest(), timeout=10).entries] == [entry.id]
            except grpc.RpcError:
                agent.reset_channel()
                return False

        wait_for(synced_at_b, 30, "server B to accept an agent attested at A")
        verify_x509_svid(agent.chain, X509Bundle.parse_pem(TD, b.bundle_pem()))

        # A rotates: its new CA joins the bundle, B's stays.
        with a.admin() as admin:
            admin.stub.PrepareCA(apb.PrepareCARequest())
            admin.stub.ActivateCA(apb.ActivateCARequest())
        new_a = active_ca(a)
        wait_for(lambda: bundle_key_ids(b) >= {ca_a, new_a, ca_b}, 30, "A's rotation to reach B")
    finally:
        a.stop()
        b.stop()
        for s in socks:
            cleanup(s)


def _ca(now: dt.datetime, days: float) -> x509.Certificate:
    from tessera.sdk.x509profile import build_ca_certificate

    key = generate_key()
    return build_ca_certificate(
        subject_key=key,
        issuer_cert=None,
        issuer_key=key,
        trust_domain=TD,
        not_before=now - dt.timedelta(days=1),
        not_after=now + dt.timedelta(days=days),
    )


def test_merge_keeps_others_drops_retired_and_expired() -> None:
    now = dt.datetime.now(dt.UTC)
    mine_ca, others_ca, old_mine, expiring = _ca(now, 1), _ca(now, 1), _ca(now, 1), _ca(now, 0.5)
    jwt_mine, jwt_other = generate_key(), generate_key()
    mine = SpiffeBundle(TD, (mine_ca,), {"m": jwt_mine.public_key()}, sequence=3)
    stored = SpiffeBundle(
        TD,
        (old_mine, others_ca, expiring),
        {"old": generate_key().public_key(), "o": jwt_other.public_key()},
        sequence=7,
    )
    merged = merge(mine, stored, {_x509_id(old_mine), _jwt_id("old")}, now + dt.timedelta(days=0.75))
    assert list(merged.x509_authorities) == [mine_ca, others_ca]
    assert set(merged.jwt_authorities) == {"m", "o"}
    assert merged.sequence == 8
    first = merge(mine, None, set(), now)
    assert list(first.x509_authorities) == [mine_ca] and first.sequence == 3


def test_restart_does_not_duplicate_or_lose_authorities(tmp_path: Path) -> None:
    sock = free_socket_dir()
    config = make_config(tmp_path / "s", sock / "api.sock")
    try:
        for _ in range(2):
            srv = RunningServer(config)
            try:
                assert len(X509Bundle.parse_pem(TD, srv.bundle_pem())) == 1
            finally:
                srv.stop()
        assert (tmp_path / "s" / "published_authorities.json").stat().st_mode & 0o777 == 0o600
    finally:
        cleanup(sock)
