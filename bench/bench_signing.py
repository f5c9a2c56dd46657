"""Signing throughput: CSR -> X509-SVID with `cryptography` directly vs. through the server's CA manager.

    .venv/bin/python bench/bench_signing.py [--n 2000] [--ca-key-kind ec-p256] [--csr-key-kind ec-p256]

Every loop does the work a correct signer must do per CSR (see :data:`EXPLANATION`): parse the DER CSR,
verify its self-signature, check the key (type, curve, size), build a certificate with the X509-SVID
extensions, sign it with the same CA key, and DER-encode the result (what the node API returns). There are
two plain loops: the idiomatic one (fluent ``CertificateBuilder``), and a tuned one using the same shortcuts
as the server's profile code (one-call builder, constant extensions DER-encoded once), so the server is
compared with the fastest plain code too, not only with the obvious one. The CA manager's loop adds what the
server really does on top: SPIFFE ID, DNS name and TTL checks, notAfter capping and the chain assembly.

The end-to-end measurement (batch RPC over gRPC) reuses :func:`make_csrs`, :func:`make_manager`,
:func:`plain_loop`, :func:`plain_loop_tuned`, :func:`manager_loop` and :func:`measure` from here.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID

from tessera.sdk.keys import generate_key
from tessera.server.ca.config import CaConfig
from tessera.server.ca.csr import csr_public_key
from tessera.server.ca.journal import MemoryJournalStore
from tessera.server.ca.keymanager import MemoryKeyManager
from tessera.server.ca.manager import CaManager

TRUST_DOMAIN = "bench.example.org"

EXPLANATION = (
    "Per CSR every loop parses the DER CSR, verifies its signature, checks the key (EC P-256/P-384 or RSA\n"
    "2048-8192 bits, e >= 65537), builds the X509-SVID (same subject, issuer, validity, serial size and the six\n"
    "extensions BC, KU, EKU, SKI, AKI, URI SAN), signs it with the same CA key and DER-encodes it: the work a\n"
    "correct signer cannot skip. 'tuned' builds the certificate the way the server's profile code does (one\n"
    "builder call, constant extensions DER-encoded once); 'idiomatic' uses the fluent builder. Plain loops\n"
    "run on one thread."
)


@dataclass(frozen=True)
class Figure:
    label: str
    count: int
    seconds: float
    """Best (shortest) of the repeats: the least disturbed by other processes on the machine."""
    median_seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        median_rate = self.count / self.median_seconds if self.median_seconds > 0 else float("inf")
        return (
            f"{self.label:<52} {self.per_second:>7.0f} SVIDs/s  (best of repeats; median {median_rate:.0f}/s, "
            f"{self.count} CSRs in {self.seconds * 1000:.0f} ms)"
        )


def spiffe_id_for(index: int) -> str:
    return f"spiffe://{TRUST_DOMAIN}/bench/workload-{index}"


def make_csrs(n: int, key_kind: str = "ec-p256", distinct_keys: int = 50) -> list[bytes]:
    """``n`` DER CSRs. Keys are reused round-robin (``distinct_keys`` of them): generating 2000 RSA keys would
    dominate the run, and the server's work does not depend on whether two CSRs share a key."""
    keys = [generate_key(key_kind) for _ in range(max(1, min(distinct_keys, n)))]
    csrs = []
    for i in range(n):
        key = keys[i % len(keys)]
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"workload-{i}")]))
            .sign(key, hashes.SHA256())
        )
        csrs.append(csr.public_bytes(serialization.Encoding.DER))
    return csrs


def make_manager(ca_key_kind: str = "ec-p256", now: datetime | None = None) -> CaManager:
    """A CA manager with keys and journal in memory (the signing path does not touch the disk)."""
    manager = CaManager(TRUST_DOMAIN, MemoryKeyManager(), MemoryJournalStore(), CaConfig(ca_key_kind=ca_key_kind))
    manager.load()
    manager.tick(now)
    return manager


def check_key(public_key: object) -> None:
    """The key policy every signer must apply (the server's is in tessera.server.ca.csr), written plainly."""
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name not in ("secp256r1", "secp384r1"):
            raise ValueError(f"EC curve {public_key.curve.name} refused")
    elif isinstance(public_key, rsa.RSAPublicKey):
        exponent = public_key.public_numbers().e
        if not 2048 <= public_key.key_size <= 8192 or exponent < 65537 or exponent % 2 == 0:
            raise ValueError("RSA key refused")
    else:
        raise ValueError(f"{type(public_key).__name__} refused")


def _key_usage(rsa_key: bool) -> x509.KeyUsage:
    """digitalSignature, plus keyEncipherment for an RSA key (the SPIFFE leaf profile)."""
    return x509.KeyUsage(True, False, rsa_key, False, False, False, False, False, False)


def _hash_for(ca_key: object) -> hashes.HashAlgorithm:
    """SHA-384 for a P-384 CA key, else SHA-256: what the server signs with."""
    if isinstance(ca_key, ec.EllipticCurvePrivateKey) and ca_key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _checked_key(index: int, der: bytes) -> CertificatePublicKeyTypes:
    csr = x509.load_der_x509_csr(der)
    if not csr.is_signature_valid:
        raise ValueError(f"CSR #{index} has a bad signature")
    public_key = csr.public_key()
    check_key(public_key)
    return public_key


def plain_loop(csrs: Sequence[bytes], ca_cert: x509.Certificate, ca_key: object) -> list[bytes]:
    """The baseline: what a minimal signer written straight against `cryptography` does per CSR."""
    now = datetime.now(UTC)
    not_before = now - timedelta(seconds=10)
    not_after = now + timedelta(hours=1)
    issuer = ca_cert.subject
    aki = x509.AuthorityKeyIdentifier(
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest, None, None
    )
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera")])
    out = []
    for i, der in enumerate(csrs):
        public_key = _checked_key(i, der)
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(isinstance(public_key, rsa.RSAPublicKey)), critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id_for(i))]), critical=False
            )
            .sign(ca_key, _hash_for(ca_key))  # type: ignore[arg-type]
        )
        out.append(cert.public_bytes(serialization.Encoding.DER))
    return out


def _preencoded(value: x509.ExtensionType, critical: bool) -> x509.Extension[x509.ExtensionType]:
    return x509.Extension(value.oid, critical, x509.UnrecognizedExtension(value.oid, value.public_bytes()))


def plain_loop_tuned(csrs: Sequence[bytes], ca_cert: x509.Certificate, ca_key: object) -> list[bytes]:
    """The same work as :func:`plain_loop`, with the server's construction shortcuts (same DER out)."""
    now = datetime.now(UTC).replace(tzinfo=None)
    not_before = now - timedelta(seconds=10)
    not_after = now + timedelta(hours=1)
    issuer = ca_cert.subject
    ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    aki = _preencoded(x509.AuthorityKeyIdentifier(ski, None, None), critical=False)
    bc = _preencoded(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    ku = {rsa_key: _preencoded(_key_usage(rsa_key), critical=True) for rsa_key in (False, True)}
    eku = _preencoded(
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
    )
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera")])
    out = []
    for i, der in enumerate(csrs):
        public_key = _checked_key(i, der)
        extensions: list[x509.Extension[x509.ExtensionType]] = [
            bc,
            ku[isinstance(public_key, rsa.RSAPublicKey)],
            eku,
            x509.Extension(
                ExtensionOID.SUBJECT_KEY_IDENTIFIER, False, x509.SubjectKeyIdentifier.from_public_key(public_key)
            ),
            aki,
            x509.Extension(
                ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
                False,
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id_for(i))]),
            ),
        ]
        builder = x509.CertificateBuilder(
            issuer, subject, public_key, x509.random_serial_number(), not_before, not_after, extensions
        )
        cert = builder.sign(ca_key, _hash_for(ca_key))  # type: ignore[arg-type]
        out.append(cert.public_bytes(serialization.Encoding.DER))
    return out


def manager_loop(csrs: Sequence[bytes], manager: CaManager) -> list[bytes]:
    """The server's path: checked CSR -> CaManager.sign_x509_svid -> DER chain."""
    out = []
    for i, der in enumerate(csrs):
        chain = manager.ca.sign_x509_svid(csr_public_key(der), spiffe_id_for(i), ttl_seconds=3600)
        out.append(b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain))
    return out


def measure(label: str, fn: Callable[[], Sequence[object]], count: int, repeats: int = 3) -> Figure:
    """Runs ``fn`` ``repeats`` times (garbage collection off while timing) and keeps the best and median."""
    times = []
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            start = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - start
        finally:
            gc.enable()
        if len(result) != count:
            raise RuntimeError(f"{label}: produced {len(result)} results for {count} CSRs")
        times.append(elapsed)
    return Figure(label, count, min(times), statistics.median(times))


def run(n: int, ca_key_kind: str, csr_key_kind: str, repeats: int) -> tuple[Figure, Figure, Figure]:
    csrs = make_csrs(n, csr_key_kind)
    manager = make_manager(ca_key_kind)
    active = manager.active_x509_authority
    assert active is not None
    ca_cert, ca_key = active.certificate, active.key.signer
    # Warm up every path (imports, caches) on a few CSRs before timing.
    plain_loop(csrs[:20], ca_cert, ca_key)
    plain_loop_tuned(csrs[:20], ca_cert, ca_key)
    manager_loop(csrs[:20], manager)
    plain = measure(PLAIN_LABEL, lambda: plain_loop(csrs, ca_cert, ca_key), n, repeats)
    tuned = measure(TUNED_LABEL, lambda: plain_loop_tuned(csrs, ca_cert, ca_key), n, repeats)
    managed = measure("CA manager sign path (CSR check + sign)", lambda: manager_loop(csrs, manager), n, repeats)
    return plain, tuned, managed


PLAIN_LABEL = "plain loop, idiomatic (cryptography directly)"
TUNED_LABEL = "plain loop, tuned (cryptography directly)"


def ratio_line(label: str, numerator: Figure, denominator: Figure) -> str:
    """Ratio of the best figures, and of the medians."""
    best = numerator.per_second / denominator.per_second
    median = denominator.median_seconds / numerator.median_seconds
    return f"{label:<52} {best:>7.1%}  (of medians {median:.1%})"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="CSRs per run (default 2000)")
    parser.add_argument("--ca-key-kind", default="ec-p256")
    parser.add_argument("--csr-key-kind", default="ec-p256")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        parser.error("--n and --repeats must be positive")
    python = sys.version.split()[0]
    print(f"signing benchmark: {args.n} CSRs ({args.csr_key_kind}), CA key {args.ca_key_kind}, Python {python}")
    print(EXPLANATION)
    plain, tuned, managed = run(args.n, args.ca_key_kind, args.csr_key_kind, args.repeats)
    for figure in (plain, tuned, managed):
        print(figure.line())
    print(ratio_line("ratio CA manager / idiomatic plain loop", managed, plain))
    print(ratio_line("ratio CA manager / tuned plain loop", managed, tuned))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
