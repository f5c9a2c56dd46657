"""``tessera-agent run``: wires node identity, sync, cache and the Workload API endpoint together."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tessera._daemon.fdlimit import raise_fd_limit
from tessera._daemon.ratelog import RateLimitedLog, bound_loop_exceptions
from tessera._daemon.sockets import path_length_problem
from tessera.agent.attestors import DEFAULT_MAX_HASH_BYTES, ExecutableHasher, default_attestors
from tessera.agent.cache import WorkloadCache
from tessera.agent.endpoint.server import WorkloadEndpoint
from tessera.agent.errors import AgentError, NodeIdentityError, ServerUnavailableError
from tessera.agent.limits import (
    DEFAULT_FIRST_REQUEST_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_PER_CALLER,
    DEFAULT_MAX_STREAMS_PER_CALLER,
    ConcurrencyLimiter,
)
from tessera.agent.metrics import (
    AgentMetrics,
    AgentStateCollector,
    MetricsListener,
    WorkloadApiInterceptor,
    instrument_sync,
)
from tessera.agent.node import NodeClient, NodeConfig
from tessera.agent.rotation import backoff_delay
from tessera.agent.sync import SyncLoop
from tessera.sdk.config import ConfigError, Setting, parse_duration
from tessera.sdk.errors import SpiffeIdError
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.workloadapi.wire import DEFAULT_SOCKET_RULE, default_socket_path

log = logging.getLogger(__name__)

SETTINGS: tuple[Setting, ...] = (
    Setting("trust_domain", "str", required=True, help="trust domain served by the server, e.g. example.org"),
    Setting("server_address", "list", required=True, help="server HOST:PORT, several comma separated (failover)"),
    Setting("trust_bundle", "path", help="PEM CA certificates to trust the server (tessera-server bundle show)"),
    Setting("insecure_bootstrap", "bool", False, help="trust whatever server answers first and pin its bundle"),
    Setting("join_token", "str", help="one-time join token for the first node attestation"),
    Setting("x509pop_cert", "path", help="host certificate chain (PEM) for x509pop node attestation"),
    Setting("x509pop_key", "path", help="host private key (PEM) for x509pop node attestation"),
    Setting("server_name", "str", help="TLS name to verify the server as (default: host of the address)"),
    Setting("data_dir", "path", "./.tessera/agent", help="where the agent keeps its SVID and bundle"),
    Setting("socket", "path", None, help=f"Workload API socket path (default: {DEFAULT_SOCKET_RULE})"),
    Setting("sync_interval", "duration", 5.0, help="seconds between syncs with the server"),
    Setting("sync_max_backoff", "duration", 300.0, help="longest wait between sync attempts while unreachable"),
    Setting("x509_svid_cache_max_size", "int", 1000, help="soft cap on cached SVIDs no workload is watching"),
    Setting("log_level", "str", "info", help="debug, info, warning or error"),
    Setting("log_format", "str", "text", help="text or json"),
    Setting("metrics_bind_address", "str", None, help="HOST:PORT of the Prometheus /metrics listener (off if unset)"),
    Setting(
        "workload_api_max_streams_per_caller",
        "int",
        DEFAULT_MAX_STREAMS_PER_CALLER,
        help="open Workload API streams allowed per caller uid (0 = no limit)",
    ),
    Setting(
        "workload_attestor_max_hash_bytes",
        "int",
        DEFAULT_MAX_HASH_BYTES,
        help="largest executable hashed for unix:sha256 selectors, in bytes; larger ones get none (logged)",
    ),
    Setting(
        "workload_api_max_connections_per_caller",
        "int",
        DEFAULT_MAX_CONNECTIONS_PER_CALLER,
        help="Workload API connections one caller uid may hold open; more are closed at once (0 = no limit)",
    ),
    Setting(
        "workload_api_first_request_timeout",
        "duration",
        f"{DEFAULT_FIRST_REQUEST_TIMEOUT:g}s",
        help="Workload API connections that send nothing this long after connecting are closed",
    ),
)


@dataclass(frozen=True, slots=True)
class AgentSettings:
    node: NodeConfig
    socket: str
    sync_interval: float
    sync_max_backoff: float
    cache_max: int
    metrics_address: tuple[str, int] | None = None
    max_streams_per_caller: int = DEFAULT_MAX_STREAMS_PER_CALLER
    max_hash_bytes: int = DEFAULT_MAX_HASH_BYTES
    max_connections_per_caller: int = DEFAULT_MAX_CONNECTIONS_PER_CALLER
    first_request_timeout: float = DEFAULT_FIRST_REQUEST_TIMEOUT

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> AgentSettings:
        try:
            td = TrustDomain.parse(values["trust_domain"])
        except SpiffeIdError as exc:
            raise ConfigError(f"trust_domain: {exc}") from exc
        addresses = tuple(a.strip() for a in values["server_address"] if a.strip())
        for address in addresses:
            host, sep, port = address.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ConfigError(f"server_address: {address!r} is not HOST:PORT")
        if values["trust_bundle"] and values["insecure_bootstrap"]:
            raise ConfigError("trust_bundle: choose either --trust-bundle or --insecure-bootstrap, not both")
        if bool(values["x509pop_cert"]) != bool(values["x509pop_key"]):
            raise ConfigError("x509pop_cert: x509pop needs both --x509pop-cert and --x509pop-key")
        if values["sync_interval"] <= 0:
            raise ConfigError("sync_interval: must be positive")
        if values["x509_svid_cache_max_size"] < 1:
            raise ConfigError("x509_svid_cache_max_size: must be at least 1")
        metrics_address = _host_port(values.get("metrics_bind_address"), "metrics_bind_address")
        max_streams = values.get("workload_api_max_streams_per_caller")
        max_streams = DEFAULT_MAX_STREAMS_PER_CALLER if max_streams is None else int(max_streams)
        if max_streams < 0:
            raise ConfigError("workload_api_max_streams_per_caller: must be 0 (no limit) or positive")
        max_hash = values.get("workload_attestor_max_hash_bytes")
        max_hash = DEFAULT_MAX_HASH_BYTES if max_hash is None else int(max_hash)
        if max_hash < 0:
            raise ConfigError("workload_attestor_max_hash_bytes: must be 0 (never hash) or positive")
        max_connections = values.get("workload_api_max_connections_per_caller")
        max_connections = DEFAULT_MAX_CONNECTIONS_PER_CALLER if max_connections is None else int(max_connections)
        if max_connections < 0:
            raise ConfigError("workload_api_max_connections_per_caller: must be 0 (no limit) or positive")
        raw_timeout = values.get("workload_api_first_request_timeout")
        first_request = DEFAULT_FIRST_REQUEST_TIMEOUT if raw_timeout is None else parse_duration(
            raw_timeout, "workload_api_first_request_timeout"
        )
        if not 0 < first_request <= 600:
            raise ConfigError(
                f"workload_api_first_request_timeout: must be more than 0s and at most 10m, got {first_request:g}s"
            )
        return cls(
            node=NodeConfig(
                trust_domain=td,
                server_addresses=addresses,
                data_dir=Path(values["data_dir"]).absolute(),
                trust_bundle_path=values["trust_bundle"],
                insecure_bootstrap=bool(values["insecure_bootstrap"]),
                join_token=values["join_token"],
                x509pop_cert=values["x509pop_cert"],
                x509pop_key=values["x509pop_key"],
                server_name=values["server_name"],
            ),
            socket=_socket_path(values["socket"]),
            sync_interval=float(values["sync_interval"]),
            sync_max_backoff=float(values["sync_max_backoff"]),
            cache_max=int(values["x509_svid_cache_max_size"]),
            metrics_address=metrics_address,
            max_streams_per_caller=max_streams,
            max_hash_bytes=max_hash,
            max_connections_per_caller=max_connections,
            first_request_timeout=first_request,
        )


def _socket_path(value: str | None) -> str:
    """The Workload API socket: the setting, else this user's default; checked for length up front so an
    over-long path stops start-up here rather than at bind time (the staging path is longer still)."""
    path = str(Path(value or default_socket_path()).absolute())
    problem = path_length_problem(path)
    if problem:
        raise ConfigError(f"socket: {problem}")
    return path


def _host_port(text: str | None, key: str) -> tuple[str, int] | None:
    if not text:
        return None
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: expected HOST:PORT, got {text!r}")
    return host, int(port)


class Agent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.metrics_port = 0
        self.cache = WorkloadCache(settings.node.trust_domain.id_string, max_unwatched_svids=settings.cache_max)
        self.node = NodeClient(settings.node)
        self.sync = SyncLoop(
            self.node, self.cache, interval=settings.sync_interval, max_backoff=settings.sync_max_backoff
        )
        # Metrics (opt-in) and the per-caller stream cap (always) wrap the Workload API; see tessera.agent.metrics.
        self.metrics = AgentMetrics() if settings.metrics_address is not None else None
        self.hasher = ExecutableHasher(max_bytes=settings.max_hash_bytes)
        self._metrics_listener: MetricsListener | None = None
        self.endpoint = WorkloadEndpoint(
            settings.socket,
            self.cache,
            # Executables are hashed only while some entry selects by unix:sha256, and never above the bound.
            default_attestors(selector_in_use=self.cache.uses_selector_type, hasher=self.hasher),
            minter=self.sync.mint_jwt,
            interceptors=[
                WorkloadApiInterceptor(
                    self.metrics, self._caller_uid, ConcurrencyLimiter(settings.max_streams_per_caller)
                )
            ],
            max_connections_per_caller=settings.max_connections_per_caller,
            first_request_timeout=settings.first_request_timeout,
        )
        if self.metrics is not None:
            instrument_sync(self.sync, self.metrics)
            self.metrics.registry.register(AgentStateCollector(self.cache, self.sync, self.node, hasher=self.hasher))

    def _caller_uid(self, peer: str) -> int | None:
        process = self.endpoint.registry.lookup(peer)
        return None if process is None else process.uid

    async def _start_node(self, stop: asyncio.Event) -> bool:
        failures = 0
        while not stop.is_set():
            try:
                await self.node.start()
                return True
            except ServerUnavailableError as exc:
                failures += 1
                delay = backoff_delay(failures, self.settings.sync_interval, self.settings.sync_max_backoff)
                log.warning("cannot reach the server yet (%s); retrying in %.1fs", exc, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        return False

    async def _mark_healthy(self) -> None:
        while not self.cache.ready:
            await self.cache.changed().wait()
        await self.endpoint.set_serving(True)

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until ``stop`` is set; raises NodeIdentityError when the agent cannot authenticate."""
        raise_fd_limit()
        self.node.store.ensure_dir()  # the agent's own 0700 directory, checked before anything is served
        if self.metrics is not None and self.settings.metrics_address is not None:
            host, port = self.settings.metrics_address
            listener = MetricsListener(self.metrics.registry)
            try:
                self.metrics_port = listener.start(host, port)
            except OSError as exc:
                message = f"metrics_bind_address: cannot listen on {host}:{port}: {exc.strerror or exc}"
                raise AgentError(message) from None
            self._metrics_listener = listener
        await self.endpoint.start()
        tasks: list[asyncio.Task[Any]] = []
        try:
            if not await self._start_node(stop):
                return
            tasks = [
                asyncio.create_task(self.sync.run(stop), name="sync"),
                asyncio.create_task(self._mark_healthy(), name="health"),
            ]
            stopper = asyncio.create_task(stop.wait())
            done, _ = await asyncio.wait([tasks[0], stopper], return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if tasks[0] in done:
                tasks[0].result()  # re-raises NodeIdentityError
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            await self.endpoint.stop()
            await self.node.close()
            if self._metrics_listener is not None:
                await asyncio.to_thread(self._metrics_listener.stop)
                self._metrics_listener = None
            log.info("agent stopped")


async def run_agent(settings: AgentSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # A flood of failed accepts (EMFILE) must not become a flood of log lines (asyncio logs each).
    bound_loop_exceptions(loop, RateLimitedLog(log))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    agent = Agent(settings)
    await agent.run(stop)


__all__ = ["SETTINGS", "Agent", "AgentSettings", "NodeIdentityError", "run_agent"]
