"""The running server: datastore, CA, node API (TLS) and admin API (Unix socket), and their upkeep.

Start-up checks everything before it serves (data dir writable, datastore migrated, CA loaded or created,
upstream authority valid); any failure is one clear line and exit status 1. Once up, a maintenance loop ticks
the CA (rotation), publishes the trust bundle to the datastore (which agents sync), renews the server's own
SVID at half life (swapping the TLS context so new connections use it; the client roots follow the bundle
the same way), and prunes expired entries, join tokens and old tombstones.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import os
import shutil
import signal
import ssl
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from tessera._daemon.errors import SocketClaimError
from tessera._daemon.fdlimit import raise_fd_limit
from tessera._daemon.ratelog import RateLimitedLog, bound_loop_exceptions
from tessera._daemon.sockets import PRIVATE_DIR_MODE, PRIVATE_SOCKET_MODE, ClaimedSocket, claim_socket
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc
from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.config import ConfigError, load_settings
from tessera.sdk.errors import TesseraError, UnsafeDirectoryError
from tessera.sdk.files import ensure_private_dir
from tessera.sdk.keys import PrivateKey, generate_key
from tessera.sdk.logs import setup_logging
from tessera.server.api.admin import AdminServicer, AdminSettings
from tessera.server.api.anonymous import ANONYMOUS_METHODS, anonymous_node_handler
from tessera.server.api.authority import CaManagerAuthority
from tessera.server.api.ca_admin import CaAdmin
from tessera.server.api.msglimits import MessageLimitInterceptor, server_limit
from tessera.server.api.node import JoinGrace, NodeServicer, NodeSettings, join_grace_needed
from tessera.server.api.peer import authorize_agent
from tessera.server.api.publisher import BundlePublisher, authority_ids, same_authorities
from tessera.server.api.status import ApiError
from tessera.server.api.tls_front import FrontLimits, InnerServers, PeerRegistry, TlsFront, build_server_context
from tessera.server.attestation.base import NodeAttestor
from tessera.server.attestation.join_token import JoinTokenAttestor
from tessera.server.attestation.x509pop import X509PopAttestor, load_ca_bundle
from tessera.server.ca.config import CaConfig
from tessera.server.ca.crl import crls_to_pem
from tessera.server.ca.manager import CaManager
from tessera.server.ca.revocation import CrlPublisher
from tessera.server.ca.signing import ServerCa
from tessera.server.ca.slots import issued_by
from tessera.server.ca.upstream import UpstreamAuthority
from tessera.server.config import MAX_MESSAGE_BYTES, SETTINGS, ServerConfig, build_config
from tessera.server.datastore import Datastore, open_datastore
from tessera.server.errors import BadSigningRequestError, DatastoreError, ServerError
from tessera.server.federation.admin import TrustAdminServicer
from tessera.server.federation.endpoint import BundleEndpoint, WebCertificateFiles, svid_context
from tessera.server.federation.refresher import FederationRefresher
from tessera.server.limits import KeyedRateLimiter
from tessera.server.metrics import (
    InstrumentedAuthority,
    MetricsListener,
    NodeApiInterceptor,
    ServerMetrics,
    ServerStateCollector,
)
from tessera.server.opsconfig import make_key_manager
from tessera.server.statecheck import check_persistent_state

log = logging.getLogger("tessera.server")

MAINTENANCE_INTERVAL = 1.0
MAX_MAINTENANCE_FAILURES = 30
PRUNE_INTERVAL = 60.0
TOMBSTONE_RETENTION = 7 * 86400
SHUTDOWN_GRACE = 5.0
NODE_SERVICE = "tessera.node.v1.Node"
ADMIN_SERVICE = "tessera.admin.v1.Admin"
TRUST_ADMIN_SERVICE = "tessera.admin.v1.TrustAdmin"
GRPC_OPTIONS = (  # the admin API (a local socket only the server's user reaches)
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
)
_HEALTH_METHODS = ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch")
AGENT_METHODS = (
    *(f"/{NODE_SERVICE}/{m.name}" for m in npb.DESCRIPTOR.services_by_name["Node"].methods),
    *_HEALTH_METHODS,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
)
ANONYMOUS_NODE_METHODS = (*(f"/{NODE_SERVICE}/{m}" for m in ANONYMOUS_METHODS), *_HEALTH_METHODS)


def _node_options(methods: tuple[str, ...]) -> list[tuple[str, int]]:
    """gRPC refuses a message over ``max_receive_message_length`` from its length prefix, before buffering it:
    each node API server receives at most the largest request of the methods it serves."""
    return [
        ("grpc.max_receive_message_length", server_limit(methods)),
        ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ]


class StartupError(ServerError):
    """The server cannot start (message is the one line the operator sees)."""


@dataclass(frozen=True, slots=True)
class ServerSvid:
    chain: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]

    def due_for_renewal(self, now: dt.datetime) -> bool:
        start, end = self.leaf.not_valid_before_utc, self.leaf.not_valid_after_utc
        return now >= start + (end - start) / 2


def _check_data_dir(path: Path) -> None:
    """The data dir holds the CA keys and the datastore: the server's own directory, 0700 (see ensure_private_dir)."""
    try:
        ensure_private_dir(path)
    except UnsafeDirectoryError as exc:
        raise StartupError(f"data_dir: {exc}") from None
    except OSError as exc:
        raise StartupError(f"data_dir {path}: cannot create it: {exc.strerror or exc}") from None
    probe = path / f".write-test-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StartupError(f"data_dir {path} is not writable: {exc.strerror or exc}") from None


def _claim_admin_socket(path: Path, server: grpc.aio.Server) -> ClaimedSocket:
    """Binds the admin API on ``path`` through tessera._daemon.sockets: the directory is the server's own (made
    0700 when missing), the socket is 0600 from the moment it has its name, and a live server on the path is
    never replaced. Every refusal is one StartupError line naming the directory and its owner."""

    def bind(staging_path: str) -> None:
        if not server.add_insecure_port(f"unix:{staging_path}"):
            raise StartupError(f"socket {path}: cannot bind the admin API")

    try:
        return claim_socket(str(path), bind, dir_mode=PRIVATE_DIR_MODE, socket_mode=PRIVATE_SOCKET_MODE)
    except SocketClaimError as exc:
        raise StartupError(str(exc)) from None
    except RuntimeError as exc:  # grpc's failure to bind
        raise StartupError(f"socket {path}: cannot bind the admin API: {exc}") from None


class ServerApp:
    """One server instance. ``await start()``, then ``await wait()`` (or ``stop()``)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.node_port = 0
        self._stop = asyncio.Event()
        self._ds: Datastore | None = None
        self._ca_manager: CaManager | None = None
        self._authority: CaManagerAuthority | None = None
        self._svid: ServerSvid | None = None
        self._published_sequence = -1
        self._bundles_revision = -1
        self._bundle: SpiffeBundle | None = None
        self._publisher: BundlePublisher | None = None
        self._crls: CrlPublisher | None = None
        self._refresher: FederationRefresher | None = None
        self._refresher_task: asyncio.Task[None] | None = None
        self._endpoint: BundleEndpoint | None = None
        self._web_files: WebCertificateFiles | None = None
        self._last_prune = 0.0
        self._crls_pem = b""
        self._admin_socket: ClaimedSocket | None = None
        # Prometheus metrics only when a listener is configured (metrics_bind_address).
        self._metrics: ServerMetrics | None = ServerMetrics() if config.ops.metrics_host is not None else None
        self._metrics_listener: MetricsListener | None = None
        self.metrics_port = 0
        self._last_maintenance_ok = 0.0
        self._registry = PeerRegistry()
        self._front: TlsFront | None = None
        self._inner: grpc.aio.Server | None = None  # the node API for agents
        self._anonymous: grpc.aio.Server | None = None  # Attest and health, for connections without one
        self._admin: grpc.aio.Server | None = None
        self._health: list[HealthServicer] = []
        self._serving: bool | None = None  # the health status last set
        self._private_dir: Path | None = None
        self._maintenance: asyncio.Task[None] | None = None
        self._lock = threading.Lock()
        self._join_grace = JoinGrace.none(config.trust_domain)

    @property
    def datastore(self) -> Datastore:
        assert self._ds is not None
        return self._ds

    @property
    def ca_manager(self) -> CaManager:
        """The manager that rotates the CA's authorities (and builds the bundle)."""
        assert self._ca_manager is not None
        return self._ca_manager

    @property
    def ca(self) -> ServerCa:
        """The CA that signs every SVID, this server's own included."""
        return self.ca_manager.ca

    @property
    def server_svid(self) -> ServerSvid:
        assert self._svid is not None
        return self._svid

    # ------------------------------------------------------------------------------------------ start-up

    def _open_state(self) -> None:
        cfg = self.config
        _check_data_dir(cfg.data_dir)
        check_persistent_state(cfg.data_dir, cfg.datastore)  # never start over on half a data dir
        upstream = None
        if cfg.upstream_authority_cert is not None and cfg.upstream_authority_key is not None:
            upstream = UpstreamAuthority.load(
                cfg.upstream_authority_cert, cfg.upstream_authority_key, cfg.upstream_authority_bundle
            )
        self._ds = open_datastore(cfg.datastore or None, data_dir=cfg.data_dir)
        ca_config = CaConfig(
            ca_key_kind=cfg.ca_key_type,
            ca_ttl=dt.timedelta(seconds=cfg.ca_ttl),
            x509_svid_ttl=dt.timedelta(seconds=cfg.default_x509_svid_ttl),
            max_x509_svid_ttl=dt.timedelta(seconds=max(cfg.ca_ttl, cfg.default_x509_svid_ttl)),
            jwt_svid_ttl=dt.timedelta(seconds=cfg.default_jwt_svid_ttl),
            max_jwt_svid_ttl=dt.timedelta(seconds=max(86400.0, cfg.default_jwt_svid_ttl)),
            bundle_refresh_hint=dt.timedelta(seconds=int(cfg.federation_refresh_hint)),
        )
        # The CA keeps its journal (no secrets) here; none yet means this start creates the CA. Its keys are on
        # a PKCS#11 token when one is configured, else on disk beside the journal (0600).
        fresh_ca = not (cfg.data_dir / "ca" / "ca_journal.json").exists()
        key_manager = make_key_manager(cfg.ops)
        self._ca_manager = CaManager.open(
            cfg.data_dir / "ca", cfg.trust_domain, ca_config, upstream, key_manager=key_manager
        )
        if self._metrics is not None:
            self._metrics.register(
                ServerStateCollector(
                    ca=lambda: self._ca_manager,
                    connections=lambda: len(self._registry),
                    last_maintenance=lambda: self._last_maintenance_ok,
                )
            )
        self._publisher = BundlePublisher(self._ds, cfg.trust_domain, cfg.data_dir / "published_authorities.json")
        authority = CaManagerAuthority(self.ca_manager, bundle=lambda: self.bundle)
        self._authority = (
            InstrumentedAuthority(authority, self._metrics) if self._metrics is not None else authority  # type: ignore[assignment]
        )
        self._start_join_grace(fresh_ca)
        self._publish_bundle()
        self._crls = CrlPublisher(self.ca_manager, self._ds)
        self._crls.publish(force=True)
        self._refresher = FederationRefresher(self._ds, cfg.trust_domain)
        # The server's own TLS SVID is signed by the new CA at once, even in a join grace period: an agent
        # that does not know the CA yet fails the TLS handshake and fails over to another server (or retries),
        # which is what the grace period asks of it anyway; no workload ever relies on this SVID.
        self._svid = self._issue_server_svid()

    def _start_join_grace(self, fresh_ca: bool) -> None:
        """A brand-new server joining a trust domain others serve signs for nobody for ``join_grace``.

        Its CA is published to the shared bundle at once, but agents of the other servers only learn it with
        their next sync; SVIDs it signed meanwhile would fail verification there. Called before the first
        publish, so the stored bundle still shows only what the other servers published.
        """
        assert self._publisher is not None
        grace = self.config.join_grace
        if grace <= 0:
            return
        stored, _ = self._publisher.stored()
        stored_ids = None if stored is None else authority_ids(stored)
        if not join_grace_needed(fresh_ca=fresh_ca, mine=authority_ids(self.ca_manager.bundle()), stored=stored_ids):
            return
        self._join_grace = JoinGrace(self.config.trust_domain, time.monotonic() + grace)
        log.warning(
            "joining trust domain %s served by other servers: publishing this server's new CA, signing nothing "
            "for %gs (join_grace) so agents learn it first",
            self.config.trust_domain.name,
            grace,
        )

    def _joining(self) -> bool:
        return self._join_grace.remaining() > 0

    def _attestors(self) -> dict[str, NodeAttestor]:
        cfg = self.config
        attestors: dict[str, NodeAttestor] = {"join_token": JoinTokenAttestor(self.datastore, cfg.trust_domain)}
        if cfg.x509pop_ca_bundle:
            try:
                roots = load_ca_bundle(cfg.x509pop_ca_bundle)
            except (OSError, ValueError) as exc:
                raise StartupError(f"x509pop_ca_bundle: {exc}") from None
            attestors["x509pop"] = X509PopAttestor(cfg.trust_domain, roots)
        return attestors

    def _issue_server_svid(self) -> ServerSvid:
        """The node listener's own SVID, signed through the CA's one signing path like every SVID (same backdate,
        same caps, never outliving the CA); DNS SANs from config, an IP SAN for an IP bind."""
        cfg = self.config
        key = generate_key("ec-p256")
        ip = cfg.bind_ip
        try:
            chain = self.ca.sign_x509_svid(
                key.public_key(),
                cfg.trust_domain.spiffe_id("tessera", "server"),
                cfg.default_x509_svid_ttl,
                dns_names=cfg.dns_names,
                ip_addresses=[ip] if ip is not None and not ip.is_unspecified else [],
            )
        except BadSigningRequestError as exc:  # a configured DNS name no certificate may carry
            raise StartupError(f"dns_names: cannot issue the server SVID: {exc}") from None
        return ServerSvid(chain=tuple(chain), key=key)

    @property
    def bundle(self) -> SpiffeBundle:
        """The trust domain's published bundle: this server's authorities and those of servers sharing the store."""
        assert self._bundle is not None
        return self._bundle

    def _publish_bundle(self) -> bool:
        """Merges this server's authorities into the stored bundle when they changed; True when it did."""
        assert self._publisher is not None
        sequence = self.ca_manager.bundle_sequence
        if sequence == self._published_sequence:
            return False
        self._bundle = self._publisher.publish(self.ca_manager.bundle(), dt.datetime.now(dt.UTC))
        self._published_sequence = sequence
        self._bundles_revision = -1  # re-read below: another server may have written since
        return True

    def _refresh_bundle(self, now: dt.datetime) -> bool:
        """Follows bundle writes by other servers sharing the store; True when the authorities changed."""
        assert self._publisher is not None
        revision = self.datastore.revisions().bundles
        if revision == self._bundles_revision:
            return False
        stored, _ = self._publisher.stored()
        self._bundles_revision = revision
        mine = authority_ids(self.ca_manager.bundle())
        stale = stored is None or not mine <= authority_ids(stored)
        expired = stored is not None and any(c.not_valid_after_utc <= now for c in stored.x509_authorities)
        if stale or expired:  # ours went missing (or must be pruned): merge and write again
            self._published_sequence = -1
            self._publish_bundle()
            stored = self._bundle
        assert stored is not None
        if self._bundle is not None and same_authorities(stored, self._bundle):
            self._bundle = stored
            return False
        self._bundle = stored
        log.info("trust bundle changed in the datastore", extra={"x509_authorities": len(stored.x509_authorities)})
        return True

    def _tls_context(self) -> ssl.SSLContext:
        svid = self.server_svid
        return build_server_context(svid.chain, svid.key, self.bundle.x509_authorities)

    async def start(self) -> None:
        cfg = self.config
        try:
            await asyncio.to_thread(self._open_state)
            await self._start_servers()
        except BaseException:
            await self.stop()
            raise
        self._maintenance = asyncio.create_task(self._maintain(), name="tessera-server-maintenance")
        assert self._refresher is not None
        self._refresher_task = asyncio.create_task(self._refresher.run(self._stop), name="tessera-federation")
        endpoint = f", bundle endpoint on {cfg.federation_host}:{self.endpoint_port}" if self._endpoint else ""
        log.info(
            "tessera-server ready: node API on %s (TLS), admin API on %s%s, trust domain %s",
            f"{cfg.bind_host}:{self.node_port}",
            cfg.socket_path,
            endpoint,
            cfg.trust_domain,
            extra={"node_port": self.node_port},
        )

    async def _start_servers(self) -> None:
        cfg = self.config
        assert self._authority is not None
        attestors = self._attestors()
        node = NodeServicer(
            settings=NodeSettings(
                trust_domain=cfg.trust_domain,
                agent_ttl=cfg.agent_ttl,
                default_x509_svid_ttl=cfg.default_x509_svid_ttl,
                default_jwt_svid_ttl=cfg.default_jwt_svid_ttl,
            ),
            datastore=self.datastore,
            authority=self._authority,
            attestors=attestors,
            peers=self._registry,
            join_grace=self._join_grace,
        )
        ca_admin = CaAdmin(manager=self.ca_manager, datastore=self.datastore, on_ca_change=self._after_ca_change)
        admin = AdminServicer(
            settings=AdminSettings(trust_domain=cfg.trust_domain, join_token_ttl=cfg.join_token_ttl),
            datastore=self.datastore,
            authority=self._authority,
            ca_admin=ca_admin,
        )
        assert self._refresher is not None
        trust_admin = TrustAdminServicer(
            trust_domain=cfg.trust_domain,
            datastore=self.datastore,
            ca_admin=ca_admin,
            refresher=self._refresher,
            on_revocation=self._after_revocation,
        )
        # The node API's gRPC servers listen only on private sockets; the TLS front relays to them: agents to
        # the full node API, everyone else to Attest and health with a small receive limit.
        self._private_dir = Path(tempfile.mkdtemp(prefix="tessera-server-", dir="/tmp"))
        os.chmod(self._private_dir, 0o700)
        inner = InnerServers(agents=self._private_dir / "node.sock", anonymous=self._private_dir / "anon.sock")
        ops = cfg.ops
        interceptors = [
            MessageLimitInterceptor(),
            NodeApiInterceptor(
                self._metrics,
                self._registry,
                attestation_limiter=KeyedRateLimiter(ops.attestation_rate_limit),
                signing_limiter=KeyedRateLimiter(ops.signing_rate_limit),
            ),
        ]
        self._inner = grpc.aio.server(options=_node_options(AGENT_METHODS), interceptors=interceptors)
        ngrpc.add_NodeServicer_to_server(node, self._inner)  # type: ignore[no-untyped-call]
        self._add_health_and_reflection(self._inner, [NODE_SERVICE])
        self._inner.add_insecure_port(f"unix:{inner.agents}")
        await self._inner.start()
        self._anonymous = grpc.aio.server(
            options=[*_node_options(ANONYMOUS_NODE_METHODS), ("grpc.max_concurrent_streams", 4)],
            interceptors=interceptors,
        )
        self._anonymous.add_generic_rpc_handlers((anonymous_node_handler(node.Attest, self._registry),))
        self._add_health_and_reflection(self._anonymous, [NODE_SERVICE], reflection_too=False)
        self._anonymous.add_insecure_port(f"unix:{inner.anonymous}")
        await self._anonymous.start()

        self._admin = grpc.aio.server(options=GRPC_OPTIONS)
        agrpc.add_AdminServicer_to_server(admin, self._admin)  # type: ignore[no-untyped-call]
        agrpc.add_TrustAdminServicer_to_server(trust_admin, self._admin)  # type: ignore[no-untyped-call]
        self._add_health_and_reflection(self._admin, [ADMIN_SERVICE, TRUST_ADMIN_SERVICE])
        self._admin_socket = _claim_admin_socket(cfg.socket_path, self._admin)
        await self._admin.start()

        limits = FrontLimits(
            handshake_timeout=ops.node_api_handshake_timeout,
            first_request_timeout=ops.node_api_first_request_timeout,
            max_unauthenticated=ops.node_api_max_unauthenticated_connections,
            max_unauthenticated_per_source=ops.node_api_max_unauthenticated_connections_per_source,
        )
        self._front = TlsFront(
            inner, self._registry, self._tls_context(), limits, RateLimitedLog(log), authorize=self._agent_check
        )
        try:
            self.node_port = await self._front.start(cfg.bind_host, cfg.bind_port)
        except OSError as exc:
            raise StartupError(f"bind_address {cfg.bind_address}: cannot listen: {exc.strerror or exc}") from None
        if cfg.federation_host is not None:
            await self._start_bundle_endpoint()
        if self._metrics is not None and cfg.ops.metrics_host is not None:
            self._metrics_listener = MetricsListener(self._metrics.registry)
            try:
                self.metrics_port = self._metrics_listener.start(cfg.ops.metrics_host, cfg.ops.metrics_port)
            except OSError as exc:
                raise StartupError(f"metrics_bind_address: cannot listen: {exc.strerror or exc}") from None

    async def _agent_check(self, leaf: x509.Certificate) -> str | None:
        """For the TLS front: None when ``leaf`` is the current SVID of an attested, unbanned agent, else why not.
        A datastore failure lets the connection through: every call is authorized again anyway."""
        try:
            await asyncio.to_thread(authorize_agent, leaf, self.datastore, self.config.trust_domain, time.time())
        except ApiError as exc:
            return exc.message
        except DatastoreError as exc:
            log.debug("agent check at connect skipped: %s", exc)
        return None

    def _endpoint_context(self) -> ssl.SSLContext:
        if self._web_files is not None:
            return self._web_files.context
        return svid_context(self.server_svid.chain, self.server_svid.key)

    async def _start_bundle_endpoint(self) -> None:
        cfg = self.config
        assert cfg.federation_host is not None
        if cfg.federation_profile == "https_web":
            assert cfg.federation_cert is not None and cfg.federation_key is not None
            try:
                self._web_files = WebCertificateFiles(cfg.federation_cert, cfg.federation_key)
            except (OSError, ValueError) as exc:
                raise StartupError(str(exc)) from None
        self._endpoint = BundleEndpoint(
            cfg.federation_host,
            cfg.federation_port,
            self._endpoint_context(),
            document=lambda: self.bundle.to_document(),
            crls_pem=lambda: self._crls_pem,
        )
        try:
            await self._endpoint.start()
        except OSError as exc:
            raise StartupError(f"federation_bind_address: cannot listen: {exc.strerror or exc}") from None

    @property
    def endpoint_port(self) -> int:
        return self._endpoint.port if self._endpoint is not None else 0

    def _add_health_and_reflection(
        self, server: grpc.aio.Server, services: list[str], *, reflection_too: bool = True
    ) -> None:
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        self._health.append(health)
        if reflection_too:
            names = (*services, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
            reflection.enable_server_reflection(names, server)

    async def _set_health(self, serving: bool) -> None:
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for health in self._health:
            await health.set("", status)
            await health.set(NODE_SERVICE, status)
            await health.set(ADMIN_SERVICE, status)
            await health.set(TRUST_ADMIN_SERVICE, status)

    # ------------------------------------------------------------------------------------------- upkeep

    def _after_ca_change(self) -> None:
        """After a forced prepare/activate/taint/revoke: publish the bundle and CRLs and refresh TLS at once."""
        self._maintenance_step(force_svid=True)

    def _after_revocation(self) -> None:
        """After an SVID revocation: sign and publish the CRLs now (agents get them with their next sync)."""
        with self._lock:
            assert self._crls is not None
            self._crls.publish(force=True)
            self._crls_pem = crls_to_pem(c.crl for c in self.datastore.list_crls())

    def _maintenance_step(self, force_svid: bool = False) -> None:
        with self._lock:
            now = dt.datetime.now(dt.UTC)
            for event in self.ca_manager.tick(now):
                log.info("CA rotation: %s %s %s", event.kind, event.action.name.lower(), ",".join(event.authority_ids))
            bundle_changed = self._publish_bundle()
            bundle_changed = self._refresh_bundle(now) or bundle_changed
            svid_changed = False
            active = self.ca_manager.active_x509_authority
            svid = self.server_svid
            issuer_gone = (
                active is None or svid.chain[1:] != active.chain_from_ca or not issued_by(svid.leaf, active.certificate)
            )
            if force_svid or svid.due_for_renewal(now) or (issuer_gone and active is not None):
                self._svid = self._issue_server_svid()
                svid_changed = True
                log.info("server SVID renewed", extra={"expires_at": self._svid.leaf.not_valid_after_utc.isoformat()})
            if (bundle_changed or svid_changed) and self._front is not None:
                self._front.set_context(self._tls_context())
            assert self._crls is not None
            if self._crls.publish(now) or bundle_changed or not self._crls_pem:
                self._crls_pem = crls_to_pem(c.crl for c in self.datastore.list_crls())
            if self._endpoint is not None:
                if self._web_files is not None:
                    reloaded = self._web_files.reload_if_changed()
                    if reloaded is not None:
                        self._endpoint.set_context(reloaded)
                elif svid_changed:
                    self._endpoint.set_context(self._endpoint_context())
            if time.time() - self._last_prune >= PRUNE_INTERVAL:
                self._last_prune = time.time()
                self._prune(int(self._last_prune))

    def _prune(self, now: int) -> None:
        ds = self.datastore
        expired = ds.prune_expired_entries(now)
        if expired:
            log.info("pruned %d expired entries", len(expired))
        ds.prune_join_tokens(now)
        ds.prune_tombstones(now - TOMBSTONE_RETENTION)
        ds.prune_issued_and_revoked(now)

    def _can_serve(self) -> bool:
        """Whether agents can be served at all: an active CA that has not expired and a current server SVID."""
        now = dt.datetime.now(dt.UTC)
        active = self.ca_manager.active_x509_authority
        svid = self._svid
        return (
            active is not None
            and active.certificate.not_valid_after_utc > now
            and svid is not None
            and svid.leaf.not_valid_after_utc > now
        )

    async def _maintain(self) -> None:
        failures = 0
        while not self._stop.is_set():
            try:
                await asyncio.to_thread(self._maintenance_step)
                failures = 0
                self._last_maintenance_ok = time.time()
            except Exception:
                failures += 1
                log.exception("maintenance step failed (will retry)")
            # Health follows what agents would meet: NOT_SERVING while nothing can be signed, or while the
            # upkeep keeps failing (rotation, bundle publishing), so orchestrators and load balancers notice;
            # also during a join grace period, when the signing RPCs refuse.
            healthy = failures < MAX_MAINTENANCE_FAILURES and self._can_serve() and not self._joining()
            # Compared with what was last set (None: serve_ready() has not run yet and decides the first status).
            if self._serving is not None and healthy != self._serving and not self._stop.is_set():
                (log.info if healthy else log.error)("health: %s", "SERVING" if healthy else "NOT_SERVING")
                await self._set_health(healthy)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), MAINTENANCE_INTERVAL)

    # ------------------------------------------------------------------------------------------ running

    async def serve_ready(self) -> None:
        await self._set_health(not self._joining())  # the maintenance loop turns it SERVING when a grace ends

    def request_stop(self) -> None:
        self._stop.set()

    async def wait(self) -> None:
        await self._stop.wait()

    async def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(Exception):
            await self._set_health(False)
        for task in (self._maintenance, self._refresher_task):
            if task is not None:
                with contextlib.suppress(Exception):
                    await task
        if self._endpoint is not None:
            await self._endpoint.close()
        if self._metrics_listener is not None:
            await asyncio.to_thread(self._metrics_listener.stop)
            self._metrics_listener = None
        if self._front is not None:
            await self._front.close()
        for server in (self._inner, self._anonymous, self._admin):
            if server is not None:
                await server.stop(SHUTDOWN_GRACE)
        self._inner = self._anonymous = self._admin = None
        if self._admin_socket is not None:  # only ours: never another server's we refused to replace
            self._admin_socket.release()
            self._admin_socket = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None
        if self._ds is not None:
            self._ds.close()
            self._ds = None


async def run_server(config: ServerConfig) -> None:
    # A flood of failed accepts or handshakes must not become a flood of log lines (asyncio logs each).
    bound_loop_exceptions(asyncio.get_running_loop(), RateLimitedLog(log))
    raise_fd_limit()
    app = ServerApp(config)
    await app.start()
    await app.serve_ready()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, app.request_stop)
    try:
        await app.wait()
        log.info("shutting down")
    finally:
        await app.stop()
        log.info("tessera-server stopped")


def main_run(args: argparse.Namespace) -> int:
    """`tessera-server run`: configuration, logging, then serve until SIGTERM/SIGINT."""
    try:
        values = load_settings("server", SETTINGS, args.config, vars(args))
        config = build_config(values)
    except ConfigError as exc:
        print(f"tessera-server: configuration error: {exc}", file=sys.stderr)
        return 1
    setup_logging(config.log_level, config.log_format)
    try:
        asyncio.run(run_server(config))
    except (TesseraError, OSError, ValueError) as exc:
        message = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        print(f"tessera-server: error: {message}", file=sys.stderr)
        return 1
    return 0
