"""The agent side of the node API for tests against a RunningServer: keys and CSRs, an attesting Agent, and a
host PKI for x509pop."""

from __future__ import annotations

import datetime as dt
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from support.inproc import TD, RunningServer
from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc
from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.svid import parse_der_certificates

MAX_MSG = 64 * 1024 * 1024


def code_of(call: object) -> grpc.StatusCode:
    """The status code ``call()`` fails with (it must fail with a gRPC error)."""
    with pytest.raises(grpc.RpcError) as info:
        call()  # type: ignore[operator]
    code: grpc.StatusCode = info.value.code()
    return code


# ------------------------------------------------------------------------------------------ keys, CSRs


def csr_der(key: Any, sans: Sequence[str] = (), cn: str = "ignored") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    )
    if sans:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(s) for s in sans]), critical=False
        )
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem_key(key: Any) -> bytes:
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return data


def pem_certs(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


# --------------------------------------------------------------------------------------- agent client


@dataclass
class Agent:
    """An agent as the node API sees it: an SVID (after attestation) and channels to the server."""

    server: RunningServer
    key: ec.EllipticCurvePrivateKey = field(default_factory=ec_key)
    chain: list[x509.Certificate] = field(default_factory=list)
    spiffe_id: str = ""
    selectors: list[str] = field(default_factory=list)
    result: npb.AttestResult | None = None
    _channel: grpc.Channel | None = None

    def anonymous_stub(self) -> tuple[grpc.Channel, ngrpc.NodeStub]:
        creds = grpc.ssl_channel_credentials(root_certificates=self.server.bundle_pem())
        channel = grpc.secure_channel(self.server.address, creds, options=_options())
        return channel, ngrpc.NodeStub(channel)

    def stub(self) -> ngrpc.NodeStub:
        """A channel presenting the current agent SVID (a new channel after every change of SVID)."""
        if self._channel is None:
            creds = grpc.ssl_channel_credentials(
                root_certificates=self.server.bundle_pem(),
                private_key=pem_key(self.key),
                certificate_chain=pem_certs(self.chain),
            )
            self._channel = grpc.secure_channel(self.server.address, creds, options=_options())
        return ngrpc.NodeStub(self._channel)

    def reset_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def attest(self, attestor: str, payload: bytes, answer: Any = None, csr: bytes | None = None) -> npb.AttestResult:
        """Runs Attest; ``answer(challenge) -> bytes`` answers challenges. Raises grpc.RpcError on refusal."""
        channel, stub = self.anonymous_stub()
        try:
            requests: queue.Queue[npb.AttestRequest | None] = queue.Queue()
            params = npb.AttestParams(
                attestor=attestor, payload=payload, csr=csr if csr is not None else csr_der(self.key)
            )
            requests.put(npb.AttestRequest(params=params))

            def iterate() -> Iterator[npb.AttestRequest]:
                while True:
                    item = requests.get(timeout=30)
                    if item is None:
                        return
                    yield item

            result = None
            for response in stub.Attest(iterate(), timeout=30):
                if response.HasField("challenge"):
                    assert answer is not None, "server sent a challenge the test did not expect"
                    requests.put(npb.AttestRequest(challenge_response=answer(response.challenge)))
                else:
                    result = response.result
                    requests.put(None)
            assert result is not None
        finally:
            channel.close()
        self.result = result
        self.chain = parse_der_certificates(result.svid.cert_chain)
        self.spiffe_id = result.svid.spiffe_id
        self.selectors = [f"{s.type}:{s.value}" for s in result.node_selectors]
        self.reset_channel()
        return result

    def attest_join_token(self, token: str) -> npb.AttestResult:
        return self.attest("join_token", token.encode())

    def close(self) -> None:
        self.reset_channel()


def _options() -> list[tuple[str, Any]]:
    return [("grpc.max_receive_message_length", MAX_MSG), ("grpc.max_send_message_length", MAX_MSG)]


def trust_bundle(result: npb.AttestResult) -> SpiffeBundle:
    return SpiffeBundle.from_document(TD, result.trust_bundle)


# ------------------------------------------------------------------------------ x509pop host certificates


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class HostPki:
    """An organisation's host PKI: a root, an intermediate, and host certificates it issues."""

    root_key: Any
    root: x509.Certificate
    inter_key: Any
    inter: x509.Certificate

    @classmethod
    def create(cls, name: str = "Org") -> HostPki:
        now = dt.datetime.now(dt.UTC)
        root_key = ec_key()
        root = _ca_cert(root_key, root_key, _name(f"{name} Root"), None, now)
        inter_key = ec_key()
        inter = _ca_cert(inter_key, root_key, _name(f"{name} Hosts"), root, now)
        return cls(root_key, root, inter_key, inter)

    def host(self, cn: str, dns: Sequence[str] = (), key: Any = None) -> tuple[Any, x509.Certificate]:
        now = dt.datetime.now(dt.UTC)
        key = key or ec_key()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(cn))
            .issuer_name(self.inter.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.inter_key.public_key()), critical=False
            )
        )
        if dns:
            builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
        return key, builder.sign(self.inter_key, hashes.SHA256())

    def payload(self, leaf: x509.Certificate) -> bytes:
        return leaf.public_bytes(serialization.Encoding.DER) + self.inter.public_bytes(serialization.Encoding.DER)

    def write_root(self, path: Path) -> Path:
        path.write_bytes(self.root.public_bytes(serialization.Encoding.PEM))
        return path


def _ca_cert(
    key: Any, signer: Any, subject: x509.Name, issuer: x509.Certificate | None, now: dt.datetime
) -> x509.Certificate:
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signer.public_key()), critical=False)
    )
    return builder.sign(signer, hashes.SHA256())


def sign_challenge(key: Any, challenge: bytes) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(challenge, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        from cryptography.hazmat.primitives.asymmetric import padding

        return key.sign(challenge, padding.PKCS1v15(), hashes.SHA256())
    raise TypeError(type(key))
