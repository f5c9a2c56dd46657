"""Trust bundles as the agent holds them: parsed once per sync into the two wire forms it serves.

The server sends SPIFFE bundle documents (JWK Sets); the Workload API wants X.509 authorities as
concatenated DER and JWT authorities as a JWKS. Converting once when a bundle changes keeps every stream
update a dictionary lookup.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tessera.agent.errors import BundleDocumentError
from tessera.sdk.bundle import JwtBundle, SpiffeBundle
from tessera.sdk.errors import TesseraError
from tessera.sdk.spiffeid import TrustDomain


@dataclass(frozen=True, slots=True)
class TrustBundle:
    """One trust domain's authorities: the X.509 ones with their Workload API encoding (concatenated DER), the
    JWT ones as the SDK's :class:`JwtBundle` (what ValidateJWTSVID hands the SDK's validator) with their JWKS."""

    trust_domain_id: str  # "spiffe://td"
    x509_authorities: tuple[x509.Certificate, ...]
    jwt_bundle: JwtBundle
    document: bytes = b""
    x509_der: bytes = field(init=False)  # concatenated DER, the Workload API form
    jwks: bytes = field(init=False)  # JSON {"keys": [...]} of the JWT authorities only

    def __post_init__(self) -> None:
        object.__setattr__(self, "x509_der", b"".join(c.public_bytes(Encoding.DER) for c in self.x509_authorities))
        object.__setattr__(self, "jwks", self.jwt_bundle.to_jwks())


def parse_bundle_document(trust_domain_id: str, document: bytes) -> TrustBundle:
    try:
        td = TrustDomain.parse(trust_domain_id)
        bundle = SpiffeBundle.from_document(td, document)
    except (TesseraError, ValueError) as exc:
        raise BundleDocumentError(f"bundle for {trust_domain_id} is not usable: {exc}") from exc
    return TrustBundle(td.id_string, bundle.x509_authorities, bundle.jwt_bundle(), document)
