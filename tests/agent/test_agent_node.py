"""Node identity pieces that need no server: storage, CSR, x509pop signatures, start-up decisions."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from tessera.agent.errors import NodeIdentityError
from tessera.agent.node import (
    AgentIdentity,
    IdentityStore,
    NodeClient,
    NodeConfig,
    load_trust_bundle_file,
    make_csr,
    sign_challenge,
)
from tessera.sdk.files import write_atomic
from tessera.sdk.keys import generate_key
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.testing import TestCA

TD = TrustDomain.parse("example.org")


def identity(ca: TestCA, ttl: float = 3600, reattestable: bool = False, **kw: object) -> AgentIdentity:
    svid = ca.issue_svid("spiffe://example.org/host/a", ttl=ttl, **kw)  # type: ignore[arg-type]
    return AgentIdentity(SpiffeId.parse("spiffe://example.org/host/a"), svid.cert_chain, svid.private_key, reattestable)


def test_write_atomic_modes_and_replace(tmp_path: Path) -> None:
    p = tmp_path / "k"
    write_atomic(str(p), b"one", 0o600)
    assert p.read_bytes() == b"one" and p.stat().st_mode & 0o777 == 0o600
    write_atomic(str(p), b"two", 0o600)
    assert p.read_bytes() == b"two"
    assert [x.name for x in tmp_path.iterdir()] == ["k"]  # no temp files left behind


def test_identity_store_round_trip(tmp_path: Path) -> None:
    ca = TestCA()
    store = IdentityStore(tmp_path / "data")
    assert store.load_identity() is None
    ident = identity(ca, reattestable=True)
    store.save_identity(ident)
    assert (tmp_path / "data").stat().st_mode & 0o777 == 0o700
    assert store.svid_path.stat().st_mode & 0o777 == 0o600
    back = store.load_identity()
    assert back is not None and back.spiffe_id == ident.spiffe_id and back.reattestable
    assert back.chain[0] == ident.chain[0]
    store.save_roots([ca.certificate])
    assert store.load_roots() == [ca.certificate]
    store.svid_path.write_bytes(b"garbage")
    assert store.load_identity() is None  # unreadable state is ignored, not fatal


def test_csr_carries_the_agent_key() -> None:
    key = generate_key("ec-p256")
    csr = x509.load_der_x509_csr(make_csr(key))
    assert csr.is_signature_valid
    assert csr.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]


@pytest.mark.parametrize("kind", ["ec", "rsa", "ed25519"])
def test_x509pop_challenge_signatures_verify(kind: str) -> None:
    challenge = os.urandom(32) + b"tessera-x509pop-v1 spiffe://example.org"
    if kind == "ec":
        eck = ec.generate_private_key(ec.SECP256R1())
        eck.public_key().verify(sign_challenge(eck, challenge), challenge, ec.ECDSA(hashes.SHA256()))
    elif kind == "rsa":
        rk = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        rk.public_key().verify(
            sign_challenge(rk, challenge),
            challenge,
            padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32),
            hashes.SHA256(),
        )
    else:
        edk = ed25519.Ed25519PrivateKey.generate()
        edk.public_key().verify(sign_challenge(edk, challenge), challenge)


def test_trust_bundle_file_errors(tmp_path: Path) -> None:
    with pytest.raises(NodeIdentityError, match="cannot read"):
        load_trust_bundle_file(str(tmp_path / "missing.pem"))
    (tmp_path / "empty.pem").write_text("nothing here\n")
    with pytest.raises(NodeIdentityError):
        load_trust_bundle_file(str(tmp_path / "empty.pem"))


def config(tmp_path: Path, **kw: object) -> NodeConfig:
    base: dict[str, object] = {
        "trust_domain": TD,
        "server_addresses": ("127.0.0.1:1",),
        "data_dir": tmp_path / "data",
    }
    base.update(kw)
    return NodeConfig(**base)  # type: ignore[arg-type]


def test_start_reuses_a_valid_stored_identity_without_the_server(tmp_path: Path) -> None:
    ca = TestCA()
    store = IdentityStore(tmp_path / "data")
    store.save_identity(identity(ca))
    store.save_roots([ca.certificate])

    async def main() -> None:
        client = NodeClient(config(tmp_path, join_token="spent-token"))
        ident = await client.start()  # 127.0.0.1:1 is not contacted: the stored SVID is enough
        assert str(ident.spiffe_id) == "spiffe://example.org/host/a"
        assert not client.renew_due() and not client.expired()
        await client.close()

    asyncio.run(main())


def test_expired_join_token_identity_stops_with_what_to_do(tmp_path: Path) -> None:
    ca = TestCA()
    store = IdentityStore(tmp_path / "data")
    now = dt.datetime.now(dt.UTC)
    store.save_identity(
        identity(ca, not_before=now - dt.timedelta(hours=2), not_after=now - dt.timedelta(hours=1))
    )
    store.save_roots([ca.certificate])

    async def main() -> None:
        with pytest.raises(NodeIdentityError, match="tessera-server token generate"):
            await NodeClient(config(tmp_path)).start()

    asyncio.run(main())


def test_identity_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    other = TestCA("other.test")
    svid = other.issue_svid("spiffe://other.test/host/a")
    store = IdentityStore(tmp_path / "data")
    sid = SpiffeId.parse("spiffe://other.test/host/a")
    store.save_identity(AgentIdentity(sid, svid.cert_chain, svid.private_key, False))

    async def main() -> None:
        with pytest.raises(NodeIdentityError, match=r"other\.test"):
            await NodeClient(config(tmp_path)).start()

    asyncio.run(main())


def test_no_trust_and_no_insecure_bootstrap_is_refused(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(NodeIdentityError, match="--trust-bundle"):
            await NodeClient(config(tmp_path, join_token="t")).start()

    asyncio.run(main())
