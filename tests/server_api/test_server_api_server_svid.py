"""The server's own TLS SVID comes from the CA's one signing path, like every SVID it issues."""

from __future__ import annotations

import ipaddress
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from server_api_support import AdminClient, free_socket_dir, make_config, running_server
from support.inproc import RunningServer, cleanup

from tessera.proto import admin_pb2 as apb
from tessera.server.app import StartupError
from tessera.server.ca.signing import ServerCa


def _presented_leaf(port: int) -> x509.Certificate:
    """The certificate the node API presents to a client without one (which may still attest)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_server_svid_is_signed_by_the_ca_and_follows_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    signed: list[list[x509.Certificate]] = []
    sign = ServerCa.sign_x509_svid

    def recording(self: ServerCa, *args: Any, **kwargs: Any) -> list[x509.Certificate]:
        chain = sign(self, *args, **kwargs)
        signed.append(chain)
        return chain

    monkeypatch.setattr(ServerCa, "sign_x509_svid", recording)
    with running_server(tmp_path / "server", dns_names="tessera.example.org") as srv:
        svid = srv.app.server_svid
        assert list(svid.chain) == signed[-1]
        leaf = svid.leaf
        active = srv.app.ca_manager.active_x509_authority
        assert active is not None
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki == bytes.fromhex(active.authority_id)
        # The CA's backdate and the configured life, not a hand-made notBefore.
        backdate = srv.app.ca_manager.config.backdate.total_seconds()
        life = (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds()
        assert life == srv.config.default_x509_svid_ttl + backdate
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org/tessera/server"]
        assert san.get_values_for_type(x509.DNSName) == ["tessera.example.org"]
        assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
        assert _presented_leaf(srv.port) == leaf

        # A forced rotation renews it at once through the same path, signed by the new CA.
        with AdminClient(str(srv.config.socket_path)) as admin:
            admin.stub.PrepareCA(apb.PrepareCARequest())
            admin.stub.ActivateCA(apb.ActivateCARequest())
        renewed = srv.app.server_svid
        assert renewed.leaf != leaf and list(renewed.chain) == signed[-1]
        new_active = srv.app.ca_manager.active_x509_authority
        assert new_active is not None and new_active.authority_id != active.authority_id
        aki = renewed.leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
        assert aki == bytes.fromhex(new_active.authority_id)
        assert _presented_leaf(srv.port) == renewed.leaf


def test_a_dns_name_no_certificate_may_carry_stops_start_up(tmp_path: Path) -> None:
    sock = free_socket_dir()
    try:
        with pytest.raises(StartupError, match="dns_names: cannot issue the server SVID"):
            RunningServer(make_config(tmp_path / "server", sock / "api.sock", dns_names="host:8081"))
    finally:
        cleanup(sock)
