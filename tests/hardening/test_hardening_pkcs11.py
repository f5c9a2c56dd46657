"""CA keys in an HSM: the PKCS#11 key manager against a real SoftHSM2 token.

The key manager is checked on its own (generate / load / delete / list, non-extractable keys, PIN handling)
and under the CA manager: a CA whose keys live on the token issues X509-SVIDs and JWT-SVIDs that verify,
rotates, taints and revokes exactly as with keys on disk, and leaves no private key in its data directory.
"""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hsm_support import USER_PIN, SoftHsm, assert_no_private_key_under, make_token, softhsm_module

from tessera.sdk.bundle import X509Bundle
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.keys import generate_key, key_id
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.verify import verify_x509_svid
from tessera.sdk.x509profile import build_ca_certificate
from tessera.server.ca.config import CaConfig
from tessera.server.ca.journal import FileJournalStore, Status
from tessera.server.ca.manager import CaManager
from tessera.server.ca.pkcs11 import Pkcs11KeyManager, read_pin
from tessera.server.errors import KeyManagerError

pytestmark = pytest.mark.skipif(softhsm_module() is None, reason="SoftHSM2 missing: run scripts/system-deps.sh")

TD = "example.org"
WORKLOAD = SpiffeId.parse("spiffe://example.org/hsm/workload")


@pytest.fixture(scope="module")
def hsm() -> Iterator[SoftHsm]:
    root = Path(tempfile.mkdtemp(prefix="thsm-", dir="/tmp"))
    try:
        yield make_token(root, this_process=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def keys(hsm: SoftHsm) -> Iterator[Pkcs11KeyManager]:
    manager = Pkcs11KeyManager(hsm.module, hsm.label, USER_PIN)
    try:
        yield manager
    finally:
        manager.close()


def _p11_private_key_attributes(keys: Pkcs11KeyManager, slot: str) -> tuple[bool, bool]:
    import pkcs11

    def read(session: object) -> tuple[bool, bool]:
        key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label=keys._label(slot))  # type: ignore[attr-defined]
        return bool(key[pkcs11.Attribute.SENSITIVE]), bool(key[pkcs11.Attribute.EXTRACTABLE])

    return keys._session.run("test", read)


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048"])
def test_generate_load_sign_delete(keys: Pkcs11KeyManager, kind: str) -> None:
    slot = f"t-{kind}"
    handle = keys.generate(slot, kind)
    assert handle.kind == kind and handle.slot_id == slot
    sensitive, extractable = _p11_private_key_attributes(keys, slot)
    assert sensitive and not extractable
    with pytest.raises(KeyManagerError, match="cannot be exported"):
        handle.signer.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    assert "PRIVATE" not in repr(handle) and slot in repr(handle)
    loaded = keys.load(slot)
    assert loaded is not None and key_id(loaded.public_key) == key_id(handle.public_key)
    assert slot in keys.slot_ids()
    # The signer works with cryptography's builders: a self-signed certificate verifies with the public half.
    now = dt.datetime.now(dt.UTC)
    cert = build_ca_certificate(
        subject_key=loaded.public_key,
        issuer_cert=None,
        issuer_key=loaded.signer,
        trust_domain=TrustDomain.parse(TD),
        not_before=now,
        not_after=now + dt.timedelta(hours=1),
    )
    cert.verify_directly_issued_by(cert)
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    keys.delete(slot)
    assert keys.load(slot) is None and slot not in keys.slot_ids()
    keys.delete(slot)  # deleting an empty slot is not an error


def test_generate_replaces_and_slot_ids_ignore_foreign_objects(keys: Pkcs11KeyManager, hsm: SoftHsm) -> None:
    first = keys.generate("replace-me", "ec-p256")
    second = keys.generate("replace-me", "ec-p256")
    assert key_id(first.public_key) != key_id(second.public_key)
    loaded = keys.load("replace-me")
    assert loaded is not None and key_id(loaded.public_key) == key_id(second.public_key)
    other = Pkcs11KeyManager(hsm.module, hsm.label, USER_PIN, label_prefix="someone-else:")
    try:
        other.generate("theirs", "ec-p256")
        assert "theirs" not in keys.slot_ids() and other.slot_ids() == ["theirs"]
        other.delete("theirs")
    finally:
        other.close()
    keys.delete("replace-me")
    with pytest.raises(KeyManagerError):
        keys.generate("../escape", "ec-p256")


OPEN_SCRIPT = """
import sys
from tessera.server.ca.pkcs11 import Pkcs11KeyManager
from tessera.server.errors import KeyManagerError
try:
    Pkcs11KeyManager(sys.argv[1], sys.argv[2], sys.argv[3])
    print("OPENED")
except KeyManagerError as exc:
    print(exc)
"""


def _open_in_fresh_process(hsm: SoftHsm, module: str, label: str, pin: str) -> str:
    # PKCS#11 logins are per process: a fresh process is the only honest test of a wrong PIN.
    out = subprocess.run(
        [sys.executable, "-c", OPEN_SCRIPT, module, label, pin],
        env=hsm.env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    return out.stdout.strip()


def test_wrong_pin_missing_token_and_bad_module_are_clear(hsm: SoftHsm) -> None:
    assert _open_in_fresh_process(hsm, hsm.module, hsm.label, USER_PIN) == "OPENED"
    wrong = _open_in_fresh_process(hsm, hsm.module, hsm.label, "0000")
    assert "PIN for token 'tessera-test' is incorrect" in wrong and "0000" not in wrong
    assert "no token labelled 'nope'" in _open_in_fresh_process(hsm, hsm.module, "nope", USER_PIN)
    assert "cannot load /nonexistent/lib.so" in _open_in_fresh_process(hsm, "/nonexistent/lib.so", "x", USER_PIN)


def test_read_pin(tmp_path: Path) -> None:
    assert read_pin("env:HSM_PIN", {"HSM_PIN": "1234"}) == "1234"
    with pytest.raises(KeyManagerError, match="not set"):
        read_pin("env:HSM_PIN", {})
    pin_file = tmp_path / "pin"
    pin_file.write_text("5678\n")
    pin_file.chmod(0o600)
    assert read_pin(f"file:{pin_file}") == "5678"
    pin_file.chmod(0o644)
    with pytest.raises(KeyManagerError, match="readable by other users"):
        read_pin(f"file:{pin_file}")
    for literal in ("1234", "pin:1234", "env:", "file:"):
        with pytest.raises(KeyManagerError, match="literal PIN is not accepted") as info:
            read_pin(literal)
        assert "1234" not in str(info.value)
    empty = tmp_path / "empty"
    empty.write_text("\n")
    empty.chmod(0o600)
    with pytest.raises(KeyManagerError, match="empty PIN"):
        read_pin(f"file:{empty}")


def test_ca_manager_with_keys_in_the_hsm(keys: Pkcs11KeyManager, tmp_path: Path) -> None:
    """Issue, rotate, taint and revoke with the CA key on the token; the data dir never holds a private key."""
    clock_now = [dt.datetime.now(dt.UTC).replace(microsecond=0)]
    config = CaConfig(ca_ttl=dt.timedelta(hours=2), x509_svid_ttl=dt.timedelta(minutes=10))
    manager = CaManager(TD, keys, FileJournalStore(tmp_path / "ca_journal.json"), config, None, lambda: clock_now[0])
    manager.load()
    manager.tick()
    first = manager.active_x509_authority
    assert first is not None and first.key.slot_id in keys.slot_ids()
    workload_key = generate_key()

    def issue_and_verify() -> x509.Certificate:
        chain = manager.ca.sign_x509_svid(workload_key.public_key(), WORKLOAD)
        bundle = X509Bundle(manager.trust_domain, tuple(manager.bundle_x509_authorities()))
        sid, _ = verify_x509_svid(chain, bundle, now=clock_now[0])
        assert sid == WORKLOAD
        token, _ = manager.ca.mint_jwt_svid(WORKLOAD, ["db"], 120)
        jwt_bundle = manager.bundle().jwt_bundle()
        assert JwtSvid.parse_and_validate(token, jwt_bundle, "db", now=clock_now[0]).spiffe_id == WORKLOAD
        return chain[0]

    leaf1 = issue_and_verify()
    # Rotation through the schedule: advance the clock past the prepare and activate points.
    for _ in range(4):
        clock_now[0] += dt.timedelta(minutes=40)
        manager.tick()
    second = manager.active_x509_authority
    assert second is not None and second.authority_id != first.authority_id
    leaf2 = issue_and_verify()
    leaf1.verify_directly_issued_by(first.certificate)
    leaf2.verify_directly_issued_by(second.certificate)
    # Forced rotation, taint and revoke: the revoked key is destroyed on the token.
    manager.prepare()
    manager.activate()
    old = [a for a in manager.authorities() if a.kind == "x509" and a.status is Status.OLD]
    assert old
    victim = old[0].authority_id
    victim_slot = next(a.key.slot_id for a in manager.held_x509_authorities() if a.authority_id == victim)
    manager.taint("x509", victim)
    manager.revoke("x509", victim)
    assert victim_slot not in keys.slot_ids()
    issue_and_verify()
    assert_no_private_key_under(tmp_path)
    # A restart finds the keys on the token again, rotates nothing and keeps signing.
    active = manager.active_x509_authority
    assert active is not None
    again = CaManager(TD, keys, FileJournalStore(tmp_path / "ca_journal.json"), config, None, lambda: clock_now[0])
    again.load()
    again.tick()
    assert again.active_x509_authority is not None and again.active_x509_authority.authority_id == active.authority_id
    chain = again.ca.sign_x509_svid(workload_key.public_key(), WORKLOAD)
    verify_x509_svid(chain, X509Bundle(again.trust_domain, tuple(again.bundle_x509_authorities())), now=clock_now[0])
    assert os.listdir(tmp_path) == ["ca_journal.json"]
