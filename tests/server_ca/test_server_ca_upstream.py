"""An upstream authority (an organisation's CA given as files): the bundle is the upstream root and SVIDs
chain through the server's intermediate (and the upstream intermediate) to it."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509 import verification as xv
from cryptography.x509.oid import NameOID
from server_ca_support import FakeClock, new_key, tls_handshake

from tessera.sdk.bundle import X509Bundle
from tessera.sdk.keys import PrivateKey, generate_key, private_key_to_pem
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import certificates_to_pem, spiffe_id_from_certificate
from tessera.sdk.verify import verify_x509_svid
from tessera.server.ca.config import CaConfig
from tessera.server.ca.journal import Status
from tessera.server.ca.manager import CaManager
from tessera.server.ca.upstream import UpstreamAuthority
from tessera.server.errors import UpstreamAuthorityError

TD = "example.org"
WORKLOAD = SpiffeId.parse("spiffe://example.org/workload")


def org_ca(
    name: str,
    issuer: tuple[x509.Certificate, PrivateKey] | None = None,
    *,
    not_before: datetime | None = None,
    life: timedelta = timedelta(days=365),
    ca: bool = True,
) -> tuple[x509.Certificate, PrivateKey]:
    """A plain organisational CA (no SPIFFE SAN), as a corporate PKI would issue it."""
    key = generate_key("ec-p384" if issuer is None else "ec-p256")
    start = not_before or datetime.now(UTC) - timedelta(hours=1)
    subject = x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org"), x509.NameAttribute(NameOID.COMMON_NAME, name)]
    )
    issuer_name, signing_key = (subject, key) if issuer is None else (issuer[0].subject, issuer[1])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + life)
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=not ca,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=ca,
                crl_sign=ca,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer[1].public_key()),
            critical=False,
        )
    return builder.sign(signing_key, hashes.SHA256()), key


class OrgPki:
    def __init__(self) -> None:
        self.root, self.root_key = org_ca("Example Org Root CA")
        self.intermediate, self.intermediate_key = org_ca("Example Org SPIFFE Issuing CA", (self.root, self.root_key))

    def write(
        self, directory: Path, *, chain_in_cert_file: bool = False, bundle: bool = True
    ) -> tuple[Path, Path, Path | None]:
        directory.mkdir(parents=True, exist_ok=True)
        cert_file, key_file, bundle_file = (
            directory / "upstream.crt",
            directory / "upstream.key",
            directory / "roots.pem",
        )
        certs = [self.intermediate, self.root] if chain_in_cert_file else [self.intermediate]
        cert_file.write_bytes(certificates_to_pem(certs))
        key_file.write_bytes(private_key_to_pem(self.intermediate_key))
        bundle_file.write_bytes(certificates_to_pem([self.root]))
        return cert_file, key_file, bundle_file if bundle else None


def verify_everywhere(chain: list[x509.Certificate], roots: list[x509.Certificate], now: datetime) -> None:
    """tessera.sdk's verifier and cryptography's RFC 5280 client verifier both accept the chain."""
    sid, verified = verify_x509_svid(chain, X509Bundle(TrustDomain.parse(TD), tuple(roots)), now=now)
    assert sid == spiffe_id_from_certificate(chain[0])
    assert verified[-1] in roots
    verifier = xv.PolicyBuilder().store(xv.Store(roots)).time(now).build_client_verifier()
    verifier.verify(chain[0], chain[1:])


def test_bundle_is_upstream_root_and_svids_chain_through_intermediates(tmp_path: Path) -> None:
    pki = OrgPki()
    upstream = UpstreamAuthority.load(*pki.write(tmp_path / "upstream"))
    assert upstream.roots == (pki.root,) and upstream.chain == (pki.intermediate,)
    clock = FakeClock()
    manager = CaManager.open(tmp_path / "data", TD, upstream=upstream, clock=clock)

    assert manager.bundle_x509_authorities() == [pki.root]
    server_ca = manager.active_x509_authority
    assert server_ca is not None
    server_ca.certificate.verify_directly_issued_by(pki.intermediate)
    info = manager.authorities()[0]
    assert (
        info.upstream_authority_id
        == x509.SubjectKeyIdentifier.from_public_key(pki.intermediate_key.public_key()).digest.hex()
    )

    server_key, client_key = new_key(), new_key("rsa-2048")
    server_chain = manager.ca.sign_x509_svid(server_key.public_key(), "spiffe://example.org/tessera/server")
    client_chain = manager.ca.sign_x509_svid(client_key.public_key(), WORKLOAD)
    # leaf, the server's intermediate, the organisation's intermediate; the root only in the bundle.
    assert client_chain[1:] == [server_ca.certificate, pki.intermediate]
    for chain in (server_chain, client_chain):
        verify_everywhere(chain, [pki.root], clock.now)
    result = tls_handshake(server_chain, server_key, client_chain, client_key, [pki.root])
    assert result.server_version == result.client_version == "TLSv1.3"

    spiffe_bundle = manager.bundle()
    assert list(spiffe_bundle.x509_authorities) == [pki.root]


def test_upstream_given_as_root_itself(tmp_path: Path) -> None:
    pki = OrgPki()
    (tmp_path / "root.crt").write_bytes(certificates_to_pem([pki.root]))
    (tmp_path / "root.key").write_bytes(private_key_to_pem(pki.root_key))
    upstream = UpstreamAuthority.load(tmp_path / "root.crt", tmp_path / "root.key")
    assert upstream.roots == (pki.root,) and upstream.chain == ()
    clock = FakeClock()
    manager = CaManager.open(tmp_path / "data", TD, upstream=upstream, clock=clock)
    key = new_key()
    chain = manager.ca.sign_x509_svid(key.public_key(), WORKLOAD)
    assert len(chain) == 2 and chain[1] == manager.active_x509_authority.certificate  # type: ignore[union-attr]
    verify_everywhere(chain, [pki.root], clock.now)
    tls_handshake(chain, key, chain, key, [pki.root])


def test_chain_in_cert_file_without_bundle_file(tmp_path: Path) -> None:
    pki = OrgPki()
    upstream = UpstreamAuthority.load(*pki.write(tmp_path, chain_in_cert_file=True, bundle=False))
    assert upstream.roots == (pki.root,) and upstream.chain == (pki.intermediate,)


def test_rotation_under_upstream_keeps_bundle_and_old_svids_valid(tmp_path: Path) -> None:
    pki = OrgPki()
    upstream = UpstreamAuthority.load(*pki.write(tmp_path / "upstream"))
    clock = FakeClock()
    manager = CaManager.open(tmp_path / "data", TD, upstream=upstream, clock=clock)
    first = manager.active_x509_authority
    assert first is not None
    old_key = new_key()
    old_chain = manager.ca.sign_x509_svid(old_key.public_key(), WORKLOAD)
    manager.prepare()
    manager.activate()
    second = manager.active_x509_authority
    assert second is not None and second.authority_id != first.authority_id
    assert manager.bundle_x509_authorities() == [pki.root]
    statuses = {i.authority_id: i.status for i in manager.authorities() if i.kind == "x509"}
    assert statuses == {first.authority_id: Status.OLD, second.authority_id: Status.ACTIVE}
    new_key_ = new_key()
    new_chain = manager.ca.sign_x509_svid(new_key_.public_key(), "spiffe://example.org/b")
    assert new_chain[1] == second.certificate
    tls_handshake(old_chain, old_key, new_chain, new_key_, [pki.root])


def test_restart_keeps_intermediate_and_switching_upstream_replaces_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki = OrgPki()
    files = pki.write(tmp_path / "upstream")
    clock = FakeClock()
    manager = CaManager.open(tmp_path / "data", TD, upstream=UpstreamAuthority.load(*files), clock=clock)
    first = manager.active_x509_authority
    assert first is not None

    again = CaManager.open(tmp_path / "data", TD, upstream=UpstreamAuthority.load(*files), clock=clock)
    assert again.active_x509_authority is not None and again.active_x509_authority.authority_id == first.authority_id
    assert again.tick() == []

    other = OrgPki()
    with caplog.at_level(logging.WARNING, logger="tessera.server.ca"):
        switched = CaManager.open(
            tmp_path / "data", TD, upstream=UpstreamAuthority.load(*other.write(tmp_path / "other")), clock=clock
        )
    assert "does not vouch for it" in caplog.text
    fresh = switched.active_x509_authority
    assert fresh is not None and fresh.authority_id != first.authority_id
    fresh.certificate.verify_directly_issued_by(other.intermediate)
    assert switched.bundle_x509_authorities() == [other.root]

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tessera.server.ca"):
        self_signed = CaManager.open(tmp_path / "data", TD, clock=clock)
    assert "no longer configured" in caplog.text
    root = self_signed.active_x509_authority
    assert root is not None and root.certificate.issuer == root.certificate.subject


def test_server_ca_never_outlives_upstream_and_no_pointless_rotation(tmp_path: Path) -> None:
    root, root_key = org_ca("Short-lived Root", life=timedelta(hours=6))
    upstream = UpstreamAuthority.create(root, root_key)
    clock = FakeClock()
    manager = CaManager.open(tmp_path, TD, CaConfig(ca_ttl=timedelta(hours=24)), upstream=upstream, clock=clock)
    ca = manager.active_x509_authority
    assert ca is not None
    assert ca.lifetime.not_after == root.not_valid_after_utc
    # A successor could not outlive the upstream root either, so none is prepared at half life.
    events = manager.tick(ca.lifetime.not_before + ca.lifetime.life * 0.9)
    assert [e for e in events if e.kind == "x509"] == []
    assert [i.status for i in manager.authorities() if i.kind == "x509"] == [Status.ACTIVE]
    # Once the upstream root has expired, nothing can be signed and the error says why.
    late = root.not_valid_after_utc + timedelta(hours=20)
    jwt_before = set(manager.jwt_authorities())
    with pytest.raises(UpstreamAuthorityError, match="expired"):
        manager.tick(late)
    # ...while the JWT keys, which do not depend on the upstream CA, still rotate.
    assert set(manager.jwt_authorities()) != jwt_before


def test_upstream_files_are_checked(tmp_path: Path) -> None:
    pki = OrgPki()
    cert_file, key_file, bundle_file = pki.write(tmp_path)
    assert bundle_file is not None
    wrong_key = tmp_path / "wrong.key"
    wrong_key.write_bytes(private_key_to_pem(generate_key()))
    with pytest.raises(UpstreamAuthorityError, match="private key does not belong"):
        UpstreamAuthority.load(cert_file, wrong_key, bundle_file)
    with pytest.raises(UpstreamAuthorityError, match="not self-signed"):
        UpstreamAuthority.load(cert_file, key_file)
    other_root = tmp_path / "other-root.pem"
    other_root.write_bytes(certificates_to_pem([OrgPki().root]))
    with pytest.raises(UpstreamAuthorityError, match="does not reach the upstream bundle"):
        UpstreamAuthority.load(cert_file, key_file, other_root)
    leaf, leaf_key = org_ca("not a CA", (pki.root, pki.root_key), ca=False)
    with pytest.raises(UpstreamAuthorityError, match="cA=false"):
        UpstreamAuthority.create(leaf, leaf_key, roots=[pki.root])
    with pytest.raises(UpstreamAuthorityError, match="out of order"):
        UpstreamAuthority.create(pki.intermediate, pki.intermediate_key, chain=[OrgPki().root])
    with pytest.raises(UpstreamAuthorityError, match="cannot read upstream certificate file"):
        UpstreamAuthority.load(tmp_path / "missing.crt", key_file)
    not_pem = tmp_path / "garbage.crt"
    not_pem.write_bytes(b"garbage")
    with pytest.raises(UpstreamAuthorityError, match="not PEM"):
        UpstreamAuthority.load(not_pem, key_file)
    with pytest.raises(UpstreamAuthorityError, match="not an unencrypted PEM"):
        UpstreamAuthority.load(cert_file, not_pem, bundle_file)
    assert "PRIVATE" not in repr(UpstreamAuthority.load(cert_file, key_file, bundle_file))


def test_expired_upstream_stops_start_up(tmp_path: Path) -> None:
    root, root_key = org_ca("Old Root", not_before=datetime.now(UTC) - timedelta(days=30), life=timedelta(days=1))
    upstream = UpstreamAuthority.create(root, root_key)
    with pytest.raises(UpstreamAuthorityError, match="expired at"):
        CaManager.open(tmp_path, TD, upstream=upstream, clock=FakeClock())
    # Nothing half-made is left behind: no key without a journal entry.
    assert list((tmp_path / "keys").glob("x509-*")) == []
