"""Prometheus metrics of the server, on an opt-in HTTP listener (``metrics_bind_address``).

What an operator needs to alert on before agents notice: the CA about to expire without a successor,
signing failing or slowing, attestation failures (by reason: a wave of PERMISSION_DENIED is an attack or a
misconfigured fleet), rate limiting kicking in, and the maintenance loop (rotation, bundle publication) no
longer running. Everything lives in a per-server :class:`~prometheus_client.CollectorRegistry`, so several
servers in one process (tests) never collide, and nothing secret is ever a label (SPIFFE IDs of agents are
not labels either: unbounded cardinality).

Three pieces, wired by :mod:`tessera.server.app`:

- :class:`InstrumentedAuthority` wraps the CA for the APIs: SVIDs issued, signing latency and errors;
- :class:`NodeApiInterceptor` wraps every node API method: calls and latency by method and status code,
  attestation failures by reason, and the rate limits of :mod:`tessera.server.limits`;
- :class:`ServerStateCollector` reads the CA and the TLS front at scrape time: seconds until the active CA and
  JWT key expire, seconds since the last good maintenance pass, open agent connections.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Any, Protocol

import grpc
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from tessera._daemon.metrics import MetricsListener
from tessera.sdk.grpc import rewrap_handler
from tessera.server.limits import KeyedRateLimiter

log = logging.getLogger("tessera.server.metrics")

NODE_SERVICE = "/tessera.node.v1.Node/"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class ServerMetrics:
    """The server's metric objects, registered in their own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(namespace="tessera_server", registry=r)
        self.svids_issued = Counter(
            "tessera_server_svids_issued", "SVIDs signed (x509: X509-SVIDs incl. agent SVIDs; jwt: JWT-SVIDs)",
            ["kind"], registry=r,
        )  # fmt: skip
        self.signing_seconds = Histogram(
            "tessera_server_signing_duration_seconds", "time the CA took to sign one SVID", ["kind"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.signing_errors = Counter(
            "tessera_server_signing_errors", "signing attempts that failed, by kind and error class",
            ["kind", "reason"], registry=r,
        )  # fmt: skip
        self.rpcs = Counter(
            "tessera_server_node_rpcs", "node API calls by method and status code", ["method", "code"], registry=r
        )
        self.rpc_seconds = Histogram(
            "tessera_server_node_rpc_duration_seconds", "node API call latency by method", ["method"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.attestation_failures = Counter(
            "tessera_server_attestation_failures", "node attestations refused, by reason (status code)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.rate_limited = Counter(
            "tessera_server_rate_limited", "calls refused with RESOURCE_EXHAUSTED by a rate limit", ["limit"],
            registry=r,
        )  # fmt: skip
        for kind in ("x509", "jwt"):  # export zeros from the start so rate() and alerts see the series
            self.svids_issued.labels(kind)
            self.signing_seconds.labels(kind)
            self.signing_errors.labels(kind, "none")
        for limit in ("attestation", "signing"):
            self.rate_limited.labels(limit)

    def register(self, collector: Collector) -> None:
        self.registry.register(collector)


# ------------------------------------------------------------------------------------------- the CA


class InstrumentedAuthority:
    """The APIs' CA interface (:class:`tessera.server.api.authority.Authority`), timed and counted.

    Everything but signing passes through unchanged (``__getattr__``), so the wrapper never falls behind the
    protocol it wraps.
    """

    def __init__(self, inner: Any, metrics: ServerMetrics) -> None:
        self._inner = inner
        self._metrics = metrics

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _timed(self, kind: str, call: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        try:
            result = call()
        except Exception as exc:
            self._metrics.signing_errors.labels(kind, type(exc).__name__).inc()
            raise
        self._metrics.signing_seconds.labels(kind).observe(time.perf_counter() - start)
        self._metrics.svids_issued.labels(kind).inc()
        return result

    def sign_x509_svid(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("x509", lambda: self._inner.sign_x509_svid(*args, **kwargs))

    def mint_jwt_svid(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed("jwt", lambda: self._inner.mint_jwt_svid(*args, **kwargs))


# -------------------------------------------------------------------------------------- the node API


class PeerSource(Protocol):
    """What the TLS front knows about the connection behind an inner ``unix:`` peer string."""

    def lookup(self, peer: str) -> Any: ...


def _caller_address(peers: PeerSource, context: Any) -> str:
    info = peers.lookup(context.peer())
    address = getattr(info, "address", "") if info is not None else ""
    # "ip:port" -> "ip": the limit is per host, not per connection.
    host = str(address).rsplit(":", 1)[0] if address else "unknown"
    return host.strip("[]")


def _caller_agent(peers: PeerSource, context: Any) -> str | None:
    """The URI SAN of the verified client certificate (authorization proper happens in the servicer)."""
    from cryptography import x509

    info = peers.lookup(context.peer())
    leaf = getattr(info, "leaf", None) if info is not None else None
    if leaf is None:
        return None
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return str(uris[0]) if len(uris) == 1 else None


def _code_name(context: Any) -> str:
    try:
        code = context.code()
    except Exception:  # older grpcio: no code() on aio contexts
        code = None
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(code)


class NodeApiInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Counts and times every node API call, and applies the attestation and signing rate limits."""

    def __init__(
        self,
        metrics: ServerMetrics | None,
        peers: PeerSource,
        attestation_limiter: KeyedRateLimiter | None = None,
        signing_limiter: KeyedRateLimiter | None = None,
    ) -> None:
        self._metrics = metrics
        self._peers = peers
        self._attest_limit = attestation_limiter
        self._sign_limit = signing_limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method_path: str = handler_call_details.method
        if handler is None or not method_path.startswith(NODE_SERVICE):
            return handler
        method = method_path[len(NODE_SERVICE) :]
        return rewrap_handler(handler, lambda b: self._wrap_unary(method, b), lambda b: self._wrap_stream(method, b))

    async def _admit(self, method: str, request: Any, context: Any) -> None:
        """Aborts with RESOURCE_EXHAUSTED when a rate limit refuses the call."""
        if method == "Attest" and self._attest_limit is not None and self._attest_limit.enabled:
            address = _caller_address(self._peers, context)
            wait = self._attest_limit.check(address)
            if wait:
                await self._refuse(context, "attestation", f"too many node attestations from {address}", wait)
        if method == "BatchSignX509SVID" and self._sign_limit is not None and self._sign_limit.enabled:
            agent = _caller_agent(self._peers, context)
            if agent is not None:
                cost = max(1, len(getattr(request, "requests", ())))
                wait = self._sign_limit.check(agent, cost)
                if wait:
                    await self._refuse(context, "signing", f"signing rate limit reached for {agent}", wait)

    async def _refuse(self, context: Any, limit: str, message: str, wait: float) -> None:
        if self._metrics is not None:
            self._metrics.rate_limited.labels(limit).inc()
        hint = (
            "the request can never pass: it is larger than the limit"
            if wait == float("inf")
            else (f"retry in {wait:.1f}s")
        )
        await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"{message}; {hint}")

    def _record(self, method: str, context: Any, start: float, failed: BaseException | None) -> None:
        code = _code_name(context)
        if failed is not None and code == "OK":
            code = "UNKNOWN" if isinstance(failed, Exception) else "CANCELLED"
        metrics = self._metrics
        if metrics is None:
            return
        metrics.rpcs.labels(method, code).inc()
        metrics.rpc_seconds.labels(method).observe(time.perf_counter() - start)
        if method == "Attest" and code != "OK":
            reason = "rate_limited" if code == "RESOURCE_EXHAUSTED" else code.lower()
            metrics.attestation_failures.labels(reason).inc()

    @contextlib.asynccontextmanager
    async def _observed(self, method: str, request: Any, context: Any) -> AsyncIterator[None]:
        """Admits the call (rate limits), then records its outcome and time however it ends."""
        start = time.perf_counter()
        failed: BaseException | None = None
        try:
            await self._admit(method, request, context)
            yield
        except BaseException as exc:
            failed = exc
            raise
        finally:
            self._record(method, context, start, failed)

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: Any) -> Any:
            async with self._observed(method, request, context):
                return await behavior(request, context)

        return wrapper

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Any]:
        async def wrapper(request_iterator: Any, context: Any) -> Any:
            async with self._observed(method, None, context):
                result = behavior(request_iterator, context)
                if inspect.isasyncgen(result):
                    async for message in result:
                        await context.write(message)
                    return None
                return await result

        return wrapper


# ------------------------------------------------------------------------------------- scrape-time state


class CaView(Protocol):
    @property
    def active_x509_authority(self) -> Any: ...

    @property
    def active_jwt_authority(self) -> Any: ...

    def bundle_x509_authorities(self) -> Sequence[Any]: ...


class ServerStateCollector(Collector):
    """Reads the CA and connection state when Prometheus scrapes (nothing to keep in sync)."""

    def __init__(
        self,
        ca: Callable[[], CaView | None],
        connections: Callable[[], int],
        last_maintenance: Callable[[], float],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ca = ca
        self._connections = connections
        self._last_maintenance = last_maintenance
        self._clock = clock

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())  # collected lazily; names are documented in the module docstring

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self._clock()
        expiry = GaugeMetricFamily(
            "tessera_server_ca_expiry_seconds",
            "seconds until the active authority expires (x509: the signing CA certificate; jwt: the JWT key)",
            labels=["kind"],
        )
        ca = self._ca()
        authorities = GaugeMetricFamily("tessera_server_bundle_x509_authorities", "X.509 roots in the trust bundle")
        if ca is not None:
            x509_ca = ca.active_x509_authority
            if x509_ca is not None:
                not_after = x509_ca.certificate.not_valid_after_utc.timestamp()
                expiry.add_metric(["x509"], not_after - now)
            jwt_key = ca.active_jwt_authority
            not_after_jwt = getattr(getattr(jwt_key, "lifetime", None), "not_after", None)
            if isinstance(not_after_jwt, dt.datetime):
                expiry.add_metric(["jwt"], not_after_jwt.timestamp() - now)
            try:
                authorities.add_metric([], len(ca.bundle_x509_authorities()))
            except Exception:  # the CA is rotating under the lock: skip this scrape's value
                log.debug("bundle size unavailable at scrape", exc_info=True)
        yield expiry
        yield authorities
        last = self._last_maintenance()
        since = GaugeMetricFamily(
            "tessera_server_maintenance_seconds_since_success",
            "seconds since the maintenance loop (CA rotation, bundle publication) last completed",
        )
        since.add_metric([], now - last if last else float("nan"))
        yield since
        conns = GaugeMetricFamily("tessera_server_node_connections", "open TLS connections on the node API")
        conns.add_metric([], self._connections())
        yield conns


__all__ = [
    "InstrumentedAuthority",
    "MetricsListener",
    "NodeApiInterceptor",
    "ServerMetrics",
    "ServerStateCollector",
]
