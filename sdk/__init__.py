"""tessera.sdk: what workloads import to get SPIFFE identities and speak mutual TLS.

It depends on nothing else in Tessera (only on the generated Workload API stubs); the server and the agent
build on it, never the other way round.
"""

from tessera.sdk.bundle import BundleSet, JwtBundle, SpiffeBundle, X509Bundle
from tessera.sdk.errors import (
    AuthorizationError,
    BundleError,
    SpiffeIdError,
    SvidError,
    TesseraError,
    VerificationError,
    WorkloadApiError,
)
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import X509Svid
from tessera.sdk.verify import verify_x509_svid

__all__ = [
    "AuthorizationError",
    "BundleError",
    "BundleSet",
    "JwtBundle",
    "JwtSvid",
    "SpiffeBundle",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "TesseraError",
    "TrustDomain",
    "VerificationError",
    "WorkloadApiError",
    "X509Bundle",
    "X509Svid",
    "verify_x509_svid",
]
