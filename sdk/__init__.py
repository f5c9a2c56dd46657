"""tessera.sdk: what workloads import to get SPIFFE identities and speak mutual TLS.

The front door: the names a py-spiffe or go-spiffe user types first are all here
(``from tessera.sdk import X509Source, server_context, authorize_id``); the submodules (``source``, ``tls``,
``grpc``, ``http``, ``workloadapi``...) hold the rest.

- ``import tessera.sdk`` stays light: a workload that only parses IDs or verifies chains must not pay for gRPC
  and protobuf. The names that need them (sources, the Workload API client, and the TLS contexts, which take a
  source) are imported on first use through the module ``__getattr__`` (PEP 562); a test checks
  ``sys.modules`` after the import in a fresh interpreter.
- Type checkers and IDEs see every name through the ``TYPE_CHECKING`` imports below, which must match
  ``_LAZY`` (a test compares them).
- It depends on nothing else in Tessera (only on the generated Workload API stubs); the server and the agent
  build on it, never the other way round.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from tessera.sdk.source import AsyncJwtSource, AsyncX509Source, JwtSource, X509Source
    from tessera.sdk.tls import (
        authorize_any,
        authorize_id,
        authorize_member_of,
        authorize_one_of,
        client_context,
        server_context,
    )
    from tessera.sdk.workloadapi import AsyncWorkloadApiClient, WorkloadApiClient

_LAZY: dict[str, str] = {
    "AsyncJwtSource": "tessera.sdk.source",
    "AsyncWorkloadApiClient": "tessera.sdk.workloadapi",
    "AsyncX509Source": "tessera.sdk.source",
    "JwtSource": "tessera.sdk.source",
    "WorkloadApiClient": "tessera.sdk.workloadapi",
    "X509Source": "tessera.sdk.source",
    "authorize_any": "tessera.sdk.tls",
    "authorize_id": "tessera.sdk.tls",
    "authorize_member_of": "tessera.sdk.tls",
    "authorize_one_of": "tessera.sdk.tls",
    "client_context": "tessera.sdk.tls",
    "server_context": "tessera.sdk.tls",
}
"""Exported name -> the module that defines it, imported when the name is first used."""

__all__ = [
    "AsyncJwtSource",
    "AsyncWorkloadApiClient",
    "AsyncX509Source",
    "AuthorizationError",
    "BundleError",
    "BundleSet",
    "JwtBundle",
    "JwtSource",
    "JwtSvid",
    "SpiffeBundle",
    "SpiffeId",
    "SpiffeIdError",
    "SvidError",
    "TesseraError",
    "TrustDomain",
    "VerificationError",
    "WorkloadApiClient",
    "WorkloadApiError",
    "X509Bundle",
    "X509Source",
    "X509Svid",
    "authorize_any",
    "authorize_id",
    "authorize_member_of",
    "authorize_one_of",
    "client_context",
    "server_context",
    "verify_x509_svid",
]


if not TYPE_CHECKING:  # a module __getattr__ would make a type checker accept any name, typos included

    def __getattr__(name: str) -> Any:
        module = _LAZY.get(name)
        if module is None:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        globals()[name] = value  # later look-ups are plain attribute reads
        return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
