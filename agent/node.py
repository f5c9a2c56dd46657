"""The agent's own identity with the server: bootstrap trust, node attestation, renewal, failover.

State kept in the data directory (all written atomically):
- ``agent.pem`` (0600): the agent SVID's private key (PKCS#8) followed by its certificate chain;
- ``agent.json``: whether the attestor allows re-attestation after expiry;
- ``bundle.pem``: the server trust roots learnt from the server (updated on every bundle change).

A restart reuses a still-valid SVID (join tokens are one-time); an expired SVID is replaced by
re-attesting when the attestor allows it (x509pop), otherwise the agent stops with one line saying what
to do.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa

from tessera.agent.errors import NodeIdentityError, ServerUnavailableError
from tessera.agent.rotation import rotate_at
from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc
from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.errors import TesseraError, UnsafeDirectoryError
from tessera.sdk.files import ensure_private_dir, write_atomic
from tessera.sdk.keys import PrivateKey, generate_key, load_private_key_pem, private_key_to_pem
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import (
    certificates_to_pem,
    parse_der_certificates,
    parse_pem_certificates,
    spiffe_id_from_certificate,
)

log = logging.getLogger(__name__)

T = TypeVar("T")

# Generous limits: a first sync of a large deployment must not hit gRPC's 4 MB default.
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]
# Status codes after which the next server address is worth trying.
_FAILOVER_CODES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNKNOWN}


@dataclass(frozen=True, slots=True)
class NodeConfig:
    trust_domain: TrustDomain
    server_addresses: tuple[str, ...]
    data_dir: Path
    trust_bundle_path: str | None = None
    insecure_bootstrap: bool = False
    join_token: str | None = None
    x509pop_cert: str | None = None
    x509pop_key: str | None = None
    server_name: str | None = None
    call_timeout: float = 15.0


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    spiffe_id: SpiffeId
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey
    reattestable: bool

    @property
    def not_before(self) -> float:
        return self.chain[0].not_valid_before_utc.timestamp()

    @property
    def not_after(self) -> float:
        return self.chain[0].not_valid_after_utc.timestamp()


def make_csr(key: PrivateKey) -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    algorithm = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algorithm).public_bytes(serialization.Encoding.DER)


def sign_challenge(key: PrivateKey, challenge: bytes) -> bytes:
    """x509pop proof of possession: the challenge bytes exactly as received, signed with the host key."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(challenge, ec.ECDSA(hashes.SHA256()))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(
            challenge, padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256()
        )
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return key.sign(challenge)
    raise NodeIdentityError("x509pop host key must be EC, RSA or Ed25519")


class IdentityStore:
    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.svid_path = data_dir / "agent.pem"
        self.state_path = data_dir / "agent.json"
        self.bundle_path = data_dir / "bundle.pem"

    def ensure_dir(self) -> None:
        """The agent's own 0700 directory for its key (see ensure_private_dir: never another user's)."""
        try:
            ensure_private_dir(self.dir)
        except UnsafeDirectoryError as exc:
            raise NodeIdentityError(f"data_dir: {exc}") from None

    def load_identity(self) -> AgentIdentity | None:
        if not self.svid_path.exists():
            return None
        try:
            data = self.svid_path.read_bytes()
            key = load_private_key_pem(data)
            chain = tuple(parse_pem_certificates(data))
            state = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
            return AgentIdentity(
                spiffe_id_from_certificate(chain[0]), chain, key, bool(state.get("reattestable", False))
            )
        except (OSError, ValueError, TesseraError, IndexError) as exc:
            log.warning("ignoring unreadable stored agent SVID %s: %s", self.svid_path, exc)
            return None

    def save_identity(self, identity: AgentIdentity) -> None:
        self.ensure_dir()
        write_atomic(
            str(self.state_path),
            json.dumps({"spiffe_id": str(identity.spiffe_id), "reattestable": identity.reattestable}).encode(),
            0o600,
        )
        write_atomic(
            str(self.svid_path), private_key_to_pem(identity.key) + certificates_to_pem(identity.chain), 0o600
        )

    def load_roots(self) -> list[x509.Certificate]:
        if not self.bundle_path.exists():
            return []
        try:
            return parse_pem_certificates(self.bundle_path.read_bytes())
        except (OSError, ValueError, TesseraError) as exc:
            log.warning("ignoring unreadable stored bundle %s: %s", self.bundle_path, exc)
            return []

    def save_roots(self, roots: Sequence[x509.Certificate]) -> None:
        self.ensure_dir()
        write_atomic(str(self.bundle_path), certificates_to_pem(roots), 0o644)


def load_trust_bundle_file(path: str) -> list[x509.Certificate]:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise NodeIdentityError(f"cannot read --trust-bundle {path}: {exc.strerror}") from exc
    try:
        certs = parse_pem_certificates(data)
    except (ValueError, TesseraError) as exc:
        raise NodeIdentityError(f"--trust-bundle {path} is not PEM certificates: {exc}") from exc
    if not certs:
        raise NodeIdentityError(f"--trust-bundle {path} holds no certificate")
    return certs


class _InsecureBootstrapProxy:
    """For --insecure-bootstrap only: a local plaintext socket relaying to the server over TLS *without*
    verifying it, so the first Attest can run before any trust exists. The bundle it returns is pinned."""

    def __init__(self, address: str, server_name: str | None) -> None:
        self.address = address
        self.server_name = server_name
        self._dir = tempfile.mkdtemp(prefix="tessera-boot-", dir="/tmp")
        self.path = f"{self._dir}/s"
        self._server: asyncio.AbstractServer | None = None

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_unix_server(self._handle, self.path)
        return "unix:" + self.path

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        host, _, port = self.address.rpartition(":")
        host = host.strip("[]")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        ctx.set_alpn_protocols(["h2"])
        try:
            up_reader, up_writer = await asyncio.open_connection(
                host, int(port), ssl=ctx, server_hostname=self.server_name or host
            )
        except OSError:
            writer.close()
            return

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


class NodeClient:
    """Talks to the server as this agent: attestation, renewal and failover across addresses."""

    def __init__(self, config: NodeConfig, clock: Callable[[], float] = time.time) -> None:
        if not config.server_addresses:
            raise NodeIdentityError("no server address configured: pass --server-address HOST:PORT")
        self.config = config
        self.store = IdentityStore(config.data_dir)
        self._clock = clock
        self.identity: AgentIdentity | None = None
        self.roots: list[x509.Certificate] = []
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._current = 0
        self._renew_at = 0.0

    # -- trust -----------------------------------------------------------------------------------------

    def _roots_pem(self) -> bytes:
        return certificates_to_pem(self.roots)

    def update_roots(self, roots: Sequence[x509.Certificate]) -> None:
        """New server trust roots (from a bundle change): persisted, and used by new channels."""
        def key(c: x509.Certificate) -> bytes:
            return c.public_bytes(serialization.Encoding.DER)

        if sorted(map(key, roots)) == sorted(map(key, self.roots)):
            return
        self.roots = list(roots)
        self.store.save_roots(self.roots)
        self._reset_channels()

    def _credentials(self, with_client_cert: bool) -> grpc.ChannelCredentials:
        if with_client_cert and self.identity is not None:
            return grpc.ssl_channel_credentials(
                root_certificates=self._roots_pem(),
                private_key=private_key_to_pem(self.identity.key),
                certificate_chain=certificates_to_pem(self.identity.chain),
            )
        return grpc.ssl_channel_credentials(root_certificates=self._roots_pem())

    def _options(self) -> list[tuple[str, Any]]:
        options = list(CHANNEL_OPTIONS)
        if self.config.server_name:
            options.append(("grpc.ssl_target_name_override", self.config.server_name))
        return options

    def _channel(self, address: str) -> grpc.aio.Channel:
        channel = self._channels.get(address)
        if channel is None:
            channel = grpc.aio.secure_channel(address, self._credentials(True), options=self._options())
            self._channels[address] = channel
        return channel

    def _reset_channels(self) -> None:
        old = list(self._channels.values())
        self._channels.clear()
        for channel in old:
            # let in-flight calls finish on the old credentials
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().create_task(channel.close(grace=5))

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close(grace=1)
        self._channels.clear()

    # -- calls with failover ---------------------------------------------------------------------------

    async def call(self, fn: Callable[[Any], Awaitable[T]]) -> T:
        """Runs ``fn`` against the current server, failing over to the next address when one is down."""
        addresses = self.config.server_addresses
        errors: list[str] = []
        for i in range(len(addresses)):
            index = (self._current + i) % len(addresses)
            address = addresses[index]
            try:
                result = await fn(_stub(self._channel(address)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FAILOVER_CODES:
                    errors.append(f"{address}: {exc.code().name} {exc.details()}")
                    continue
                raise
            if index != self._current:
                log.info("switched to server %s", address)
                self._current = index
            return result
        raise ServerUnavailableError("no server reachable: " + "; ".join(errors))

    # -- identity --------------------------------------------------------------------------------------

    async def start(self) -> AgentIdentity:
        """Loads trust and identity from disk, attesting when there is no usable SVID."""
        self.store.ensure_dir()
        roots = self.store.load_roots()
        if self.config.trust_bundle_path:
            roots += [c for c in load_trust_bundle_file(self.config.trust_bundle_path) if c not in roots]
        self.roots = roots
        stored = self.store.load_identity()
        now = self._clock()
        if stored is not None and stored.spiffe_id.trust_domain != self.config.trust_domain:
            raise NodeIdentityError(
                f"stored agent SVID in {self.config.data_dir} is for {stored.spiffe_id.trust_domain}, not "
                f"{self.config.trust_domain}; use another --data-dir"
            )
        if stored is not None and stored.not_after > now and self.roots:
            log.info("reusing stored agent SVID %s (valid until %s)", stored.spiffe_id, _iso(stored.not_after))
            self._set_identity(stored)
            return stored
        if stored is not None:
            log.warning("stored agent SVID %s expired at %s", stored.spiffe_id, _iso(stored.not_after))
        identity = await self.attest(previous=stored)
        return identity

    def _set_identity(self, identity: AgentIdentity) -> None:
        self.identity = identity
        self._renew_at = rotate_at(identity.not_before, identity.not_after)
        self._reset_channels()

    def _attestor(self, previous: AgentIdentity | None) -> tuple[str, bytes, PrivateKey | None]:
        cfg = self.config
        if cfg.x509pop_cert or cfg.x509pop_key:
            if not (cfg.x509pop_cert and cfg.x509pop_key):
                raise NodeIdentityError("x509pop needs both --x509pop-cert and --x509pop-key")
            try:
                chain = parse_pem_certificates(Path(cfg.x509pop_cert).read_bytes())
                host_key = load_private_key_pem(Path(cfg.x509pop_key).read_bytes())
            except (OSError, ValueError, TesseraError) as exc:
                raise NodeIdentityError(f"cannot load the x509pop certificate/key: {exc}") from exc
            if not chain:
                raise NodeIdentityError(f"--x509pop-cert {cfg.x509pop_cert} holds no certificate")
            payload = b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain)
            return "x509pop", payload, host_key
        if cfg.join_token:
            return "join_token", cfg.join_token.encode(), None
        if previous is not None:
            raise NodeIdentityError(
                f"agent SVID {previous.spiffe_id} expired at {_iso(previous.not_after)} and join tokens are "
                "one-time: run `tessera-server token generate` and restart with --join-token NEW_TOKEN"
            )
        raise NodeIdentityError(
            f"no stored agent identity in {cfg.data_dir}: pass --join-token TOKEN "
            "(from `tessera-server token generate`) or --x509pop-cert/--x509pop-key"
        )

    async def attest(self, previous: AgentIdentity | None = None) -> AgentIdentity:
        attestor, payload, host_key = self._attestor(previous)
        key = generate_key("ec-p256")
        params = npb.AttestParams(attestor=attestor, payload=payload, csr=make_csr(key))
        if not self.roots:
            if not self.config.insecure_bootstrap:
                raise NodeIdentityError(
                    "no trust bundle for the server: pass --trust-bundle FILE (from `tessera-server bundle show`) "
                    "or --insecure-bootstrap"
                )
            log.warning(
                "INSECURE BOOTSTRAP: the server's certificate is NOT verified for this first attestation; "
                "the trust bundle it returns will be pinned. Use --trust-bundle in production."
            )
        result = await self._attest_any(params, host_key)
        try:
            bundle = SpiffeBundle.from_document(self.config.trust_domain, result.trust_bundle)
        except (ValueError, TesseraError) as exc:
            raise NodeIdentityError(f"server returned an unusable trust bundle: {exc}") from exc
        chain = tuple(parse_der_certificates(result.svid.cert_chain))
        identity = AgentIdentity(SpiffeId.parse(result.svid.spiffe_id), chain, key, result.reattestable)
        self.store.save_identity(identity)
        self.roots = []  # force update
        self.update_roots(list(bundle.x509_authorities))
        self._set_identity(identity)
        log.info(
            "attested as %s with %s (valid until %s)", identity.spiffe_id, attestor, _iso(identity.not_after)
        )
        return identity

    async def _attest_any(self, params: npb.AttestParams, host_key: PrivateKey | None) -> npb.AttestResult:
        errors: list[str] = []
        for address in self.config.server_addresses:
            try:
                if self.roots:
                    async with grpc.aio.secure_channel(
                        address, self._credentials(False), options=self._options()
                    ) as channel:
                        return await self._attest_on(channel, params, host_key)
                async with _InsecureBootstrapProxy(address, self.config.server_name) as target, \
                        grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS) as channel:
                    return await self._attest_on(channel, params, host_key)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FAILOVER_CODES:
                    errors.append(f"{address}: {exc.code().name} {exc.details()}")
                    continue
                raise NodeIdentityError(
                    f"server refused node attestation ({params.attestor}): {exc.code().name}: {exc.details()}"
                ) from exc
        raise ServerUnavailableError("no server reachable for node attestation: " + "; ".join(errors))

    async def _attest_on(
        self, channel: grpc.aio.Channel, params: npb.AttestParams, host_key: PrivateKey | None
    ) -> npb.AttestResult:
        call = _stub(channel).Attest(timeout=self.config.call_timeout * 2)
        await call.write(npb.AttestRequest(params=params))
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                raise NodeIdentityError("server closed node attestation without a result")
            if response.HasField("challenge"):
                if host_key is None:
                    raise NodeIdentityError(f"server sent a challenge to the {params.attestor} attestor")
                await call.write(npb.AttestRequest(challenge_response=sign_challenge(host_key, response.challenge)))
                continue
            await call.done_writing()
            result: npb.AttestResult = response.result
            return result

    # -- renewal ---------------------------------------------------------------------------------------

    def renew_due(self, now: float | None = None) -> bool:
        return self.identity is not None and (now if now is not None else self._clock()) >= self._renew_at

    def expired(self, now: float | None = None) -> bool:
        return self.identity is None or (now if now is not None else self._clock()) >= self.identity.not_after

    async def renew(self) -> AgentIdentity:
        assert self.identity is not None
        key = generate_key("ec-p256")
        csr = make_csr(key)
        response = await self.call(
            lambda stub: stub.RenewAgent(npb.RenewAgentRequest(csr=csr), timeout=self.config.call_timeout)
        )
        chain = tuple(parse_der_certificates(response.svid.cert_chain))
        identity = AgentIdentity(self.identity.spiffe_id, chain, key, self.identity.reattestable)
        self.store.save_identity(identity)
        self._set_identity(identity)
        log.info("agent SVID renewed (valid until %s)", _iso(identity.not_after))
        return identity

    async def recover(self) -> AgentIdentity:
        """The SVID expired or the server no longer accepts it: re-attest when allowed, else explain."""
        previous = self.identity
        if previous is not None and not previous.reattestable:
            raise NodeIdentityError(
                f"agent {previous.spiffe_id} can no longer authenticate (SVID expired or refused) and its join "
                "token is spent: run `tessera-server token generate` and restart with --join-token NEW_TOKEN"
            )
        return await self.attest(previous=previous)


def _stub(channel: grpc.aio.Channel) -> Any:
    return ngrpc.NodeStub(channel)  # type: ignore[no-untyped-call]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))

