"""Checking certificate signing requests and the public keys they carry.

Agents send DER PKCS#10 CSRs; the server uses only the public key from them (the SPIFFE ID, TTL and DNS
names come from the registration entry). So what matters here is that the CSR is well formed, that its
self-signature verifies (the requester holds the private key, and the bytes were not corrupted), and that
the key is one the trust domain accepts. Each failure raises a precise :class:`BadCsrError` /
:class:`WeakKeyError` whose message the node API returns as-is with InvalidArgument.
"""

from __future__ import annotations

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tessera.sdk.keys import PublicKey
from tessera.server.errors import BadCsrError, WeakKeyError

MAX_CSR_BYTES = 16 * 1024
"""A P-384 or RSA-4096 CSR is well under 2 KiB; anything much larger is not a CSR worth parsing."""

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
"""Bigger RSA keys are not stronger in any useful way, and verifying their CSRs costs the server time."""

ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


def check_public_key(public_key: object) -> PublicKey:
    """Returns ``public_key`` if the trust domain accepts it for an SVID, else raises :class:`WeakKeyError`.

    Accepted: RSA of 2048 to 8192 bits with an odd public exponent of at least 65537; EC on P-256 or P-384.
    Everything else (small RSA, other curves, Ed25519, DSA...) is refused: not every TLS peer can use it.
    """
    if isinstance(public_key, rsa.RSAPublicKey):
        bits = public_key.key_size
        if bits < MIN_RSA_BITS:
            raise WeakKeyError(f"RSA key of {bits} bits is too weak; at least {MIN_RSA_BITS} bits are required")
        if bits > MAX_RSA_BITS:
            raise WeakKeyError(f"RSA key of {bits} bits is too large; at most {MAX_RSA_BITS} bits are accepted")
        exponent = public_key.public_numbers().e
        if exponent < 65537 or exponent % 2 == 0:
            raise WeakKeyError(f"RSA public exponent {exponent} is refused; use 65537")
        return public_key
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        curve = public_key.curve.name
        if curve not in ALLOWED_CURVES:
            raise WeakKeyError(f"EC key on curve {curve} is refused; use P-256 or P-384")
        return public_key
    name = type(public_key).__name__.removeprefix("_").replace("PublicKey", "") or type(public_key).__name__
    raise WeakKeyError(f"{name} keys are refused; use an EC P-256/P-384 or RSA (2048 bits or more) key")


def csr_public_key(der: bytes) -> PublicKey:
    """The checked public key of a DER PKCS#10 CSR, the one thing the server takes from it, once the CSR's
    shape, size, key and self-signature pass; raises :class:`BadCsrError` on any fault."""
    if not isinstance(der, bytes | bytearray | memoryview):
        raise BadCsrError(f"CSR must be DER bytes, got {type(der).__name__}")
    der = bytes(der)
    if not der:
        raise BadCsrError("CSR is empty")
    if len(der) > MAX_CSR_BYTES:
        raise BadCsrError(f"CSR is {len(der)} bytes; at most {MAX_CSR_BYTES} are accepted")
    if der.lstrip().startswith(b"-----BEGIN"):
        raise BadCsrError("CSR is PEM; send the DER encoding (the bytes between the PEM lines, base64-decoded)")
    try:
        csr = x509.load_der_x509_csr(der)
    except (ValueError, x509.InvalidVersion) as exc:
        raise BadCsrError(f"CSR is not a valid DER PKCS#10 request: {exc}") from None
    try:
        raw_key = csr.public_key()
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise WeakKeyError(f"CSR public key is of an unsupported type: {exc}") from None
    public_key = check_public_key(raw_key)
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise BadCsrError(f"CSR signature cannot be checked: {exc}") from None
    if not valid:
        raise BadCsrError("CSR signature does not verify (the request was corrupted or not signed by its key)")
    return public_key
