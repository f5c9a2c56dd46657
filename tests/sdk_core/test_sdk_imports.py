"""`import tessera.sdk` stays light: workloads that only parse IDs or verify chains must not pay for gRPC."""

from __future__ import annotations

import subprocess
import sys

import tessera.sdk


def test_top_level_import_does_not_load_grpc_or_protos() -> None:
    code = (
        "import sys, tessera.sdk; "
        "heavy = sorted(m for m in sys.modules if m == 'grpc' or m.startswith(('grpc.', 'tessera.proto', "
        "'google.protobuf', 'tessera.server', 'tessera.agent'))); "
        "print(','.join(heavy))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == ""


def test_public_names_are_exported() -> None:
    for name in [
        "SpiffeId",
        "TrustDomain",
        "X509Svid",
        "X509Bundle",
        "JwtBundle",
        "SpiffeBundle",
        "BundleSet",
        "JwtSvid",
        "verify_x509_svid",
        "TesseraError",
        "VerificationError",
    ]:
        assert name in tessera.sdk.__all__
        assert getattr(tessera.sdk, name) is not None
