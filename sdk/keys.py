"""Key types, generation and serialization shared by the SDK, the server CA and the agent.

One module owns the list of key kinds so that the server's CA, the agent's workload keys and the test CA
cannot drift apart on what a "p256 key" is or how its key ID is computed.
"""

from __future__ import annotations

from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tessera.sdk.errors import SvidError

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey

#: Key kinds accepted by :func:`generate_key` (and by server/agent configuration).
KEY_KINDS: tuple[str, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")

_CURVES: dict[str, ec.EllipticCurve] = {"ec-p256": ec.SECP256R1(), "ec-p384": ec.SECP384R1()}
_RSA_SIZES = {"rsa-2048": 2048, "rsa-3072": 3072, "rsa-4096": 4096}


def generate_key(kind: str = "ec-p256") -> PrivateKey:
    """A fresh private key of the given kind (see :data:`KEY_KINDS`)."""
    if kind in _CURVES:
        return ec.generate_private_key(_CURVES[kind])
    if kind in _RSA_SIZES:
        return rsa.generate_private_key(public_exponent=65537, key_size=_RSA_SIZES[kind])
    raise ValueError(f"unknown key kind {kind!r}; expected one of {', '.join(KEY_KINDS)}")


def key_kind(key: PrivateKey | PublicKey) -> str:
    """The kind name of a key, e.g. ``ec-p256`` (``ed25519`` and other curves/sizes are named too)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}.get(
            key.curve.name, f"ec-{key.curve.name}"
        )
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"rsa-{key.key_size}"
    return "ed25519"


def public_key_of(key: PrivateKey) -> PublicKey:
    return key.public_key()


def as_private_key(obj: object) -> PrivateKey:
    """Narrows a key loaded by ``cryptography`` to the kinds SVIDs may carry, or raises :class:`SvidError`."""
    if isinstance(obj, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey):
        return obj
    raise SvidError(f"unsupported private key type {type(obj).__name__}; expected an EC, RSA or Ed25519 key")


def as_public_key(obj: object) -> PublicKey:
    """Narrows a public key to the kinds SVIDs and bundles may carry, or raises :class:`SvidError`."""
    if isinstance(obj, ec.EllipticCurvePublicKey | rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        return obj
    raise SvidError(f"unsupported public key type {type(obj).__name__}; expected an EC, RSA or Ed25519 key")


def public_key_der(public_key: PublicKey) -> bytes:
    """The DER SubjectPublicKeyInfo: the canonical form for comparing keys."""
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def public_keys_equal(a: PublicKey, b: PublicKey) -> bool:
    return public_key_der(a) == public_key_der(b)


def key_id(public_key: PublicKey) -> str:
    """Hex SHA-1 of the SubjectPublicKeyInfo's subjectPublicKey bit string: the RFC 5280 SKI value.

    Used as the Subject Key Identifier of certificates and as the default JWT ``kid``, so a key has the
    same name everywhere it appears.
    """
    return x509.SubjectKeyIdentifier.from_public_key(public_key).digest.hex()


def signature_hash(private_key: PrivateKey) -> hashes.HashAlgorithm | None:
    """The hash to sign certificates with for this key (None for Ed25519, which hashes internally)."""
    if isinstance(private_key, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(private_key, ec.EllipticCurvePrivateKey):
        if private_key.curve.key_size >= 521:
            return hashes.SHA512()
        if private_key.curve.key_size >= 384:
            return hashes.SHA384()
    return hashes.SHA256()


def private_key_to_der(private_key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 DER, the Workload API's key encoding."""
    return private_key.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def private_key_to_pem(private_key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM (``BEGIN PRIVATE KEY``): what nginx, Apache and envoy read."""
    return private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_private_key_der(data: bytes) -> PrivateKey:
    """Loads an unencrypted DER private key (PKCS#8, or a traditional SEC1/PKCS#1 encoding)."""
    try:
        key = serialization.load_der_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SvidError(f"private key is not valid unencrypted DER: {exc}") from None
    return as_private_key(key)


def load_private_key_pem(data: bytes) -> PrivateKey:
    """Loads an unencrypted PEM private key."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SvidError(f"private key is not valid unencrypted PEM: {exc}") from None
    return as_private_key(key)


def load_public_key_der(data: bytes) -> PublicKey:
    try:
        key = serialization.load_der_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise SvidError(f"public key is not a valid DER SubjectPublicKeyInfo: {exc}") from None
    return as_public_key(key)
