"""X509-SVIDs: a certificate chain and the private key of its leaf, in the Workload API's encodings.

Constructing an :class:`X509Svid` checks what a consumer would otherwise discover too late: that the key
belongs to the leaf, that the leaf follows the X509-SVID profile, and that every other certificate in the
chain may sign. Expiry is not checked here (an expired SVID is still an SVID); verification decides that.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.sdk.errors import SpiffeIdError, SvidError
from tessera.sdk.keys import (
    PrivateKey,
    as_public_key,
    load_private_key_der,
    load_private_key_pem,
    private_key_to_der,
    private_key_to_pem,
    public_keys_equal,
)
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.x509profile import (
    MALFORMED_CERTIFICATE_ERRORS,
    check_parseable,
    check_signing_certificate,
    check_x509_svid_leaf,
    load_der_certificate,
    uri_sans,
)

MAX_HINT_BYTES = 1024


def parse_der_certificates(data: bytes) -> list[x509.Certificate]:
    """Parses concatenated DER certificates (the Workload API's chain and bundle encoding)."""
    certs: list[x509.Certificate] = []
    offset = 0
    view = memoryview(data)
    while offset < len(data):
        length = _der_element_length(view, offset)
        certs.append(load_der_certificate(bytes(view[offset : offset + length]), f"certificate #{len(certs) + 1}"))
        offset += length
    return certs


def _der_element_length(data: memoryview, offset: int) -> int:
    """Total length (header + content) of the DER SEQUENCE starting at ``offset``."""
    remaining = len(data) - offset
    if remaining < 2 or data[offset] != 0x30:
        raise SvidError(f"certificate data is not DER: expected a SEQUENCE at byte {offset}")
    first = data[offset + 1]
    if first < 0x80:
        header, content = 2, first
    else:
        count = first & 0x7F
        if count == 0 or count > 4 or remaining < 2 + count:
            raise SvidError(f"certificate data has an invalid DER length at byte {offset}")
        content = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
        header = 2 + count
    if header + content > remaining:
        raise SvidError(f"certificate data is truncated at byte {offset}")
    return header + content


def parse_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Parses every ``CERTIFICATE`` block of a PEM file, in order."""
    if b"-----BEGIN" not in data:
        if data.strip():
            raise SvidError("data is not PEM: no '-----BEGIN CERTIFICATE-----' block")
        return []
    try:
        certs = x509.load_pem_x509_certificates(data)
    except MALFORMED_CERTIFICATE_ERRORS as exc:
        raise SvidError(f"PEM certificates could not be parsed: {exc}") from None
    for index, cert in enumerate(certs, start=1):
        check_parseable(cert, f"certificate #{index}")
    return certs


def certificates_to_der(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in certs)


def certificates_to_pem(certs: Iterable[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def spiffe_id_from_certificate(cert: x509.Certificate) -> SpiffeId:
    """The SPIFFE ID in a certificate's single URI SAN (raises :class:`SvidError` otherwise)."""
    uris = uri_sans(cert)
    if len(uris) != 1:
        raise SvidError(f"certificate has {len(uris)} URI SANs; a SPIFFE certificate must have exactly one")
    try:
        return SpiffeId.parse(uris[0])
    except SpiffeIdError as exc:
        raise SvidError(f"certificate's URI SAN is not a SPIFFE ID: {exc}") from None


@dataclass(frozen=True, slots=True, eq=False)
class X509Svid:
    """An X509-SVID: the SPIFFE ID, the chain (leaf first, then intermediates) and the leaf's private key."""

    spiffe_id: SpiffeId
    cert_chain: tuple[x509.Certificate, ...]
    private_key: PrivateKey
    hint: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.cert_chain, tuple):
            object.__setattr__(self, "cert_chain", tuple(self.cert_chain))
        if not self.cert_chain:
            raise SvidError("X509-SVID has an empty certificate chain")
        leaf_id = check_x509_svid_leaf(self.cert_chain[0])
        if leaf_id != self.spiffe_id:
            raise SvidError(f"X509-SVID is for {self.spiffe_id} but its leaf certificate names {leaf_id}")
        for cert in self.cert_chain[1:]:
            check_signing_certificate(cert)
        if not public_keys_equal(as_public_key(self.cert_chain[0].public_key()), self.private_key.public_key()):
            raise SvidError("X509-SVID private key does not match the leaf certificate's public key")
        if len(self.hint.encode()) > MAX_HINT_BYTES:
            raise SvidError(f"X509-SVID hint is longer than {MAX_HINT_BYTES} bytes")

    @classmethod
    def from_chain(cls, cert_chain: Sequence[x509.Certificate], private_key: PrivateKey, hint: str = "") -> X509Svid:
        """Builds an SVID taking the SPIFFE ID from the leaf."""
        if not cert_chain:
            raise SvidError("X509-SVID has an empty certificate chain")
        return cls(check_x509_svid_leaf(cert_chain[0]), tuple(cert_chain), private_key, hint)

    @classmethod
    def parse_der(cls, chain_der: bytes, key_der: bytes, hint: str = "") -> X509Svid:
        """Parses the Workload API encoding: concatenated DER chain and PKCS#8 DER key."""
        return cls.from_chain(parse_der_certificates(chain_der), load_private_key_der(key_der), hint)

    @classmethod
    def parse_pem(cls, chain_pem: bytes, key_pem: bytes, hint: str = "") -> X509Svid:
        return cls.from_chain(parse_pem_certificates(chain_pem), load_private_key_pem(key_pem), hint)

    @property
    def leaf(self) -> x509.Certificate:
        return self.cert_chain[0]

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        return self.cert_chain[1:]

    @property
    def expires_at(self) -> dt.datetime:
        """When the leaf expires (aware UTC)."""
        return self.leaf.not_valid_after_utc

    @property
    def issued_at(self) -> dt.datetime:
        return self.leaf.not_valid_before_utc

    def chain_der(self) -> bytes:
        return certificates_to_der(self.cert_chain)

    def chain_pem(self) -> bytes:
        return certificates_to_pem(self.cert_chain)

    def key_der(self) -> bytes:
        """Unencrypted PKCS#8 DER. This is a secret: never log it."""
        return private_key_to_der(self.private_key)

    def key_pem(self) -> bytes:
        """Unencrypted PKCS#8 PEM. This is a secret: never log it."""
        return private_key_to_pem(self.private_key)

    def __eq__(self, other: object) -> bool:
        # Key objects compare by identity, so compare what is on the wire instead.
        if not isinstance(other, X509Svid):
            return NotImplemented
        return (
            self.spiffe_id == other.spiffe_id
            and self.hint == other.hint
            and self.chain_der() == other.chain_der()
            and self.key_der() == other.key_der()
        )

    def __hash__(self) -> int:
        return hash((self.spiffe_id, self.chain_der()))

    def __repr__(self) -> str:
        # The dataclass repr would print the key object; keep secrets and noise out of logs.
        expires = self.expires_at.isoformat()
        return f"X509Svid(spiffe_id={str(self.spiffe_id)!r}, expires_at={expires}, hint={self.hint!r})"
