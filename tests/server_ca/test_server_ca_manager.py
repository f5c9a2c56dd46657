"""The CA manager over an injected clock: first start, each rotation phase, signing, JWTs, restarts."""

from __future__ import annotations

import json
import logging
import os
import stat
import threading
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509 import verification as xv
from server_ca_support import FakeClock, ceil_seconds, make_csr, new_key, tls_handshake

from tessera.sdk.bundle import JwtBundle, SpiffeBundle, X509Bundle
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.keys import public_keys_equal
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.verify import verify_x509_svid
from tessera.sdk.x509profile import subject_key_identifier
from tessera.server.ca.config import CaConfig
from tessera.server.ca.csr import csr_public_key
from tessera.server.ca.journal import FileJournalStore, MemoryJournalStore, Status
from tessera.server.ca.keymanager import MemoryKeyManager
from tessera.server.ca.manager import CaManager
from tessera.server.ca.schedule import Action, activate_at, prepare_at
from tessera.server.errors import (
    BadSigningRequestError,
    CaError,
    CaJournalError,
    CaNotReadyError,
    WeakKeyError,
)

TD = "example.org"
WORKLOAD = SpiffeId.parse("spiffe://example.org/workload")


def open_manager(data_dir: Path, clock: FakeClock, **config: object) -> CaManager:
    return CaManager.open(data_dir, TD, CaConfig(**config) if config else None, clock=clock)  # type: ignore[arg-type]


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def x509_by_status(manager: CaManager) -> dict[Status, list[str]]:
    out: dict[Status, list[str]] = {s: [] for s in Status}
    for info in manager.authorities():
        if info.kind == "x509":
            out[info.status].append(info.authority_id)
    return out


def assert_verifies(manager: CaManager, chain: list[x509.Certificate], clock: FakeClock) -> None:
    bundle = X509Bundle(manager.trust_domain, tuple(manager.bundle_x509_authorities()))
    sid, verified = verify_x509_svid(chain, bundle, now=clock.now)
    assert verified[-1] in bundle.authorities
    verifier = xv.PolicyBuilder().store(xv.Store(list(bundle.authorities))).time(clock.now).build_client_verifier()
    client = verifier.verify(chain[0], chain[1:])
    assert x509.UniformResourceIdentifier(str(sid)) in (client.subjects or [])


def test_first_start_creates_ca_and_jwt_key_with_private_files(tmp_path: Path) -> None:
    clock = FakeClock()
    data = tmp_path / "server"
    manager = open_manager(data, clock)
    infos = manager.authorities()
    assert [(i.kind, i.status) for i in infos] == [("x509", Status.ACTIVE), ("jwt", Status.ACTIVE)]
    ca = infos[0]
    assert ca.key_kind == "ec-p256" and not ca.tainted and ca.upstream_authority_id == ""
    assert ca.not_before == clock.now - timedelta(seconds=10)
    assert ca.not_after == clock.now + timedelta(hours=24)
    active = manager.active_x509_authority
    assert active is not None
    assert active.authority_id == ca.authority_id == subject_key_identifier(active.certificate).hex()
    assert active.certificate.issuer == active.certificate.subject  # self-signed root by default
    assert manager.bundle_sequence == 1
    assert mode(data / "keys") == 0o700
    key_files = sorted((data / "keys").iterdir())
    assert len(key_files) == 2 and all(mode(f) == 0o600 for f in key_files)
    assert mode(data / "ca_journal.json") == 0o600
    journal_text = (data / "ca_journal.json").read_text()
    assert "PRIVATE" not in journal_text


def test_rotation_phases_bundle_contents_activation_and_pruning(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    first = manager.active_x509_authority
    assert first is not None
    lifetime = first.lifetime

    # Phase 1: only the first CA. The manager's next event is the half-life preparation.
    assert manager.next_event_at() == prepare_at(lifetime)
    clock.set(prepare_at(lifetime) - timedelta(seconds=1))
    assert manager.tick() == []
    assert manager.bundle_x509_authorities() == [first.certificate]

    # Phase 2: at half life the next CA is prepared and published at once; the first keeps signing.
    clock.set(prepare_at(lifetime))
    events = manager.tick()
    assert [(e.kind, e.action) for e in events] == [("x509", Action.PREPARE), ("jwt", Action.PREPARE)]
    by_status = x509_by_status(manager)
    assert by_status[Status.ACTIVE] == [first.authority_id] and len(by_status[Status.PREPARED]) == 1
    second_id = by_status[Status.PREPARED][0]
    bundle = manager.bundle_x509_authorities()
    assert len(bundle) == 2 and bundle[0] == first.certificate
    assert manager.bundle_sequence == 2
    assert len(manager.jwt_authorities()) == 2
    chain = manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD)
    assert chain[0].extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier == (
        bytes.fromhex(first.authority_id)
    )
    assert_verifies(manager, chain, clock)

    # Phase 3: at 5/6 of the first CA's life the second takes over; the first stays in the bundle as old.
    assert manager.next_event_at() == activate_at(lifetime)
    clock.set(activate_at(lifetime))
    events = manager.tick()
    assert [(e.kind, e.action) for e in events] == [("x509", Action.ACTIVATE), ("jwt", Action.ACTIVATE)]
    by_status = x509_by_status(manager)
    assert by_status[Status.ACTIVE] == [second_id] and by_status[Status.OLD] == [first.authority_id]
    assert by_status[Status.PREPARED] == []
    assert manager.bundle_x509_authorities()[0] == first.certificate
    assert len(manager.bundle_x509_authorities()) == 2
    assert manager.bundle_sequence == 2  # same content, same sequence
    chain = manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD)
    aki = chain[0].extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == bytes.fromhex(second_id)
    assert_verifies(manager, chain, clock)

    # Phase 4: when the first CA expires it is pruned from the bundle and its key destroyed.
    # (The successor's half life falls 10 s before: CAs are backdated, so their half life comes a little early.)
    assert manager.next_event_at() == prepare_at(manager.active_x509_authority.lifetime)  # type: ignore[union-attr]
    assert manager.next_event_at() <= lifetime.not_after  # type: ignore[operator]
    keys_before = set((tmp_path / "keys").iterdir())
    clock.set(lifetime.not_after)
    events = manager.tick()
    assert (events[0].kind, events[0].action) == ("x509", Action.PREPARE)  # successor's half life coincides
    assert ("x509", Action.PRUNE, (first.authority_id,)) in [(e.kind, e.action, e.authority_ids) for e in events]
    by_status = x509_by_status(manager)
    assert by_status[Status.OLD] == [] and by_status[Status.ACTIVE] == [second_id]
    assert first.certificate not in manager.bundle_x509_authorities()
    assert manager.bundle_sequence == 3
    keys_after = set((tmp_path / "keys").iterdir())
    assert tmp_path / "keys" / f"{first.slot_id}.key.pem" in keys_before - keys_after


def test_svid_not_after_capped_at_ca_not_after_and_backdated(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    ca = manager.active_x509_authority
    assert ca is not None
    # Default TTL: 1 hour; notBefore backdated 10 seconds.
    leaf = manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD)[0]
    assert leaf.not_valid_before_utc == clock.now - timedelta(seconds=10)
    assert leaf.not_valid_after_utc == clock.now + timedelta(hours=1)
    # A long TTL asked late in the CA's life is cut at the CA's notAfter.
    clock.set(ca.lifetime.not_after - timedelta(minutes=30))
    leaf = manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD, ttl_seconds=7200)[0]
    assert leaf.not_valid_after_utc == ca.lifetime.not_after
    assert_verifies(manager, [leaf], clock)


def test_requested_ttl_capped_to_configured_maximum(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock, max_x509_svid_ttl=timedelta(hours=2))
    leaf = manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD, ttl_seconds=10 * 3600)[0]
    assert leaf.not_valid_after_utc == clock.now + timedelta(hours=2)
    leaf = manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD, ttl_seconds=0)[0]  # 0 = default
    assert leaf.not_valid_after_utc == clock.now + timedelta(hours=1)
    leaf = manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD, ttl_seconds=timedelta(minutes=5))[0]
    assert leaf.not_valid_after_utc == clock.now + timedelta(minutes=5)


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048"])
def test_every_key_kind_issues_verifiable_svids_and_tls_works(tmp_path: Path, kind: str) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock, ca_key_kind=kind)
    assert manager.authorities()[0].key_kind == kind
    server_key, client_key = new_key("ec-p256"), new_key("rsa-2048")
    server_chain = manager.ca.sign_x509_svid(
        server_key.public_key(),
        "spiffe://example.org/tessera/server",
        dns_names=["server.example.org"],
        ip_addresses=["127.0.0.1"],
    )
    san = server_chain[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["server.example.org"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    client_chain = manager.ca.sign_x509_svid(csr_public_key(make_csr(client_key)), WORKLOAD)
    for chain in (server_chain, client_chain):
        assert_verifies(manager, chain, clock)
    result = tls_handshake(server_chain, server_key, client_chain, client_key, manager.bundle_x509_authorities())
    assert result.client_version == result.server_version == "TLSv1.3"
    assert result.server_saw == client_chain[0].public_bytes(serialization.Encoding.DER)


def test_tls_during_overlap_between_old_and_new_ca(tmp_path: Path) -> None:
    """A peer holding an SVID from the old CA and one from the new CA both verify against the bundle."""
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    first = manager.active_x509_authority
    assert first is not None
    # Run the whole rotation at real time-scale zero: prepare, then activate, at the real "now".
    manager.prepare()
    old_key = new_key()
    old_chain = manager.ca.sign_x509_svid(old_key.public_key(), WORKLOAD)
    manager.activate()
    new_key_ = new_key()
    new_chain = manager.ca.sign_x509_svid(new_key_.public_key(), "spiffe://example.org/other")
    assert old_chain[0].issuer != new_chain[0].issuer
    roots = manager.bundle_x509_authorities()
    assert len(roots) == 2
    tls_handshake(old_chain, old_key, new_chain, new_key_, roots)
    tls_handshake(new_chain, new_key_, old_chain, old_key, roots)


def test_forced_prepare_and_activate(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    with pytest.raises(CaError, match="no prepared authority"):
        manager.activate()
    first = manager.active_x509_authority
    assert first is not None
    events = manager.prepare()
    assert {e.kind for e in events} == {"x509", "jwt"}
    prepared = x509_by_status(manager)[Status.PREPARED]
    # Preparing again replaces the prepared authority (and destroys its key).
    manager.prepare()
    replaced = x509_by_status(manager)[Status.PREPARED]
    assert replaced != prepared and len(replaced) == 1
    assert len(manager.bundle_x509_authorities()) == 2
    manager.activate()
    by_status = x509_by_status(manager)
    assert by_status[Status.ACTIVE] == replaced and by_status[Status.OLD] == [first.authority_id]
    assert len(list((tmp_path / "keys").iterdir())) == 4  # 2 X.509 + 2 JWT; the replaced one is gone


def test_signing_requests_are_checked(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    good = new_key().public_key()
    with pytest.raises(WeakKeyError, match="1024 bits"):
        manager.ca.sign_x509_svid(new_key_rsa_1024().public_key(), WORKLOAD)
    with pytest.raises(BadSigningRequestError, match="not in trust domain"):
        manager.ca.sign_x509_svid(good, "spiffe://other.org/workload")
    with pytest.raises(BadSigningRequestError, match="has no path"):
        manager.ca.sign_x509_svid(good, "spiffe://example.org")
    with pytest.raises(BadSigningRequestError, match="invalid SPIFFE ID"):
        manager.ca.sign_x509_svid(good, "spiffe://example.org/UP%20")
    with pytest.raises(BadSigningRequestError, match="must not be negative"):
        manager.ca.sign_x509_svid(good, WORKLOAD, ttl_seconds=-1)
    with pytest.raises(BadSigningRequestError, match="DNS name"):
        manager.ca.sign_x509_svid(good, WORKLOAD, dns_names=["bad name"])
    with pytest.raises(BadSigningRequestError, match="DNS name"):
        manager.ca.sign_x509_svid(good, WORKLOAD, dns_names=["bücher.example"])
    with pytest.raises(BadSigningRequestError, match="does not appear to be an IPv4 or IPv6"):
        manager.ca.sign_x509_svid(good, WORKLOAD, ip_addresses=["999.1.1.1"])


def new_key_rsa_1024() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=1024)


def test_nothing_signed_before_load_and_tick(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = CaManager(TD, MemoryKeyManager(), MemoryJournalStore(), clock=clock)
    with pytest.raises(CaError, match="has not loaded"):
        manager.tick()
    manager.load()
    with pytest.raises(CaNotReadyError, match=r"no X\.509 CA is active"):
        manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD)
    with pytest.raises(CaNotReadyError, match="no JWT key is active"):
        manager.ca.mint_jwt_svid(WORKLOAD, ["aud"])
    manager.tick()
    assert manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD)


def test_expired_ca_refuses_to_sign_until_ticked(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    ca = manager.active_x509_authority
    assert ca is not None
    clock.set(ca.lifetime.not_after + timedelta(hours=1))
    with pytest.raises(CaNotReadyError):
        manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD)
    # A server that was down longer than a CA life recovers on its next tick with a fresh CA.
    manager.tick()
    fresh = manager.active_x509_authority
    assert fresh is not None and fresh.authority_id != ca.authority_id
    assert [c for c in manager.bundle_x509_authorities()] == [fresh.certificate]
    assert_verifies(manager, manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD), clock)


# --- restart ---------------------------------------------------------------------------------------------


def test_restart_restores_slots_and_rotates_nothing_early(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    first = manager.active_x509_authority
    assert first is not None
    clock.set(prepare_at(first.lifetime) + timedelta(minutes=1))
    manager.tick()
    before = manager.authorities()
    sequence = manager.bundle_sequence
    bundle_doc = manager.bundle().to_document()
    del manager

    # Restart just before activation time: same authorities, same bundle, nothing rotated.
    clock.set(activate_at(first.lifetime) - timedelta(seconds=1))
    restarted = open_manager(tmp_path, clock)
    assert restarted.authorities() == before
    assert restarted.bundle_sequence == sequence
    assert restarted.bundle().to_document() == bundle_doc
    assert restarted.tick() == []
    assert restarted.next_event_at() == activate_at(first.lifetime)
    # It signs with the same active CA, whose key was restored from disk.
    leaf = restarted.ca.sign_x509_svid(new_key().public_key(), WORKLOAD)[0]
    leaf.verify_directly_issued_by(first.certificate)

    # And it rotates on schedule.
    clock.set(activate_at(first.lifetime))
    assert [e.action for e in restarted.tick()] == [Action.ACTIVATE, Action.ACTIVATE]


def test_restart_with_custom_journal_store(tmp_path: Path) -> None:
    clock = FakeClock()
    store = MemoryJournalStore()
    keys = MemoryKeyManager()
    manager = CaManager(TD, keys, store, clock=clock)
    manager.load()
    manager.tick()
    token, _ = manager.ca.mint_jwt_svid(WORKLOAD, "aud")
    assert store.data is not None
    again = CaManager(TD, keys, store, clock=clock)
    again.load()
    assert again.tick() == []
    assert again.authorities() == manager.authorities()
    jwt_bundle = JwtBundle(TD, again.jwt_authorities())
    assert JwtSvid.parse_and_validate(token, jwt_bundle, "aud", now=clock.now).spiffe_id == WORKLOAD


def test_restart_drops_authority_whose_key_vanished(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    first = manager.active_x509_authority
    assert first is not None
    (tmp_path / "keys" / f"{first.slot_id}.key.pem").unlink()
    with caplog.at_level(logging.WARNING, logger="tessera.server.ca"):
        restarted = open_manager(tmp_path, clock)
    assert "private key is missing" in caplog.text
    fresh = restarted.active_x509_authority
    assert fresh is not None and fresh.authority_id != first.authority_id
    assert first.certificate not in restarted.bundle_x509_authorities()


def test_unreferenced_keys_are_destroyed_on_load(tmp_path: Path) -> None:
    clock = FakeClock()
    open_manager(tmp_path, clock)
    keys_dir = tmp_path / "keys"
    orphan = keys_dir / "x509-0123456789abcdef.key.pem"
    orphan.write_bytes((next(keys_dir.iterdir())).read_bytes())
    unrelated = keys_dir / "server-tls.key.pem"
    unrelated.write_bytes(b"not ours")
    open_manager(tmp_path, clock)
    assert not orphan.exists()
    assert unrelated.exists()


def test_corrupt_journal_and_foreign_trust_domain_stop_start_up(tmp_path: Path) -> None:
    clock = FakeClock()
    open_manager(tmp_path, clock)
    journal = tmp_path / "ca_journal.json"
    doc = json.loads(journal.read_text())
    with pytest.raises(CaJournalError, match=r"belongs to trust domain 'example\.org'"):
        CaManager.open(tmp_path, "other.org", clock=clock)
    doc["x509"][0]["status"] = "retired"
    journal.write_text(json.dumps(doc))
    with pytest.raises(CaJournalError, match="unknown status 'retired'"):
        open_manager(tmp_path, clock)
    journal.write_text("{not json")
    with pytest.raises(CaJournalError, match="not JSON"):
        open_manager(tmp_path, clock)
    store = FileJournalStore(journal)
    store.save(b'{"version": 99}')
    with pytest.raises(CaJournalError, match="version 99"):
        open_manager(tmp_path, clock)


# --- JWT and the SPIFFE bundle ---------------------------------------------------------------------------


def test_jwt_svids_validate_against_jwt_bundle_through_rotation(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    jwt_key = manager.active_jwt_authority
    assert jwt_key is not None
    token, expires_at = manager.ca.mint_jwt_svid(WORKLOAD, ["db", "cache"])
    assert expires_at == clock.now + timedelta(minutes=5)
    svid = JwtSvid.parse_and_validate(token, JwtBundle(TD, manager.jwt_authorities()), ["db"], now=clock.now)
    assert svid.spiffe_id == WORKLOAD and svid.kid == jwt_key.authority_id and set(svid.audience) == {"db", "cache"}

    # Rotate: the old key stays in the JWT bundle, so tokens it signed still validate.
    clock.set(ceil_seconds(activate_at(jwt_key.lifetime)))
    manager.tick()
    new_key_ = manager.active_jwt_authority
    assert new_key_ is not None and new_key_.authority_id != jwt_key.authority_id
    assert set(manager.jwt_authorities()) == {jwt_key.authority_id, new_key_.authority_id}
    late_token, late_exp = manager.ca.mint_jwt_svid(WORKLOAD, "db", ttl_seconds=3600)
    assert JwtSvid.parse_and_validate(
        late_token, JwtBundle(TD, manager.jwt_authorities()), "db", now=clock.now
    ).kid == (new_key_.authority_id)
    assert late_exp == clock.now + timedelta(hours=1)

    # Expiry never passes the signing key's notAfter.
    clock.set(new_key_.lifetime.not_after - timedelta(minutes=1))
    _, capped = manager.ca.mint_jwt_svid(WORKLOAD, "db", ttl_seconds=3600)
    assert capped == new_key_.lifetime.not_after

    with pytest.raises(BadSigningRequestError, match="audience"):
        manager.ca.mint_jwt_svid(WORKLOAD, [])
    with pytest.raises(BadSigningRequestError, match="audience"):
        manager.ca.mint_jwt_svid(WORKLOAD, ["ok", ""])


def test_spiffe_bundle_document_and_sequence(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    bundle = manager.bundle()
    assert isinstance(bundle, SpiffeBundle)
    assert bundle.sequence == 1 and bundle.refresh_hint == 300
    parsed = SpiffeBundle.from_document(TD, bundle.to_document())
    assert parsed == bundle
    assert list(parsed.x509_authorities) == manager.bundle_x509_authorities()
    assert set(parsed.jwt_authorities) == set(manager.jwt_authorities())
    for kid, key in parsed.jwt_authorities.items():
        assert public_keys_equal(key, manager.jwt_authorities()[kid])
    manager.prepare()
    assert manager.bundle().sequence == 2
    manager.activate()
    assert manager.bundle().sequence == 2  # activation changes no published content


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="ca_ttl"):
        CaConfig(ca_ttl=timedelta(seconds=30))
    with pytest.raises(ValueError, match="unsupported CA key kind"):
        CaConfig(ca_key_kind="ec-p521")
    with pytest.raises(ValueError, match="must not exceed"):
        CaConfig(x509_svid_ttl=timedelta(hours=5), max_x509_svid_ttl=timedelta(hours=2))
    assert CaConfig(ca_ttl=timedelta(hours=6)).effective_jwt_key_ttl == timedelta(hours=6)


def test_signing_from_many_threads_while_rotating(tmp_path: Path) -> None:
    """The signing path reads a snapshot without the lock: every SVID signed during forced rotations must
    verify against the bundle as it stands afterwards (no torn CA/key pair, no lost authority)."""
    clock = FakeClock()
    manager = open_manager(tmp_path, clock)
    keys = [new_key().public_key() for _ in range(4)]
    chains: list[list[x509.Certificate]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def signer(index: int) -> None:
        try:
            while not stop.is_set():
                chains.append(manager.ca.sign_x509_svid(keys[index], WORKLOAD))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=signer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    try:
        for _ in range(3):
            manager.prepare()
            manager.activate()
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert not errors
    assert chains
    for chain in chains[:: max(1, len(chains) // 200)]:
        assert_verifies(manager, chain, clock)
