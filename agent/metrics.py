"""Prometheus metrics of the agent, on an opt-in HTTP listener (``metrics_bind_address``).

The questions an operator asks of an agent: is it syncing (duration, errors by reason, seconds since the last
success), are workloads getting identities (Workload API calls by status code, streams open, attestation
failures by reason, callers refused by the stream cap), and is anything about to expire (seconds until the
soonest cached SVID expires, the agent's own SVID too, and the rotation lag: how long the most overdue SVID is
past its rotation time). Labels never carry SPIFFE IDs, uids or pids (unbounded cardinality).

- :class:`WorkloadApiInterceptor` wraps the Workload API's gRPC methods (and enforces the per-caller stream
  cap of :mod:`tessera.agent.limits`, answering RESOURCE_EXHAUSTED);
- :func:`instrument_sync` times each sync round of a :class:`~tessera.agent.sync.SyncLoop`;
- :class:`AgentStateCollector` reads the cache, the node identity and the executable hasher at scrape time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from tessera._daemon.metrics import MetricsListener
from tessera.agent.endpoint.holders import CLOSED, NOT_HELD, SHARED_PREFIX
from tessera.agent.endpoint.status import WORKLOAD_API_STATUS
from tessera.agent.limits import ConcurrencyLimiter, StreamLimitExceeded
from tessera.sdk.grpc import rewrap_handler

log = logging.getLogger("tessera.agent.metrics")

WORKLOAD_SERVICE = "/SpiffeWorkloadAPI/"
STREAM_METHODS = frozenset({"FetchX509SVID", "FetchX509Bundles", "FetchJWTBundles"})
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class AgentMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(namespace="tessera_agent", registry=r)
        self.sync_seconds = Histogram(
            "tessera_agent_sync_duration_seconds", "duration of one sync round (pull entries, sign, apply)",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.sync_errors = Counter(
            "tessera_agent_sync_errors", "sync rounds that failed, by reason (status code or error class)",
            ["reason"], registry=r,
        )  # fmt: skip
        self.rpcs = Counter(
            "tessera_agent_workload_api_rpcs", "Workload API calls by method and final status code",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.rpc_seconds = Histogram(
            "tessera_agent_workload_api_latency_seconds",
            "Workload API latency by method (unary: whole call; streams: time to the first response)",
            ["method"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.streams_open = Gauge(
            "tessera_agent_workload_api_streams_open", "Workload API streams open now", ["method"], registry=r
        )
        self.attestation_failures = Counter(
            "tessera_agent_workload_attestation_failures",
            "Workload API callers refused before or at attestation, by reason", ["reason"], registry=r,
        )  # fmt: skip
        self.stream_limit_refusals = Counter(
            "tessera_agent_stream_limit_refusals", "streams refused by the per-caller cap", registry=r
        )
        self.sync_errors.labels("none")  # a series from the start (rate() of a missing series is not zero)
        for method in STREAM_METHODS:
            self.streams_open.labels(method)


# ------------------------------------------------------------------------------------------ the sync


def _reason(exc: BaseException) -> str:
    code = getattr(exc, "code", None)
    if callable(code):
        try:
            value = code()
        except Exception:
            value = None
        if isinstance(value, grpc.StatusCode):
            return str(value.name).lower()
    return type(exc).__name__


def instrument_sync(sync_loop: Any, metrics: AgentMetrics) -> None:
    """Times every ``sync_once`` of ``sync_loop`` and counts its failures (the loop itself is unchanged)."""
    inner: Callable[[], Awaitable[None]] = sync_loop.sync_once

    async def timed_sync_once() -> None:
        start = time.perf_counter()
        try:
            await inner()
        except BaseException as exc:
            if isinstance(exc, Exception):
                metrics.sync_errors.labels(_reason(exc)).inc()
            raise
        finally:
            metrics.sync_seconds.observe(time.perf_counter() - start)

    sync_loop.sync_once = timed_sync_once


# ------------------------------------------------------------------------------------ the Workload API


def _code_name(context: Any) -> str:
    try:
        code = context.code()
    except Exception:
        code = None
    if code is None:
        return "OK"
    return str(code.name) if isinstance(code, grpc.StatusCode) else str(code)


def _failure_reason(code: str, details: str) -> str | None:
    """Callers turned away for who they are (not for what they asked): the attestation failure reasons."""
    if code == "PERMISSION_DENIED":
        if details.startswith("the process that connected has"):
            return "caller_changed"  # exec'd, moved to another cgroup or exited since it connected
        if details.startswith((SHARED_PREFIX, NOT_HELD, CLOSED, "cannot check who holds")):
            return "shared_connection"
        return "no_identity"
    if code == "UNAVAILABLE" and "attestation failed" in details:
        return "attestation_error"
    if code == "UNAVAILABLE" and "could not be identified" in details:
        return "unidentified_caller"
    if code == "INVALID_ARGUMENT" and "security header" in details:
        return "missing_security_header"
    if code == "RESOURCE_EXHAUSTED":
        return "stream_limit"
    return None


class WorkloadApiInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Metrics for every Workload API method, and the per-caller (uid) cap on open streams."""

    def __init__(
        self,
        metrics: AgentMetrics | None,
        caller_uid: Callable[[str], int | None],
        limiter: ConcurrencyLimiter | None = None,
    ) -> None:
        self._metrics = metrics
        self._caller_uid = caller_uid
        self._limiter = limiter

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        path: str = handler_call_details.method
        if handler is None or not path.startswith(WORKLOAD_SERVICE):
            return handler
        method = path[len(WORKLOAD_SERVICE) :]
        return rewrap_handler(
            handler, lambda b: self._wrap_unary(method, b), lambda b: self._wrap_stream(method, b)
        )

    def _record(self, method: str, context: Any, failed: BaseException | None) -> None:
        if self._metrics is None:
            return
        code = _code_name(context)
        if failed is not None and code == "OK":
            code = "UNKNOWN" if isinstance(failed, Exception) else "CANCELLED"
        self._metrics.rpcs.labels(method, code).inc()
        details = ""
        try:
            details = context.details() or ""
        except Exception:
            details = ""
        reason = _failure_reason(code, details if isinstance(details, str) else str(details))
        if reason is not None:
            self._metrics.attestation_failures.labels(reason).inc()

    def _wrap_unary(self, method: str, behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
        async def wrapper(request: Any, context: Any) -> Any:
            start = time.perf_counter()
            failed: BaseException | None = None
            try:
                return await behavior(request, context)
            except BaseException as exc:
                failed = exc
                raise
            finally:
                if self._metrics is not None:
                    self._metrics.rpc_seconds.labels(method).observe(time.perf_counter() - start)
                self._record(method, context, failed)

        return wrapper

    def _wrap_stream(self, method: str, behavior: Callable[..., Any]) -> Callable[..., AsyncIterator[Any]]:
        async def wrapper(request: Any, context: Any) -> AsyncIterator[Any]:
            start = time.perf_counter()
            failed: BaseException | None = None
            uid = self._caller_uid(context.peer())
            held = False
            try:
                if self._limiter is not None and uid is not None:
                    try:
                        self._limiter.acquire(uid)
                        held = True
                    except StreamLimitExceeded as exc:
                        if self._metrics is not None:
                            self._metrics.stream_limit_refusals.inc()
                        await WORKLOAD_API_STATUS.abort(context, exc, method)  # RESOURCE_EXHAUSTED
                if self._metrics is not None:
                    self._metrics.streams_open.labels(method).inc()
                first = True
                try:
                    async for message in behavior(request, context):
                        if first and self._metrics is not None:
                            self._metrics.rpc_seconds.labels(method).observe(time.perf_counter() - start)
                        first = False
                        yield message
                finally:
                    if self._metrics is not None:
                        self._metrics.streams_open.labels(method).dec()
            except BaseException as exc:
                failed = exc
                raise
            finally:
                if held and uid is not None and self._limiter is not None:
                    self._limiter.release(uid)
                self._record(method, context, failed)

        return wrapper


# ------------------------------------------------------------------------------------- scrape-time state


def _snapshot(values: Callable[[], Any]) -> list[Any]:
    """A list copy of a dict view the event loop may be changing (retries on a concurrent resize)."""
    for _ in range(5):
        try:
            return list(values())
        except RuntimeError:
            continue
    return []


class AgentStateCollector(Collector):
    """Reads the workload cache, the sync loop and the node identity when Prometheus scrapes."""

    def __init__(
        self, cache: Any, sync_loop: Any, node: Any, clock: Callable[[], float] = time.time, *, hasher: Any = None
    ) -> None:
        self._cache = cache
        self._sync = sync_loop
        self._node = node
        self._clock = clock
        self._hasher = hasher

    def describe(self) -> Iterator[Any]:
        return iter(())

    def collect(self) -> Iterator[Any]:
        now = self._clock()
        cache = self._cache
        svids = _snapshot(lambda: cache.svids.values())
        entries = _snapshot(lambda: cache.entries.values()) if isinstance(cache.entries, dict) else list(cache.entries)
        sizes = GaugeMetricFamily("tessera_agent_cache_size", "items in the agent's cache", labels=["kind"])
        sizes.add_metric(["entries"], len(entries))
        sizes.add_metric(["x509_svids"], len(svids))
        sizes.add_metric(["bundles"], len(getattr(cache, "bundles", {}) or {}))
        yield sizes
        soonest = GaugeMetricFamily(
            "tessera_agent_svid_soonest_expiry_seconds", "seconds until the soonest cached X509-SVID expires"
        )
        lag = GaugeMetricFamily(
            "tessera_agent_rotation_lag_seconds",
            "how long the most overdue cached X509-SVID is past its rotation time (0: none overdue)",
        )
        if svids:
            soonest.add_metric([], min(s.not_after for s in svids) - now)
        lag.add_metric([], max([0.0, *(now - s.rotate_at for s in svids if s.rotate_at < now)]))
        yield soonest
        yield lag
        identity = getattr(self._node, "identity", None)
        agent = GaugeMetricFamily("tessera_agent_svid_expiry_seconds", "seconds until the agent's own SVID expires")
        if identity is not None:
            agent.add_metric([], identity.chain[0].not_valid_after_utc.timestamp() - now)
        yield agent
        syncs = CounterMetricFamily("tessera_agent_syncs", "successful sync rounds")
        syncs.add_metric([], float(getattr(self._sync, "syncs", 0)))
        yield syncs
        failures = GaugeMetricFamily("tessera_agent_sync_consecutive_failures", "sync rounds failed in a row")
        failures.add_metric([], float(getattr(self._sync, "failures", 0)))
        yield failures
        last = float(getattr(self._sync, "last_success", 0.0) or 0.0)
        since = GaugeMetricFamily("tessera_agent_sync_seconds_since_success", "seconds since the last good sync")
        since.add_metric([], now - last if last else float("nan"))
        yield since
        if self._hasher is not None:
            yield from self._hashing()

    def _hashing(self) -> Iterator[Any]:
        hasher = self._hasher
        hashed = CounterMetricFamily(
            "tessera_agent_executables_hashed", "executables hashed for unix:sha256 selectors (digest cache misses)"
        )
        hashed.add_metric([], float(hasher.cache.computed))
        yield hashed
        hashed_bytes = CounterMetricFamily("tessera_agent_executable_hash_bytes", "bytes read to hash executables")
        hashed_bytes.add_metric([], float(hasher.bytes_hashed))
        yield hashed_bytes
        too_large = CounterMetricFamily(
            "tessera_agent_executables_too_large",
            "executables not hashed for their size (above workload_attestor_max_hash_bytes)",
        )
        too_large.add_metric([], float(hasher.too_large))
        yield too_large


__all__ = [
    "AgentMetrics",
    "AgentStateCollector",
    "MetricsListener",
    "WorkloadApiInterceptor",
    "instrument_sync",
]
