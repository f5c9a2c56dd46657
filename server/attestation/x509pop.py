"""x509pop: a node proves it holds the private key of a host certificate the organisation already issued.

Proof of possession is challenge-response: the server sends a fresh random nonce plus a context naming
this trust domain, and the agent signs those bytes with the host key. A captured answer is useless later
(the nonce is never reused) and useless elsewhere (the context names the trust domain). The certificate
chain must verify against the configured x509pop CA bundle(s) at the time of attestation.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError

from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.server.attestation.base import AttestationResult, ChallengeChannel
from tessera.server.errors import NodeAttestationError
from tessera.server.selectors import Selector

NAME = "x509pop"
NONCE_BYTES = 32
CONTEXT_PREFIX = b"tessera-x509pop-v1 "
MAX_CHAIN_BYTES = 64 * 1024
MAX_SIGNATURE_BYTES = 2048

Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def fingerprint(cert: x509.Certificate) -> str:
    """Hex SHA-1 of the certificate's DER: the name x509pop gives a host (and its CAs) in IDs and selectors."""
    return cert.fingerprint(hashes.SHA1()).hex()  # noqa: S303 - an identifier, not a security digest


def load_ca_bundle(paths: Sequence[Path]) -> list[x509.Certificate]:
    """Reads PEM CA files; raises ValueError naming the file when one holds no certificate."""
    roots: list[x509.Certificate] = []
    for path in paths:
        data = Path(path).read_bytes()
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ValueError(f"x509pop_ca_bundle: {path} holds no PEM certificate") from None
        roots.extend(certs)
    return roots


def split_der_chain(data: bytes) -> list[x509.Certificate]:
    """Parses concatenated DER certificates (leaf first)."""
    certs: list[x509.Certificate] = []
    offset = 0
    while offset < len(data):
        if data[offset] != 0x30 or offset + 2 > len(data):
            raise ValueError("not a DER certificate sequence")
        first = data[offset + 1]
        if first < 0x80:
            length, header = first, 2
        else:
            count = first & 0x7F
            if count == 0 or count > 4 or offset + 2 + count > len(data):
                raise ValueError("bad DER length")
            length = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
            header = 2 + count
        end = offset + header + length
        if end > len(data):
            raise ValueError("truncated DER certificate")
        certs.append(x509.load_der_x509_certificate(data[offset:end]))
        offset = end
    return certs


def verify_signature(cert: x509.Certificate, signature: bytes, data: bytes) -> bool:
    """Checks a proof-of-possession signature with the certificate's public key (see node.proto)."""
    key = cert.public_key()
    try:
        if isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
            return True
        if isinstance(key, ed25519.Ed25519PublicKey):
            key.verify(signature, data)
            return True
        if isinstance(key, rsa.RSAPublicKey):
            try:
                key.verify(
                    signature, data, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
                )
                return True
            except InvalidSignature:
                key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
                return True
    except InvalidSignature:
        return False
    return False


class X509PopAttestor:
    name = NAME

    def __init__(self, trust_domain: TrustDomain, ca_roots: Sequence[x509.Certificate], clock: Clock = _utcnow):
        self._td = trust_domain
        self._roots = list(ca_roots)
        self._clock = clock
        self._context = CONTEXT_PREFIX + trust_domain.id_string.encode()

    def _verify_chain(self, chain: list[x509.Certificate]) -> list[x509.Certificate]:
        if not self._roots:
            raise NodeAttestationError("x509pop is not enabled on this server (no x509pop_ca_bundle configured)")
        leaf, intermediates = chain[0], chain[1:]
        basic = _basic_constraints(leaf)
        if basic is not None and basic.ca:
            raise NodeAttestationError("x509pop: the host certificate is a CA certificate, not a host certificate")
        verifier = (
            PolicyBuilder()
            .store(Store(self._roots))
            .time(self._clock())
            .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
            .build_client_verifier()
        )
        try:
            verified = verifier.verify(leaf, intermediates)
        except VerificationError as exc:
            raise NodeAttestationError(
                f"x509pop: the host certificate does not chain to the x509pop CA bundle: {exc}"
            ) from None
        return list(verified.chain)

    async def attest(self, payload: bytes, channel: ChallengeChannel) -> AttestationResult:
        if not payload:
            raise NodeAttestationError(
                "x509pop: payload must hold the host certificate chain (DER)", "invalid_argument"
            )
        if len(payload) > MAX_CHAIN_BYTES:
            raise NodeAttestationError("x509pop: certificate chain is too large", "invalid_argument")
        try:
            chain = split_der_chain(payload)
        except ValueError as exc:
            raise NodeAttestationError(
                f"x509pop: payload is not a DER certificate chain: {exc}", "invalid_argument"
            ) from None
        verified = self._verify_chain(chain)
        leaf = chain[0]
        challenge = secrets.token_bytes(NONCE_BYTES) + self._context
        signature = await channel.challenge(challenge)
        if not signature or len(signature) > MAX_SIGNATURE_BYTES:
            raise NodeAttestationError("x509pop: the challenge response is empty or too large")
        if not verify_signature(leaf, signature, challenge):
            raise NodeAttestationError(
                "x509pop: the challenge signature does not verify with the host certificate's key"
            )
        agent_id = self._td.spiffe_id("tessera", "agent", NAME, fingerprint(leaf))
        return AttestationResult(agent_id=agent_id, selectors=selectors_for(leaf, verified), reattestable=True)


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def selectors_for(leaf: x509.Certificate, chain: Sequence[x509.Certificate]) -> tuple[Selector, ...]:
    """Node selectors: the subject CN, every CA on the verified path, and the DNS/URI SANs of the leaf."""
    out: list[Selector] = []
    for attr in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
        out.append(Selector(NAME, f"subject:cn:{attr.value!s}"))
    for ca in chain[1:]:
        out.append(Selector(NAME, f"ca:fingerprint:{fingerprint(ca)}"))
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        san = None
    if san is not None:
        for name in san.get_values_for_type(x509.DNSName):
            out.append(Selector(NAME, f"san:dns:{name}"))
        for uri in san.get_values_for_type(x509.UniformResourceIdentifier):
            out.append(Selector(NAME, f"san:uri:{uri}"))
    return tuple(dict.fromkeys(out))


def expected_agent_id(trust_domain: TrustDomain, leaf: x509.Certificate) -> SpiffeId:
    return trust_domain.spiffe_id("tessera", "agent", NAME, fingerprint(leaf))


__all__ = ["NAME", "X509PopAttestor", "expected_agent_id", "fingerprint", "load_ca_bundle", "selectors_for"]
