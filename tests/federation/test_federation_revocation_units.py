"""Revocation where workloads meet it: SDK TLS contexts refusing CRL-listed peers, the agent re-issuing revoked
SVIDs, and tessera-helper's CRL file."""

from __future__ import annotations

import datetime as dt
import socket
import ssl
import threading
import time
from pathlib import Path

import pytest

from tessera.agent.cache import EntryRecord, WorkloadCache, make_cached_svid
from tessera.agent.sync import _revoked_serials
from tessera.sdk.bundle import BundleSet
from tessera.sdk.helper.config import load_config
from tessera.sdk.source import X509Snapshot
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import authorize_any, client_context, server_context
from tessera.server.ca.crl import RevokedSerial, build_crl, crl_der

TD = "a.test"


class FixedSource:
    def __init__(self, snapshot: X509Snapshot) -> None:
        self._snapshot = snapshot

    def snapshot(self) -> X509Snapshot:
        return self._snapshot


def crl_for(ca: TestCA, *serials: int) -> bytes:
    now = dt.datetime.now(dt.UTC)
    return crl_der(
        build_crl(
            issuer_cert=ca.certificate, issuer_key=ca.key, revoked=[RevokedSerial(s, now) for s in serials], now=now
        )
    )


def handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str:
    """Runs one mTLS exchange; returns "ok" or the server-side failure."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    result: list[str] = []

    def accept() -> None:
        raw, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(raw, server_side=True) as tls:
                tls.sendall(b"ok")
                result.append("ok")
        except (OSError, ssl.SSLError) as exc:
            result.append(str(exc))

    t = threading.Thread(target=accept)
    t.start()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, client_ctx.wrap_socket(raw) as tls:
            tls.recv(2)
    except (OSError, ssl.SSLError):
        pass
    t.join(10)
    listener.close()
    return result[0] if result else "no result"


def test_sdk_server_context_refuses_a_client_on_its_crl() -> None:
    ca = TestCA(TD)
    server_svid = ca.issue_svid("/server")
    good, bad = ca.issue_svid("/good"), ca.issue_svid("/bad")
    bundles = BundleSet([ca.x509_bundle()])
    crls = (crl_for(ca, bad.leaf.serial_number),)
    server = server_context(FixedSource(X509Snapshot(server_svid, bundles, (server_svid,), crls)), authorize_any())

    def client_for(svid: object) -> ssl.SSLContext:
        return client_context(FixedSource(X509Snapshot(svid, bundles, (svid,))), authorize_any())  # type: ignore[arg-type]

    assert handshake(server, client_for(good)) == "ok"
    refused = handshake(server, client_for(bad))
    assert "revoked" in refused and format(bad.leaf.serial_number, "x") in refused
    # A CRL from a key that is not the issuer's is ignored: nobody can cut peers off with a forged list.
    forged = TestCA(TD)
    fake = crl_der(
        build_crl(
            issuer_cert=ca.certificate,
            issuer_key=forged.key,
            revoked=[RevokedSerial(good.leaf.serial_number, dt.datetime.now(dt.UTC))],
            now=dt.datetime.now(dt.UTC),
        )
    )
    lenient = server_context(FixedSource(X509Snapshot(server_svid, bundles, (server_svid,), (fake,))), authorize_any())
    assert handshake(lenient, client_for(good)) == "ok"


def test_agent_reissues_svids_on_the_crl_once() -> None:
    ca = TestCA(TD)
    now = [time.time()]
    cache = WorkloadCache(ca.trust_domain.id_string, clock=lambda: now[0])
    entries = [
        EntryRecord(id=f"e{i}", spiffe_id=f"spiffe://{TD}/w{i}", selectors=frozenset({"unix:uid:0"})) for i in range(2)
    ]
    cache.apply_entries(entries)
    svids = [ca.issue_svid(e.spiffe_id) for e in entries]
    cache.put_svids(make_cached_svid(e, s.cert_chain, s.key_der()) for e, s in zip(entries, svids, strict=True))
    revoked = _revoked_serials([crl_for(ca, svids[0].leaf.serial_number)])
    assert revoked == {svids[0].leaf.serial_number}
    assert cache.rotate_revoked(revoked) == 1
    assert cache.svids["e0"].rotate_at == 0.0 and cache.svids["e1"].rotate_at > 0
    assert cache.rotate_revoked(revoked) == 0  # already due: not counted twice
    assert _revoked_serials([b"garbage"]) == set()


def test_helper_crl_file_name_setting(tmp_path: Path) -> None:
    cfg = load_config(["--cert-dir", str(tmp_path), "--crl-file-name", "crl.pem"], environ={})
    assert cfg.crl_file_name == "crl.pem"
    assert load_config(["--cert-dir", str(tmp_path)], environ={}).crl_file_name is None
    with pytest.raises(Exception, match="crl_file_name"):
        load_config(["--cert-dir", str(tmp_path), "--crl-file-name", "../x.pem"], environ={})


def test_grpc_interceptor_with_a_source_refuses_a_revoked_caller() -> None:
    from concurrent import futures

    import grpc

    from tessera.sdk.grpc import SpiffeChannel, SpiffeServerInterceptor, server_credentials
    from tessera.sdk.source import StaticX509Source

    ca = TestCA(TD)
    server_svid = ca.issue_svid("/server", dns_names=["server.local"])
    good, bad = ca.issue_svid("/good"), ca.issue_svid("/bad")
    bundles = BundleSet([ca.x509_bundle()])
    source = FixedSource(X509Snapshot(server_svid, bundles, (server_svid,), (crl_for(ca, bad.leaf.serial_number),)))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4), interceptors=[SpiffeServerInterceptor(authorize_any(), source)]
    )
    echo = grpc.unary_unary_rpc_method_handler(lambda request, context: request)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Unary": echo}),))
    port = server.add_secure_port("127.0.0.1:0", server_credentials(source))
    server.start()
    try:
        with SpiffeChannel(f"127.0.0.1:{port}", StaticX509Source(good, bundles), server_name="server.local") as ch:
            assert ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=10) == b"hi"
        with SpiffeChannel(f"127.0.0.1:{port}", StaticX509Source(bad, bundles), server_name="server.local") as ch:
            with pytest.raises(grpc.RpcError) as err:
                ch.unary_unary("/test.Echo/Unary")(b"hi", timeout=10)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "revoked" in (err.value.details() or "")
    finally:
        server.stop(0)
