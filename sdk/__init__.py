"""tessera.sdk: what workloads import to get SPIFFE identities and speak mutual TLS.

It depends on nothing else in Tessera (only on the generated Workload API stubs); the server and the agent
build on it, never the other way round.
"""

from tessera.sdk.errors import (
    AuthorizationError,
    BundleError,
    SpiffeIdError,
    SvidError,
    TesseraError,
    VerificationError,
    WorkloadApiError,
)
from tessera.sdk.spiffeid import SpiffeId, TrustDomain

__all__ = [
    "AuthorizationError",
    "BundleError",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "TesseraError",
    "TrustDomain",
    "VerificationError",
    "WorkloadApiError",
]
