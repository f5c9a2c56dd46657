"""The one TLS context factory: every context the project builds gets its floor; a chain and key load from memory,
through a private temporary file where memfd or /proc is missing; the switching front hands each handshake
the current context and refuses cleanly when there is none."""

from __future__ import annotations

import logging
import os
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tessera.sdk.source import StaticX509Source
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import authorize_any, client_context, server_context
from tessera.sdk.tlscontext import build_context, switching_server_context
from tessera.server.api.tls_front import build_server_context
from tessera.server.federation.endpoint import svid_context, web_context
from tessera.server.federation.fetch import _spiffe_context, web_client_context


@pytest.fixture(scope="module")
def ca() -> TestCA:
    return TestCA("example.org")


def _peer_cert(server: ssl.SSLContext) -> bytes:
    """One handshake against ``server`` (no client certificate); the certificate the server presented."""
    listener = socket.create_server(("127.0.0.1", 0))

    def accept() -> None:
        raw, _ = listener.accept()
        raw.settimeout(10)
        try:
            with server.wrap_socket(raw, server_side=True) as tls:
                tls.recv(1)
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        client = build_context(False, verify_mode=ssl.CERT_NONE)
        with socket.create_connection(listener.getsockname(), timeout=10) as raw, client.wrap_socket(raw) as tls:
            der = tls.getpeercert(binary_form=True)
            assert der is not None
            return der
    finally:
        thread.join(20)
        listener.close()


def test_every_context_the_project_builds_has_the_floor(ca: TestCA, tmp_path: Path) -> None:
    svid = ca.issue_svid("/server")
    source = StaticX509Source(svid, ca.x509_bundle())
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_file.write_bytes(svid.chain_pem())
    key_file.write_bytes(svid.key_pem())
    contexts: dict[str, ssl.SSLContext] = {
        "sdk server_context front": server_context(source, authorize_any()),
        "sdk server_context inner": server_context(source, authorize_any())._tessera_rotating.current(),  # type: ignore[attr-defined]
        "sdk client_context front": client_context(source, authorize_any()),
        "sdk client_context inner": client_context(source, authorize_any()).current_context(),  # type: ignore[attr-defined]
        "node API": build_server_context(svid.cert_chain, svid.private_key, [ca.certificate]),
        "bundle endpoint https_spiffe": svid_context(svid.cert_chain, svid.private_key),
        "bundle endpoint https_web": web_context(cert_file, key_file),
        "federation https_spiffe client": _spiffe_context(ca.spiffe_bundle()),
        "federation https_web client": web_client_context(),
        "switching front": switching_server_context(lambda: svid_context(svid.cert_chain, svid.private_key)),
    }
    for name, ctx in contexts.items():
        assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2, name
        if ctx.protocol == ssl.PROTOCOL_TLS_SERVER:
            assert ctx.options & ssl.OP_NO_TICKET and ctx.num_tickets == 0, name
    assert contexts["federation https_web client"].check_hostname
    assert not contexts["federation https_spiffe client"].check_hostname  # the SPIFFE ID is checked instead


class _NoProc(ssl.SSLContext):
    """A context as on a host without /proc: the memory file's path cannot be opened."""

    def load_cert_chain(self, certfile: str, *args: object, **kwargs: object) -> None:  # type: ignore[override]
        if certfile.startswith("/proc/"):
            raise FileNotFoundError(certfile)
        super().load_cert_chain(certfile, *args, **kwargs)  # type: ignore[arg-type]


def _leftovers() -> set[str]:
    return {n for n in os.listdir(tempfile.gettempdir()) if n.startswith("tessera-tls-")}


@pytest.mark.parametrize(
    "setup",
    [
        lambda mp: None,
        lambda mp: mp.delattr(os, "memfd_create"),
    ],
    ids=["memfd", "no memfd"],
)
def test_chain_and_key_load_from_memory_with_a_private_fallback(
    ca: TestCA, monkeypatch: pytest.MonkeyPatch, setup: Callable[[pytest.MonkeyPatch], None]
) -> None:
    svid = ca.issue_svid("/server")
    before = _leftovers()
    setup(monkeypatch)
    for context_class in (ssl.SSLContext, _NoProc):
        ctx = build_context(
            True, chain=svid.cert_chain, key=svid.private_key, verify_mode=ssl.CERT_NONE, context_class=context_class
        )
        assert isinstance(ctx, context_class)
        assert _peer_cert(ctx) == svid.leaf.public_bytes(Encoding.DER)
    assert _leftovers() <= before  # the fallback's directory is gone with its file


def test_a_chain_needs_its_key_and_a_bad_one_is_an_ssl_error(ca: TestCA) -> None:
    svid = ca.issue_svid("/server")
    with pytest.raises(ValueError, match="private key"):
        build_context(True, chain=svid.cert_chain)
    other = ca.issue_svid("/other")
    with pytest.raises(ssl.SSLError):
        build_context(True, chain=svid.cert_chain, key=other.private_key)


def test_the_switching_front_serves_the_current_context_and_refuses_without_one(
    ca: TestCA, caplog: pytest.LogCaptureFixture
) -> None:
    first, second = ca.issue_svid("/one"), ca.issue_svid("/two")
    current: list[ssl.SSLContext] = [svid_context(first.cert_chain, first.private_key)]

    def pick() -> ssl.SSLContext:
        if not current:
            raise RuntimeError("no identity yet")
        return current[0]

    front = switching_server_context(pick, verify_mode=ssl.CERT_NONE)
    assert _peer_cert(front) == first.leaf.public_bytes(Encoding.DER)
    current[0] = svid_context(second.cert_chain, second.private_key)
    assert _peer_cert(front) == second.leaf.public_bytes(Encoding.DER)
    current.clear()
    with caplog.at_level(logging.ERROR, logger="tessera.sdk.tlscontext"), pytest.raises(ssl.SSLError):
        _peer_cert(front)
    assert any("no usable TLS identity" in r.getMessage() for r in caplog.records)
