"""The node API checks a batch's CSRs on several threads and still behaves like one sequential check."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from tessera.proto import node_pb2 as npb
from tessera.sdk.keys import public_keys_equal
from tessera.server.api import node as node_module
from tessera.server.api.status import ApiError


def _csr(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.DER)
    )


@pytest.fixture(scope="module")
def keys() -> list[ec.EllipticCurvePrivateKey]:
    return [ec.generate_private_key(ec.SECP256R1()) for _ in range(8)]


@pytest.fixture(params=[1, 2, 4])
def threads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    monkeypatch.setattr(node_module, "CSR_CHECK_THREADS", request.param)
    return int(request.param)


def test_keys_come_back_in_batch_order(threads: int, keys: list[ec.EllipticCurvePrivateKey]) -> None:
    requests = [npb.X509SignRequest(entry_id=f"e{i}", csr=_csr(keys[i % len(keys)])) for i in range(203)]
    checked = asyncio.run(node_module._check_csrs_parallel(requests))
    assert len(checked) == len(requests)
    for i, public_key in enumerate(checked):
        assert public_keys_equal(public_key, keys[i % len(keys)].public_key())


def test_first_bad_csr_in_batch_order_is_reported(threads: int, keys: list[ec.EllipticCurvePrivateKey]) -> None:
    good = _csr(keys[0])
    corrupted = bytearray(good)
    corrupted[-5] ^= 0x01  # inside the signature: parses, does not verify
    weak = _csr(rsa.generate_private_key(public_exponent=65537, key_size=1024))
    requests = [npb.X509SignRequest(entry_id=f"e{i}", csr=good) for i in range(200)]
    requests[170] = npb.X509SignRequest(entry_id="e170", csr=weak)  # a later chunk's failure...
    requests[120] = npb.X509SignRequest(entry_id="e120", csr=bytes(corrupted))  # ...is not the one reported
    with pytest.raises(ApiError) as info:
        asyncio.run(node_module._check_csrs_parallel(requests))
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert info.value.message.startswith("entry e120: CSR signature does not verify"), info.value.message
