"""Certificate revocation lists from the Workload API (``crl`` fields): is this peer certificate revoked?

The agent hands workloads the CRLs its server signed (one per CA, DER). TLS contexts check the peer's leaf
against them right after the handshake, next to the SPIFFE ID check: OpenSSL's own CRL checking
(``VERIFY_CRL_CHECK_LEAF``) would refuse every peer whose CA has no CRL at all, such as the CAs of a
federated trust domain, and could not change CRLs on a live context.

A CRL only counts once its signature verifies with the certificate that issued the leaf (a bundle CA or the
intermediate the peer presented, which the handshake already verified); an unverifiable CRL is ignored
rather than trusted, so a forged CRL cannot cut anyone off. Staleness (``nextUpdate`` passed) does not
disable a CRL: a revoked certificate stays revoked.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from tessera.sdk.errors import TesseraError

log = logging.getLogger(__name__)

_SHA256 = hashes.SHA256()


class CrlError(TesseraError):
    """A CRL could not be parsed."""


def _aki(cert_or_crl: x509.Certificate | x509.CertificateRevocationList) -> bytes | None:
    try:
        value = cert_or_crl.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        return None
    return value.key_identifier


def _ski(cert: x509.Certificate) -> bytes | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    except x509.ExtensionNotFound:
        return None


def parse_crls(ders: Iterable[bytes]) -> list[x509.CertificateRevocationList]:
    """Parses DER CRLs (CrlError naming the bad one)."""
    out = []
    for index, der in enumerate(ders):
        try:
            out.append(x509.load_der_x509_crl(der))
        except ValueError as exc:
            raise CrlError(f"CRL #{index} is not a DER CRL: {exc}") from None
    return out


def crls_to_pem(ders: Iterable[bytes]) -> bytes:
    """Concatenated PEM CRLs: what nginx ``ssl_crl``, Apache ``SSLCARevocationFile`` and OpenSSL read."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in parse_crls(ders))


@dataclass(slots=True)
class _Crl:
    crl: x509.CertificateRevocationList
    issuer: bytes  # DER of the issuer name
    aki: bytes | None
    _serials: frozenset[int] | None = None

    def lists(self, serial: int) -> bool:
        """Set lookup: cryptography's own lookup scans the whole list on every call."""
        if self._serials is None:
            self._serials = frozenset(r.serial_number for r in self.crl)
        return serial in self._serials


class RevocationChecker:
    """Answers "is this leaf revoked?" from a set of CRLs. Thread-safe; verified signatures are cached."""

    def __init__(self, crls: Sequence[bytes] | Sequence[x509.CertificateRevocationList] = ()) -> None:
        parsed: list[x509.CertificateRevocationList] = []
        ders: list[bytes] = []
        for item in crls:
            if isinstance(item, bytes | bytearray | memoryview):
                ders.append(bytes(item))
            else:
                parsed.append(item)
        for index, der in enumerate(ders):
            try:
                parsed.append(x509.load_der_x509_crl(der))
            except ValueError as exc:
                log.warning("ignoring CRL #%d from the Workload API: %s", index, exc)
        self._by_issuer: dict[bytes, list[_Crl]] = {}
        for crl in parsed:
            entry = _Crl(crl, crl.issuer.public_bytes(), _aki(crl))
            self._by_issuer.setdefault(entry.issuer, []).append(entry)
        self._verified: dict[tuple[int, bytes], bool] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self._by_issuer)

    def __len__(self) -> int:
        return sum(len(v) for v in self._by_issuer.values())

    def _signature_ok(self, entry: _Crl, issuer_cert: x509.Certificate) -> bool:
        key = (id(entry), issuer_cert.fingerprint(_SHA256))
        with self._lock:
            cached = self._verified.get(key)
        if cached is not None:
            return cached
        try:
            ok = entry.crl.is_signature_valid(issuer_cert.public_key())  # type: ignore[arg-type]
        except (TypeError, ValueError):
            ok = False
        if not ok:
            log.warning("ignoring a CRL for %s whose signature does not verify", issuer_cert.subject.rfc4514_string())
        with self._lock:
            self._verified[key] = ok
        return ok

    def is_revoked(self, leaf: x509.Certificate, issuers: Iterable[x509.Certificate]) -> bool:
        """True when a CRL signed by the leaf's issuer lists its serial. ``issuers``: candidate issuer certificates
        (the peer's presented intermediates, then the bundle CAs); the one whose subject and SKI match the
        leaf's issuer and AKI is used to verify the CRL."""
        entries = self._by_issuer.get(leaf.issuer.public_bytes())
        if not entries:
            return False
        leaf_aki = _aki(leaf)
        issuer_cert = None
        for cand in issuers:
            if cand.subject.public_bytes() != leaf.issuer.public_bytes():
                continue
            if leaf_aki is not None and _ski(cand) not in (None, leaf_aki):
                continue
            issuer_cert = cand
            break
        if issuer_cert is None:
            return False
        for entry in entries:
            if leaf_aki is not None and entry.aki is not None and entry.aki != leaf_aki:
                continue
            if not entry.lists(leaf.serial_number):
                continue
            if self._signature_ok(entry, issuer_cert):
                return True
        return False


__all__ = ["CrlError", "RevocationChecker", "crls_to_pem", "parse_crls"]
