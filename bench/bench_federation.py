"""What federation and revocation cost: CRL size and signing time, the peer revocation check, the `ca revoke`
in-use check, and the bundle endpoint's request rate.

Run: .venv/bin/python bench/bench_federation.py [--seconds 2] [--revoked 10000] [--issued 20000]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import ssl
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives.serialization import Encoding

from tessera.sdk.crl import RevocationChecker
from tessera.sdk.testing import TestCA
from tessera.server.ca.crl import RevokedSerial, build_crl, crl_der, serial_hex
from tessera.server.ca.revocation import pending_reissue
from tessera.server.datastore import open_datastore
from tessera.server.datastore.base import IssuedSvid
from tessera.server.federation.endpoint import BundleEndpoint, svid_context


def measure(name: str, fn: Callable[[], object], seconds: float) -> None:
    fn()
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        fn()
        count += 1
    elapsed = time.perf_counter() - start
    print(f"{name:<60} {count / elapsed:>10.0f} ops/s  {elapsed / count * 1e6:>10.1f} us/op")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--revoked", type=int, default=10_000, help="serials on the CRL")
    parser.add_argument("--issued", type=int, default=20_000, help="issued SVIDs remembered by the server")
    args = parser.parse_args()

    ca = TestCA("a.test")
    victim = ca.issue_svid("/victim")
    other = ca.issue_svid("/other")
    now = dt.datetime.now(dt.UTC)
    revoked = [RevokedSerial(victim.leaf.serial_number, now)] + [
        RevokedSerial(n, now) for n in range(1_000_000, 1_000_000 + args.revoked - 1)
    ]
    start = time.perf_counter()
    crl = build_crl(issuer_cert=ca.certificate, issuer_key=ca.key, revoked=revoked, now=now)
    der = crl_der(crl)
    took = (time.perf_counter() - start) * 1e3
    print(f"CRL with {args.revoked} serials: {len(der) / 1024:.0f} KiB, signed in {took:.0f} ms")
    empty = crl_der(build_crl(issuer_cert=ca.certificate, issuer_key=ca.key, revoked=[], now=now))
    print(f"empty CRL (one per CA, always published): {len(empty)} bytes")

    roots = [ca.certificate]
    start = time.perf_counter()
    checker = RevocationChecker([der])
    print(f"RevocationChecker load ({args.revoked} serials): {(time.perf_counter() - start) * 1e3:.1f} ms")
    assert checker.is_revoked(victim.leaf, roots)
    measure("peer check, revoked leaf (first check verifies the CRL)", lambda: checker.is_revoked(victim.leaf, roots),
            args.seconds)  # fmt: skip
    measure("peer check, good leaf", lambda: checker.is_revoked(other.leaf, roots), args.seconds)

    with tempfile.TemporaryDirectory() as tmp:
        ds = open_datastore(None, data_dir=Path(tmp))
        issued_at = int(time.time())
        batch = [
            IssuedSvid(serial_hex(10_000_000 + i), "old" if i % 2 else "new", f"spiffe://a.test/w{i // 2}",
                       f"entry-{i // 2}", "spiffe://a.test/agent", issued_at + (i % 2 == 0), issued_at + 3600)
            for i in range(args.issued)
        ]  # fmt: skip
        start = time.perf_counter()
        for i in range(0, len(batch), 500):
            ds.record_issued_svids(batch[i : i + 500])
        elapsed = time.perf_counter() - start
        print(f"record issued SVIDs (batches of 500): {len(batch) / elapsed:.0f} SVIDs/s")
        start = time.perf_counter()
        pending = pending_reissue(ds, "old", issued_at)
        print(f"`ca revoke` in-use check over {args.issued} issued SVIDs: {(time.perf_counter() - start) * 1e3:.0f} ms"
              f" ({len(pending)} pending)")  # fmt: skip
        ds.close()

    server_svid = ca.issue_svid("/tessera/server", dns_names=["localhost"])
    document = ca.spiffe_bundle().to_document()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    endpoint = BundleEndpoint("127.0.0.1", 0, svid_context(server_svid.cert_chain, server_svid.private_key),
                              lambda: document)  # fmt: skip
    port = asyncio.run_coroutine_threadsafe(endpoint.start(), loop).result(10)
    client = ssl.create_default_context(cadata=ca.certificate.public_bytes(Encoding.PEM).decode())

    def fetch() -> None:
        with urllib.request.urlopen(f"https://localhost:{port}/", context=client, timeout=10) as resp:
            resp.read()

    measure("bundle endpoint GET / (new TLS connection each)", fetch, args.seconds)
    asyncio.run_coroutine_threadsafe(endpoint.close(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)


if __name__ == "__main__":
    main()
