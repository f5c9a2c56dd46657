"""CA taint / revoke rules, per-CA CRLs, X509-SVID revocation records and the SDK's revocation checker."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from tessera.sdk.crl import RevocationChecker, crls_to_pem
from tessera.sdk.keys import generate_key
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.testing import TestCA
from tessera.server.ca.crl import RevokedSerial, build_crl, crl_der, parse_serial, serial_hex
from tessera.server.ca.manager import CaManager
from tessera.server.ca.revocation import (
    CrlPublisher,
    RevocationTarget,
    issued_svid,
    pending_reissue,
    revoke_x509_svids,
)
from tessera.server.datastore import open_datastore
from tessera.server.datastore.base import AttestedAgent, Datastore, RegistrationEntry, Selector
from tessera.server.errors import AuthorityStateError, NotFound, UnknownAuthorityError

TD = "a.test"


@pytest.fixture
def ca(tmp_path: Path) -> CaManager:
    return CaManager.open(tmp_path / "ca", TD)


@pytest.fixture
def ds(tmp_path: Path) -> Iterator[Datastore]:
    store = open_datastore(None, data_dir=tmp_path)
    yield store
    store.close()


def x509_ids(ca: CaManager, status: str) -> list[str]:
    return [a.authority_id for a in ca.authorities() if a.kind == "x509" and str(a.status) == status]


def sign(ca: CaManager, path: str) -> list[x509.Certificate]:
    return ca.ca.sign_x509_svid(generate_key().public_key(), f"spiffe://{TD}{path}", 600)


# ------------------------------------------------------------------------------------------- taint / revoke


def test_taint_refuses_active_and_prepared_then_marks_old(ca: CaManager) -> None:
    active = x509_ids(ca, "active")[0]
    with pytest.raises(AuthorityStateError, match="is active"):
        ca.taint("x509", active)
    ca.prepare()
    prepared = x509_ids(ca, "prepared")[0]
    with pytest.raises(AuthorityStateError, match="only prepared"):
        ca.taint("x509", prepared)
    with pytest.raises(UnknownAuthorityError):
        ca.taint("x509", "00" * 20)
    ca.activate()
    assert ca.taint("x509", active) is True
    assert ca.taint("x509", active) is False  # already tainted: no change
    info = {a.authority_id: a for a in ca.authorities()}
    assert info[active].tainted and str(info[active].status) == "old"


def test_revoke_needs_taint_removes_from_bundle_and_survives_restart(ca: CaManager, tmp_path: Path) -> None:
    old = x509_ids(ca, "active")[0]
    ca.prepare()
    ca.activate()
    with pytest.raises(AuthorityStateError, match="not tainted"):
        ca.revoke("x509", old)
    sequence = ca.bundle_sequence
    ca.taint("x509", old)
    ca.revoke("x509", old)
    assert old not in {
        c.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
        for c in ca.bundle().x509_authorities
    }
    assert ca.bundle_sequence > sequence
    again = CaManager.open(tmp_path / "ca", TD)
    assert old not in [a.authority_id for a in again.authorities()]


def test_jwt_key_taint_and_revoke(ca: CaManager) -> None:
    old_kid = next(a.authority_id for a in ca.authorities() if a.kind == "jwt" and str(a.status) == "active")
    _token, _ = ca.ca.mint_jwt_svid(f"spiffe://{TD}/w", ["aud"], 60)
    ca.prepare()
    ca.activate()
    ca.taint("jwt", old_kid)
    minted = ca.ca.jwt_minted_until(old_kid)
    assert minted is not None and minted > dt.datetime.now(dt.UTC)
    ca.revoke("jwt", old_kid)
    assert old_kid not in ca.bundle().jwt_authorities


# --------------------------------------------------------------------------------------------------- CRLs


def test_crl_lists_serials_and_sdk_checker_verifies_its_signature() -> None:
    ca = TestCA(TD)
    victim = ca.issue_svid(f"spiffe://{TD}/victim")
    other = ca.issue_svid(f"spiffe://{TD}/other")
    now = dt.datetime.now(dt.UTC)
    crl = build_crl(
        issuer_cert=ca.certificate,
        issuer_key=ca.key,
        revoked=[RevokedSerial(victim.leaf.serial_number, now)],
        now=now,
    )
    checker = RevocationChecker([crl_der(crl)])
    roots = [ca.certificate]
    assert checker.is_revoked(victim.leaf, roots)
    assert not checker.is_revoked(other.leaf, roots)
    # A CRL "signed" by another key for the same issuer name is ignored, not trusted.
    impostor = TestCA(TD)
    forged = build_crl(
        issuer_cert=ca.certificate,
        issuer_key=impostor.key,
        revoked=[RevokedSerial(other.leaf.serial_number, now)],
        now=now,
    )
    assert not RevocationChecker([crl_der(forged)]).is_revoked(other.leaf, roots)
    assert b"BEGIN X509 CRL" in crls_to_pem([crl_der(crl)])


def test_serial_parsing() -> None:
    assert parse_serial("0A:1b") == 0xA1B
    assert parse_serial("serial=0x10") == 16
    assert serial_hex(255) == "ff"
    for bad in ("", "zz", "0"):
        with pytest.raises(ValueError):
            parse_serial(bad)


def test_crl_publisher_one_crl_per_ca_and_revocations_by_entry_and_agent(ca: CaManager, ds: Datastore) -> None:
    entry = ds.create_entry(
        RegistrationEntry("", f"spiffe://{TD}/web", f"spiffe://{TD}/agent", (Selector("unix", "uid:1"),))
    )
    agent_id = f"spiffe://{TD}/agent"
    workload = sign(ca, "/web")
    agent_chain = sign(ca, "/agent")
    ds.record_issued_svids([issued_svid(workload, entry.id, agent_id), issued_svid(agent_chain, "", agent_id)])
    publisher = CrlPublisher(ca, ds)
    assert publisher.publish()
    assert not publisher.publish()  # nothing changed
    revision = ds.revisions().bundles
    crls = ds.list_crls()
    assert [c.issuer_key_id for c in crls] == x509_ids(ca, "active")
    assert RevocationChecker([c.crl for c in crls]).is_revoked(workload[0], ca.bundle().x509_authorities) is False

    now = int(time.time())
    revoked = revoke_x509_svids(ds, RevocationTarget(entry_id=entry.id), now)
    assert [r.serial for r in revoked] == [serial_hex(workload[0].serial_number)]
    assert ds.revisions().bundles > revision  # agents learn about it with the bundles
    assert publisher.publish()
    checker = RevocationChecker([c.crl for c in ds.list_crls()])
    assert checker.is_revoked(workload[0], ca.bundle().x509_authorities)
    assert not checker.is_revoked(agent_chain[0], ca.bundle().x509_authorities)
    # Revoking the agent adds its own SVID; revoking again adds nothing.
    assert len(revoke_x509_svids(ds, RevocationTarget(agent_id=agent_id), now)) == 1
    assert revoke_x509_svids(ds, RevocationTarget(agent_id=agent_id), now) == []
    with pytest.raises(NotFound):
        revoke_x509_svids(ds, RevocationTarget(serial="abcdef"), now)
    # Expired ones drop off.
    assert ds.prune_issued_and_revoked(now + 3600) >= 2
    assert ds.list_revoked_certificates() == []


def test_ca_revoke_waits_until_everything_is_reissued(ca: CaManager, ds: Datastore) -> None:
    agent_id = f"spiffe://{TD}/agent"
    ds.upsert_agent(AttestedAgent(agent_id, "join_token", (), "1", int(time.time()) + 600))
    e1 = ds.create_entry(RegistrationEntry("", f"spiffe://{TD}/one", agent_id, (Selector("unix", "uid:1"),)))
    e2 = ds.create_entry(RegistrationEntry("", f"spiffe://{TD}/two", agent_id, (Selector("unix", "uid:2"),)))
    old = x509_ids(ca, "active")[0]
    ds.record_issued_svids(
        [
            issued_svid(sign(ca, "/one"), e1.id, agent_id),
            issued_svid(sign(ca, "/two"), e2.id, agent_id),
            issued_svid(sign(ca, "/agent"), "", agent_id),
        ]
    )
    ca.prepare()
    ca.activate()
    ca.taint("x509", old)
    now = int(time.time())
    assert {p.spiffe_id for p in pending_reissue(ds, old, now)} == {
        f"spiffe://{TD}/one",
        f"spiffe://{TD}/two",
        agent_id,
    }
    ds.record_issued_svids(
        [issued_svid(sign(ca, "/one"), e1.id, agent_id), issued_svid(sign(ca, "/agent"), "", agent_id)]
    )
    assert [p.spiffe_id for p in pending_reissue(ds, old, now)] == [f"spiffe://{TD}/two"]
    ds.delete_entry(e2.id)  # a deleted entry's SVID is no longer in use
    assert pending_reissue(ds, old, now) == []
    assert SpiffeId.parse(agent_id).member_of(ca.trust_domain)
