"""Certificate revocation lists: one per X.509 CA, signed by that CA, listing the serials it issued that were
revoked before their expiry.

Every held CA gets a CRL, even an empty one, because relying parties that check CRLs with OpenSSL (nginx's
``ssl_crl``) refuse a certificate whose issuer has no CRL at all. A serial leaves the list once the
certificate would have expired anyway, so CRLs stay small. Pure: no I/O, instants are passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed448, ed25519

from tessera.sdk.keys import PrivateKey

DEFAULT_CRL_VALIDITY = timedelta(hours=24)
"""nextUpdate is this far ahead; the server re-signs at half of it (and whenever the list changes)."""


@dataclass(frozen=True, slots=True)
class RevokedSerial:
    serial: int
    revoked_at: datetime


def serial_hex(serial: int) -> str:
    """The form serials are stored and shown in: lowercase hex, no leading zeros (as `agent show` prints)."""
    return format(serial, "x")


def parse_serial(text: str) -> int:
    """Accepts hex with or without ``0x`` and colons (``openssl x509 -serial`` prints ``serial=0A1B...``)."""
    cleaned = text.strip().lower().removeprefix("serial=").removeprefix("0x").replace(":", "")
    if not cleaned:
        raise ValueError("serial is empty")
    try:
        value = int(cleaned, 16)
    except ValueError:
        raise ValueError(f"serial {text!r} is not hexadecimal") from None
    if value <= 0:
        raise ValueError(f"serial {text!r} must be positive")
    return value


def build_crl(
    *,
    issuer_cert: x509.Certificate,
    issuer_key: PrivateKey,
    revoked: Iterable[RevokedSerial],
    now: datetime,
    validity: timedelta = DEFAULT_CRL_VALIDITY,
    backdate: timedelta = timedelta(seconds=10),
) -> x509.CertificateRevocationList:
    """A CRL from ``issuer_cert``'s key. The CRL number is the signing instant in milliseconds, so a re-signed
    list always has a higher number than the one it replaces (even across servers sharing the CA)."""
    this_update = now.replace(microsecond=0) - backdate
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(issuer_cert.subject)
        .last_update(this_update)
        .next_update(now.replace(microsecond=0) + validity)
        .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
    )
    for item in sorted(revoked, key=lambda r: r.serial):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(item.serial).revocation_date(item.revoked_at).build()
        )
    algorithm = None if isinstance(issuer_key, ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey) else hashes.SHA256()
    return builder.sign(issuer_key, algorithm)


def crl_der(crl: x509.CertificateRevocationList) -> bytes:
    return crl.public_bytes(serialization.Encoding.DER)


def crls_to_pem(ders: Iterable[bytes]) -> bytes:
    """Concatenated PEM CRLs (what nginx's ``ssl_crl`` and OpenSSL's ``-CRLfile`` read)."""
    return b"".join(x509.load_der_x509_crl(der).public_bytes(serialization.Encoding.PEM) for der in ders)
