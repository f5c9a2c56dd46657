"""Trust bundles as the agent holds them: parsed once per sync into the two wire forms it serves.

The server sends SPIFFE bundle documents (JWK Sets); the Workload API wants X.509 authorities as
concatenated DER and JWT authorities as a JWKS. Converting once when a bundle changes keeps every stream
update a dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from tessera.agent.errors import AgentError
from tessera.sdk.bundle import JwtBundle, SpiffeBundle
from tessera.sdk.errors import TesseraError
from tessera.sdk.keys import PublicKey
from tessera.sdk.spiffeid import TrustDomain


class BundleDocumentError(AgentError):
    """A SPIFFE bundle document from the server could not be used."""


@dataclass(frozen=True, slots=True)
class TrustBundle:
    trust_domain_id: str  # "spiffe://td"
    x509_authorities: tuple[x509.Certificate, ...]
    x509_der: bytes  # concatenated DER, the Workload API form
    jwks: bytes  # JSON {"keys": [...]} of the JWT authorities only
    jwt_keys: Mapping[str, PublicKey] = field(default_factory=dict)  # kid -> public key
    document: bytes = b""


def parse_bundle_document(trust_domain_id: str, document: bytes) -> TrustBundle:
    try:
        td = TrustDomain.parse(trust_domain_id)
        bundle = SpiffeBundle.from_document(td, document)
    except (TesseraError, ValueError) as exc:
        raise BundleDocumentError(f"bundle for {trust_domain_id} is not usable: {exc}") from exc
    return TrustBundle(
        trust_domain_id=td.id_string,
        x509_authorities=bundle.x509_authorities,
        x509_der=b"".join(cert.public_bytes(Encoding.DER) for cert in bundle.x509_authorities),
        jwks=JwtBundle(td, bundle.jwt_authorities).to_jwks(),
        jwt_keys=dict(bundle.jwt_authorities),
        document=document,
    )


def bundle_from_certificates(trust_domain_id: str, certs: Sequence[x509.Certificate]) -> TrustBundle:
    """A bundle holding X.509 authorities only (trust-bundle files, bootstrap)."""
    td = TrustDomain.parse(trust_domain_id)
    der = b"".join(cert.public_bytes(Encoding.DER) for cert in certs)
    return TrustBundle(td.id_string, tuple(certs), der, JwtBundle(td, {}).to_jwks(), {})
