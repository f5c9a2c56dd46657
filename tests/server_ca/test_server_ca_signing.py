"""The CA that signs apart from the manager that rotates, and the slots between them, without a server."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from server_ca_support import FakeClock, new_key

from tessera.sdk.keys import PrivateKey, PublicKey, key_id
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.server.ca.config import CaConfig
from tessera.server.ca.journal import MemoryJournalStore, Status
from tessera.server.ca.keymanager import MemoryKeyManager
from tessera.server.ca.manager import CaManager
from tessera.server.ca.schedule import Lifetime
from tessera.server.ca.signing import ActiveAuthorities, ServerCa
from tessera.server.ca.slots import JwtAuthority, Slots
from tessera.server.errors import CaNotReadyError

TD = TrustDomain("example.org")
WORKLOAD = SpiffeId.parse("spiffe://example.org/workload")


@dataclass(frozen=True)
class FakeKey:
    """Enough of a SigningKey for the slots: they never sign."""

    slot_id: str
    kind: str = "ec-p256"

    @property
    def public_key(self) -> PublicKey:
        return self.signer.public_key()

    @property
    def signer(self) -> PrivateKey:
        return _KEYS.setdefault(self.slot_id, new_key())


_KEYS: dict[str, PrivateKey] = {}


def jwt_authority(clock: FakeClock, slot_id: str, hours: int = 24, status: Status = Status.PREPARED) -> JwtAuthority:
    key = FakeKey(slot_id)
    lifetime = Lifetime(clock.now, clock.now + timedelta(hours=hours))
    return JwtAuthority(slot_id, key, key_id(key.public_key), lifetime, status)


def test_slots_transitions_are_pure_values() -> None:
    clock = FakeClock()
    first, second = jwt_authority(clock, "jwt-a", hours=1), jwt_authority(clock, "jwt-b")
    empty: Slots[JwtAuthority] = Slots()
    assert empty.activated() is empty  # nothing prepared: nothing changes

    one = empty.with_prepared(first).activated()
    assert one.active is not None and one.active.status is Status.ACTIVE and one.prepared is None
    two = one.with_prepared(second).activated()
    assert [a.slot_id for a in two.old] == ["jwt-a"] and two.old[0].status is Status.OLD
    assert one.active.slot_id == "jwt-a" and not one.old  # the earlier value is untouched

    # One name for an authority, found as an operator types it.
    assert two.find(f"  {first.authority_id.upper()} ") == two.old[0]
    assert two.find("00") is None
    tainted = two.with_old_tainted(first.authority_id)
    assert tainted.old[0].tainted and not two.old[0].tainted
    assert tainted.without_old(first.authority_id).old == ()

    kept, gone = two.pruned(clock.now + timedelta(hours=2))
    assert [a.slot_id for a in gone] == ["jwt-a"] and kept.old == () and kept.active == two.active
    assert [a.authority_id for a in two.all()] == [first.authority_id, second.authority_id]
    assert Slots.of(two.all()) == two  # as restored from the journal


def test_the_signing_ca_signs_only_with_what_it_was_handed() -> None:
    clock = FakeClock()
    ca = ServerCa(TD, CaConfig(), clock)
    with pytest.raises(CaNotReadyError, match=r"no X\.509 CA is active"):
        ca.sign_x509_svid(new_key().public_key(), WORKLOAD)
    with pytest.raises(CaNotReadyError, match="no JWT key is active"):
        ca.mint_jwt_svid(WORKLOAD, "aud")

    manager = CaManager(TD, MemoryKeyManager(), MemoryJournalStore(), clock=clock)
    manager.load()
    manager.tick()
    active = manager.ca.active
    assert active.x509 is manager.active_x509_authority and active.jwt is manager.active_jwt_authority
    ca.set_active(active)  # another CA handed the same pair signs with it
    leaf = ca.sign_x509_svid(new_key().public_key(), WORKLOAD)[0]
    assert leaf.not_valid_before_utc == clock.now - CaConfig().backdate
    ca.set_active(ActiveAuthorities())
    with pytest.raises(CaNotReadyError):
        ca.sign_x509_svid(new_key().public_key(), WORKLOAD)


def test_the_manager_hands_every_activation_to_its_ca(tmp_path: Path) -> None:
    clock = FakeClock()
    manager = CaManager.open(
        tmp_path, TD, clock=clock, key_manager=MemoryKeyManager(), journal_store=MemoryJournalStore()
    )
    assert list(tmp_path.iterdir()) == []  # both stores given: nothing on disk
    first = manager.ca.active.x509
    assert first is not None
    manager.prepare()
    assert manager.ca.active.x509 is first  # prepared authorities are published, never used to sign
    manager.activate()
    second = manager.ca.active.x509
    assert second is not None and second.authority_id != first.authority_id
    leaf = manager.ca.sign_x509_svid(new_key().public_key(), WORKLOAD)[0]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    assert aki == bytes.fromhex(second.authority_id)

    # The CA remembers what it minted with a JWT key until the key is revoked.
    minted_with = manager.ca.active.jwt
    assert minted_with is not None
    _, expires_at = manager.ca.mint_jwt_svid(WORKLOAD, "aud")
    manager.prepare()
    manager.activate()
    manager.taint("jwt", minted_with.authority_id)
    assert manager.ca.jwt_minted_until(minted_with.authority_id) == expires_at
    manager.revoke("jwt", minted_with.authority_id.upper())
    assert manager.ca.jwt_minted_until(minted_with.authority_id) is None
