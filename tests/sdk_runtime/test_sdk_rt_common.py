"""Pure pieces of the Workload API client (response decoding, backoff, addresses) and a concurrency check of
TLS context rotation under many simultaneous handshakes."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import pytest

from tessera.proto import workload_pb2 as pb
from tessera.sdk.errors import WorkloadApiError
from tessera.sdk.source import StaticX509Source
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import authorize_id, client_context, peer_spiffe_id, server_context
from tessera.sdk.workloadapi.common import (
    BackoffPolicy,
    WorkloadApiResponseError,
    decode_jwt_bundles_response,
    decode_x509_bundles_response,
    decode_x509_svid_response,
    resolve_address,
)


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


def _response(ca: TestCA, spiffe_id: str = "spiffe://example.org/web") -> pb.X509SVIDResponse:
    svid = ca.issue_svid(spiffe_id)
    resp = pb.X509SVIDResponse()
    resp.svids.add(spiffe_id=spiffe_id, x509_svid=svid.chain_der(), x509_svid_key=svid.key_der(),
                   bundle=ca.x509_bundle().der())
    return resp


def test_decode_x509_response_rules(ca: TestCA) -> None:
    ctx = decode_x509_svid_response(_response(ca))
    assert ctx.default_svid.spiffe_id == SpiffeId.parse("spiffe://example.org/web")
    with pytest.raises(WorkloadApiResponseError, match="no SVIDs"):
        decode_x509_svid_response(pb.X509SVIDResponse())
    lying = _response(ca)
    lying.svids[0].spiffe_id = "spiffe://example.org/other"
    with pytest.raises(WorkloadApiResponseError, match="certificate is for"):
        decode_x509_svid_response(lying)
    empty_bundle = _response(ca)
    empty_bundle.svids[0].bundle = b""
    with pytest.raises(WorkloadApiResponseError, match="empty bundle"):
        decode_x509_svid_response(empty_bundle)
    pem_not_der = _response(ca)
    pem_not_der.svids[0].x509_svid = ca.issue_svid("/web").chain_pem()
    with pytest.raises(WorkloadApiResponseError, match="invalid SVID"):
        decode_x509_svid_response(pem_not_der)
    bad_key = _response(ca)
    bad_key.federated_bundles["not a trust domain!"] = ca.x509_bundle().der()
    with pytest.raises(WorkloadApiResponseError, match="not a trust domain"):
        decode_x509_svid_response(bad_key)
    with pytest.raises(WorkloadApiResponseError, match="no bundles"):
        decode_x509_bundles_response(pb.X509BundlesResponse())
    with pytest.raises(WorkloadApiResponseError, match=r"JWT bundle for example\.org is invalid"):
        decode_jwt_bundles_response(pb.JWTBundlesResponse(bundles={"spiffe://example.org": b"{not json"}))


def test_backoff_grows_caps_jitters_and_resets() -> None:
    policy = BackoffPolicy(initial=1.0, maximum=8.0, multiplier=2.0, jitter=0.25)
    mid = policy.start(rng=lambda: 0.5)
    assert [mid.next_delay() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    mid.reset()
    assert mid.next_delay() == 1.0
    low, high = policy.start(rng=lambda: 0.0), policy.start(rng=lambda: 0.999999)
    assert low.next_delay() == 0.75 and 1.24 < high.next_delay() <= 1.25
    with pytest.raises(ValueError):
        BackoffPolicy(initial=0)
    with pytest.raises(ValueError):
        BackoffPolicy(initial=2, maximum=1)


def test_resolve_address(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_address("unix:///run/a.sock") == ("unix:///run/a.sock", "unix:/run/a.sock")
    assert resolve_address("unix:/run/a.sock")[1] == "unix:/run/a.sock"
    monkeypatch.setenv("SPIFFE_ENDPOINT_SOCKET", "unix:///env.sock")
    assert resolve_address(None)[1] == "unix:/env.sock"
    with pytest.raises(WorkloadApiError, match="must be unix"):
        resolve_address("http://x")


def test_rotation_during_concurrent_handshakes_never_breaks_a_connection(ca: TestCA) -> None:
    """Fresh inner contexts are swapped in while handshakes run on several threads: nothing crashes and every
    connection gets a peer authorized under one consistent snapshot."""
    server_src = StaticX509Source(ca.issue_svid("/server"), ca.x509_bundle())
    client_src = StaticX509Source(ca.issue_svid("/client"), ca.x509_bundle())
    sctx = server_context(server_src, authorize_id("spiffe://example.org/client"))
    cctx = client_context(client_src, authorize_id("spiffe://example.org/server"))
    listener = socket.create_server(("127.0.0.1", 0), backlog=64)
    port = listener.getsockname()[1]
    stop = threading.Event()
    failures: list[BaseException] = []
    done = [0]

    def serve() -> None:
        while True:  # until the listener is closed, after every client has finished
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=handle, args=(conn,), daemon=True).start()

    def handle(conn: socket.socket) -> None:
        try:
            with sctx.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(str(peer_spiffe_id(tls)).encode())
        except (OSError, ssl.SSLError) as exc:
            failures.append(exc)

    def client() -> None:
        while not stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, cctx.wrap_socket(raw) as tls:
                    assert tls.recv(100) == b"spiffe://example.org/client"
                done[0] += 1
            except BaseException as exc:
                failures.append(exc)
                return

    threading.Thread(target=serve, daemon=True).start()
    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    rotations = 0
    deadline = time.monotonic() + 60
    while (done[0] < 40 or rotations < 20) and not failures and time.monotonic() < deadline:
        server_src.set(ca.issue_svid("/server"))
        client_src.set(ca.issue_svid("/client"))
        rotations += 1
    stop.set()
    for t in clients:
        t.join(30)
    listener.close()
    assert failures == []
    assert done[0] >= 40 and rotations >= 20
