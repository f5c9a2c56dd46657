"""Key manager (0600 files in a 0700 directory, atomic writes) and CSR / key-strength checks."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from tessera.sdk.keys import public_keys_equal
from tessera.server.ca.csr import MAX_CSR_BYTES, check_public_key, csr_public_key
from tessera.server.ca.keymanager import DiskKeyManager, MemoryKeyManager, check_key_kind
from tessera.server.errors import BadCsrError, KeyManagerError, WeakKeyError


def mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("kind", ["ec-p256", "ec-p384", "rsa-2048"])
def test_disk_key_manager_round_trip_with_private_modes(tmp_path: Path, kind: str) -> None:
    keys_dir = tmp_path / "data" / "keys"
    manager = DiskKeyManager(keys_dir)
    handle = manager.generate("x509-abc", kind)
    assert handle.kind == kind
    assert mode(keys_dir) == 0o700
    files = list(keys_dir.iterdir())
    assert [f.name for f in files] == ["x509-abc.key.pem"]  # no temp file left behind
    assert mode(files[0]) == 0o600
    assert b"BEGIN PRIVATE KEY" in files[0].read_bytes()

    loaded = DiskKeyManager(keys_dir).load("x509-abc")
    assert loaded is not None
    assert loaded.kind == kind
    assert public_keys_equal(loaded.public_key, handle.public_key)
    assert "PRIVATE" not in repr(loaded) and "private_key" not in repr(loaded)

    assert manager.slot_ids() == ["x509-abc"]
    manager.delete("x509-abc")
    assert manager.load("x509-abc") is None
    assert manager.slot_ids() == []
    manager.delete("x509-abc")  # deleting an empty slot is fine


def test_signing_with_a_loaded_key(tmp_path: Path) -> None:
    manager = DiskKeyManager(tmp_path)
    handle = manager.generate("jwt-1", "ec-p256")
    loaded = manager.load("jwt-1")
    assert loaded is not None
    signer = loaded.signer
    assert isinstance(signer, ec.EllipticCurvePrivateKey)
    signature = signer.sign(b"data", ec.ECDSA(hashes.SHA256()))
    public = handle.public_key
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"data", ec.ECDSA(hashes.SHA256()))


def test_existing_wide_directory_and_key_modes_are_tightened(tmp_path: Path) -> None:
    keys_dir = tmp_path / "keys"
    keys_dir.mkdir(mode=0o755)
    os.chmod(keys_dir, 0o755)
    manager = DiskKeyManager(keys_dir)
    manager.generate("x509-a", "ec-p256")
    assert mode(keys_dir) == 0o700
    path = keys_dir / "x509-a.key.pem"
    os.chmod(path, 0o644)
    assert manager.load("x509-a") is not None
    assert mode(path) == 0o600


def test_slot_ids_cannot_escape_the_directory(tmp_path: Path) -> None:
    manager = DiskKeyManager(tmp_path / "keys")
    for bad in ("../evil", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(KeyManagerError, match="invalid key slot id"):
            manager.generate(bad, "ec-p256")
    assert not (tmp_path / "evil.key.pem").exists()


def test_corrupt_key_file_is_a_clear_error(tmp_path: Path) -> None:
    manager = DiskKeyManager(tmp_path)
    (tmp_path / "x509-bad.key.pem").write_bytes(b"not a key")
    with pytest.raises(KeyManagerError, match="not an unencrypted PEM private key"):
        manager.load("x509-bad")


def test_unknown_key_kind_refused() -> None:
    with pytest.raises(ValueError, match="unsupported CA key kind 'ed448'"):
        check_key_kind("ed448")
    with pytest.raises(ValueError, match="unsupported CA key kind"):
        MemoryKeyManager().generate("x509-a", "dsa-1024")


def test_memory_key_manager() -> None:
    manager = MemoryKeyManager()
    handle = manager.generate("x509-a", "ec-p384")
    assert manager.load("x509-a") is handle
    assert manager.slot_ids() == ["x509-a"]
    manager.delete("x509-a")
    assert manager.load("x509-a") is None


# --- CSRs ------------------------------------------------------------------------------------------------


def make_csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "workload")])
    )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP384R1())],
    ids=["p256", "p384"],
)
def test_good_csr_yields_its_public_key(key: ec.EllipticCurvePrivateKey) -> None:
    public = csr_public_key(make_csr(key))
    assert public_keys_equal(public, key.public_key())


def test_rsa_2048_csr_accepted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert public_keys_equal(csr_public_key(make_csr(key)), key.public_key())


def test_weak_and_wrong_keys_refused() -> None:
    small_rsa = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    with pytest.raises(WeakKeyError, match="RSA key of 1024 bits is too weak"):
        csr_public_key(make_csr(small_rsa))
    p521 = ec.generate_private_key(ec.SECP521R1())
    with pytest.raises(WeakKeyError, match="curve secp521r1 is refused"):
        csr_public_key(make_csr(p521))
    k1 = ec.generate_private_key(ec.SECP256K1())
    with pytest.raises(WeakKeyError, match="curve secp256k1"):
        csr_public_key(make_csr(k1))
    edkey = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(WeakKeyError, match="Ed25519 keys are refused"):
        csr_public_key(make_csr(edkey))
    with pytest.raises(WeakKeyError, match="refused"):
        check_public_key(object())
    # WeakKeyError is a BadCsrError, so the node API maps both to InvalidArgument with one clause.
    assert issubclass(WeakKeyError, BadCsrError)


def test_malformed_csrs_refused_precisely() -> None:
    good = make_csr(ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(BadCsrError, match="CSR is empty"):
        csr_public_key(b"")
    with pytest.raises(BadCsrError, match="not a valid DER PKCS#10"):
        csr_public_key(b"\x30\x03\x02\x01\x01")
    with pytest.raises(BadCsrError, match="not a valid DER PKCS#10"):
        csr_public_key(good[:-5])
    with pytest.raises(BadCsrError, match="is PEM"):
        csr_public_key(x509.load_der_x509_csr(good).public_bytes(serialization.Encoding.PEM))
    with pytest.raises(BadCsrError, match="at most"):
        csr_public_key(b"\x30" * (MAX_CSR_BYTES + 1))
    with pytest.raises(BadCsrError, match="must be DER bytes"):
        csr_public_key("text")  # type: ignore[arg-type]


def test_csr_with_broken_signature_refused() -> None:
    der = bytearray(make_csr(ec.generate_private_key(ec.SECP256R1())))
    # Flip a bit in the subject's common name ("workload" -> "workloae"): still DER, signature now wrong.
    index = der.index(b"workload")
    der[index + 7] ^= 0x01
    with pytest.raises(BadCsrError, match="signature does not verify"):
        csr_public_key(bytes(der))
