"""Throughput of the SDK core's hot paths: what a TLS peer check or a JWT validation costs.

Run: .venv/bin/python bench/bench_sdk_core.py [--seconds 2]
Prints operations per second for issuing, parsing and verifying X509-SVIDs and minting/validating JWT-SVIDs.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.svid import X509Svid
from tessera.sdk.testing import TestCA
from tessera.sdk.verify import verify_x509_svid


def measure(name: str, fn: Callable[[], object], seconds: float) -> None:
    fn()  # warm up
    count = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        fn()
        count += 1
    elapsed = time.perf_counter() - start
    print(f"{name:<52} {count / elapsed:>10.0f} ops/s  {elapsed / count * 1e6:>9.1f} us/op")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=2.0, help="time spent on each measurement")
    args = parser.parse_args()
    ca = TestCA("example.org")
    inter = ca.issue_intermediate()
    svid = inter.issue_svid("/bench")
    chain_der, key_der = svid.chain_der(), svid.key_der()
    bundle = ca.x509_bundle()
    token = ca.mint_jwt_svid("/bench", "svc")
    jwt_bundle = ca.jwt_bundle()
    rsa_ca = TestCA("example.org", key_kind="rsa-2048")
    rsa_svid = rsa_ca.issue_svid("/bench")
    document = ca.spiffe_bundle().to_document()

    measure("issue X509-SVID (new P-256 key, sign)", lambda: ca.issue_svid("/bench"), args.seconds)
    measure("X509Svid.parse_der (chain of 2 + key)", lambda: X509Svid.parse_der(chain_der, key_der), args.seconds)
    measure(
        "verify_x509_svid, P-256, leaf + intermediate",
        lambda: verify_x509_svid(svid.cert_chain, bundle),
        args.seconds,
    )
    measure(
        "verify_x509_svid, RSA-2048, leaf only",
        lambda: verify_x509_svid(rsa_svid.cert_chain, rsa_ca.x509_bundle()),
        args.seconds,
    )
    measure("mint JWT-SVID (ES256)", lambda: ca.mint_jwt_svid("/bench", "svc"), args.seconds)
    measure(
        "JwtSvid.parse_and_validate (ES256)", lambda: JwtSvid.parse_and_validate(token, jwt_bundle, "svc"), args.seconds
    )
    measure(
        "SpiffeBundle.from_document (1 CA + 1 JWT key)",
        lambda: SpiffeBundle.from_document("example.org", document),
        args.seconds,
    )


if __name__ == "__main__":
    main()
