"""Signing throughput: CSR -> X509-SVID with `cryptography` directly vs. through the server's CA manager.

    .venv/bin/python bench/bench_signing.py [--n 2000] [--ca-key-kind ec-p256] [--csr-key-kind ec-p256]

Both loops do the same work per CSR: parse the DER CSR, check its signature, build a certificate with the
X509-SVID extensions, sign it with the same CA key, and DER-encode the result (what the node API returns).
The CA manager's loop adds what the server really does on top: key strength checks, SPIFFE ID and TTL
checks, notAfter capping and the chain assembly. The figures say what that costs.

The end-to-end measurement (batch RPC over gRPC) reuses :func:`make_csrs`, :func:`make_manager`,
:func:`plain_loop`, :func:`manager_loop` and :func:`measure` from here.
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
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tessera.sdk.keys import generate_key
from tessera.server.ca.csr import csr_public_key
from tessera.server.ca.journal import MemoryJournalStore
from tessera.server.ca.keymanager import MemoryKeyManager
from tessera.server.ca.manager import CaConfig, CaManager

TRUST_DOMAIN = "bench.example.org"


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
            f"{self.label:<44} {self.per_second:>9.0f} SVIDs/s  (best of repeats; median {median_rate:.0f}/s, "
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


def plain_loop(csrs: Sequence[bytes], ca_cert: x509.Certificate, ca_key: object) -> list[bytes]:
    """The baseline: what a minimal signer written straight against `cryptography` does per CSR."""
    now = datetime.now(UTC)
    not_before = now - timedelta(seconds=10)
    not_after = now + timedelta(hours=1)
    issuer = ca_cert.subject
    aki = x509.AuthorityKeyIdentifier(
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest, None, None
    )
    key_usage = x509.KeyUsage(True, False, False, False, False, False, False, False, False)
    eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH])
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Tessera")])
    out = []
    for i, der in enumerate(csrs):
        csr = x509.load_der_x509_csr(der)
        if not csr.is_signature_valid:
            raise ValueError(f"CSR #{i} has a bad signature")
        public_key = csr.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(key_usage, critical=True)
            .add_extension(eku, critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(aki, critical=False)
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id_for(i))]), critical=False
            )
            .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
        )
        out.append(cert.public_bytes(serialization.Encoding.DER))
    return out


def manager_loop(csrs: Sequence[bytes], manager: CaManager) -> list[bytes]:
    """The server's path: checked CSR -> CaManager.sign_x509_svid -> DER chain."""
    out = []
    for i, der in enumerate(csrs):
        chain = manager.sign_x509_svid(csr_public_key(der), spiffe_id_for(i), ttl_seconds=3600)
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


def run(n: int, ca_key_kind: str, csr_key_kind: str, repeats: int) -> tuple[Figure, Figure]:
    csrs = make_csrs(n, csr_key_kind)
    manager = make_manager(ca_key_kind)
    active = manager.active_x509_authority
    assert active is not None
    ca_cert, ca_key = active.certificate, active.key.signer
    # Warm up both paths (imports, caches) on a few CSRs before timing.
    plain_loop(csrs[:20], ca_cert, ca_key)
    manager_loop(csrs[:20], manager)
    plain = measure("plain loop (cryptography directly)", lambda: plain_loop(csrs, ca_cert, ca_key), n, repeats)
    managed = measure("CA manager sign path (CSR check + sign)", lambda: manager_loop(csrs, manager), n, repeats)
    return plain, managed


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--n", type=int, default=2000, help="CSRs per run (default 2000)")
    parser.add_argument("--ca-key-kind", default="ec-p256")
    parser.add_argument("--csr-key-kind", default="ec-p256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        parser.error("--n and --repeats must be positive")
    python = sys.version.split()[0]
    print(f"signing benchmark: {args.n} CSRs ({args.csr_key_kind}), CA key {args.ca_key_kind}, Python {python}")
    plain, managed = run(args.n, args.ca_key_kind, args.csr_key_kind, args.repeats)
    print(plain.line())
    print(managed.line())
    print(f"{'ratio CA manager / plain loop':<44} {managed.per_second / plain.per_second:>9.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
