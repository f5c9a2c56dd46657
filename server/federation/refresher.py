"""Keeps each federated bundle fresh: fetches it at its refresh hint and stores it as a federated bundle.

On any failure (endpoint down, TLS refused, a document that is not a bundle, names another trust domain or
goes backwards) the last good bundle stays in force, the relationship records why (``last_error``, shown by
``federation show``), a warning is logged, and the fetch is retried sooner than the hint. A successful fetch
clears the error. Only a changed bundle is written (a write bumps the bundles revision, which makes every
agent download bundles again).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Callable
from dataclasses import replace

from tessera.sdk.bundle import SpiffeBundle
from tessera.sdk.errors import TesseraError
from tessera.sdk.spiffeid import TrustDomain
from tessera.server.datastore.base import Datastore, FederationRelationship
from tessera.server.errors import NotFound
from tessera.server.federation.fetch import Endpoint, FetchError, check_endpoint, fetch_bundle, web_client_context

log = logging.getLogger("tessera.server.federation")

DEFAULT_REFRESH_HINT = 300
"""Seconds between fetches when the foreign bundle gives no ``spiffe_refresh_hint`` (SPIRE's default)."""
MIN_REFRESH = 1
MAX_REFRESH = 86400
RETRY_AFTER_ERROR = 30
"""Failed fetches are retried after at most this long (or the hint, if shorter)."""
POLL_INTERVAL = 1.0


def refresh_interval(bundle: SpiffeBundle | None, default: int = DEFAULT_REFRESH_HINT) -> int:
    hint = bundle.refresh_hint if bundle is not None and bundle.refresh_hint else default
    return max(MIN_REFRESH, min(int(hint), MAX_REFRESH))


class FederationRefresher:
    """Refreshes every relationship when due. Thread-safe enough for one loop plus forced admin refreshes (each
    refresh of a trust domain is serialized by a per-domain lock)."""

    def __init__(
        self,
        datastore: Datastore,
        own_trust_domain: TrustDomain,
        *,
        web_context: ssl.SSLContext | None = None,
        default_hint: int = DEFAULT_REFRESH_HINT,
        retry_after_error: int = RETRY_AFTER_ERROR,
        timeout: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ds = datastore
        self._own = own_trust_domain
        self._web_context = web_context
        self._default_hint = default_hint
        self._retry = retry_after_error
        self._timeout = timeout
        self._clock = clock
        self._locks: dict[str, asyncio.Lock] = {}

    def _held(self, td: TrustDomain) -> SpiffeBundle | None:
        try:
            stored = self._ds.get_bundle(td.name)
        except NotFound:
            return None
        try:
            return SpiffeBundle.from_document(td, stored.document)
        except TesseraError as exc:
            log.error("stored federated bundle of %s is unreadable: %s", td, exc)
            return None

    def refresh(self, relationship: FederationRelationship) -> FederationRelationship:
        """Fetches one foreign bundle now (blocking). Returns the relationship with its refresh state updated."""
        now = int(self._clock())
        try:
            endpoint: Endpoint = check_endpoint(
                relationship.trust_domain,
                relationship.bundle_endpoint_url,
                relationship.profile,
                relationship.endpoint_spiffe_id,
            )
        except ValueError as exc:
            return self._failed(relationship, None, f"invalid relationship: {exc}", now)
        held = self._held(endpoint.trust_domain)
        try:
            bundle, _ = fetch_bundle(endpoint, held, web_context=self._web_context, timeout=self._timeout)
        except FetchError as exc:
            return self._failed(relationship, held, str(exc), now)
        except Exception as exc:  # never let one odd endpoint stop the refresher
            log.exception("unexpected failure refreshing the bundle of %s", relationship.trust_domain)
            return self._failed(relationship, held, f"unexpected error: {exc}", now)
        if held is None or bundle != held:
            self._ds.set_bundle(endpoint.trust_domain.name, bundle.to_document())
            log.info(
                "federated bundle of %s updated",
                endpoint.trust_domain,
                extra={
                    "trust_domain": endpoint.trust_domain.name,
                    "sequence": bundle.sequence,
                    "x509_authorities": len(bundle.x509_authorities),
                    "jwt_authorities": len(bundle.jwt_authorities),
                },
            )
        interval = refresh_interval(bundle, self._default_hint)
        return self._store(replace(relationship, last_refresh=now, next_refresh=now + interval, last_error=""))

    def _failed(
        self, relationship: FederationRelationship, held: SpiffeBundle | None, reason: str, now: int
    ) -> FederationRelationship:
        keeping = f"keeping the last good bundle (sequence {held.sequence})" if held is not None else "no bundle held"
        log.warning(
            "refreshing the federated bundle of %s from %s failed: %s; %s",
            relationship.trust_domain,
            relationship.bundle_endpoint_url,
            reason,
            keeping,
            extra={"trust_domain": relationship.trust_domain, "reason": reason},
        )
        retry = min(refresh_interval(held, self._default_hint), self._retry)
        return self._store(replace(relationship, next_refresh=now + retry, last_error=reason))

    def _store(self, relationship: FederationRelationship) -> FederationRelationship:
        try:
            return self._ds.update_federation_relationship(relationship)
        except NotFound:
            return relationship  # deleted while we fetched: nothing to record

    def due(self) -> list[FederationRelationship]:
        now = self._clock()
        return [r for r in self._ds.list_federation_relationships() if r.next_refresh <= now]

    async def refresh_async(self, relationship: FederationRelationship) -> FederationRelationship:
        lock = self._locks.setdefault(relationship.trust_domain, asyncio.Lock())
        async with lock:
            return await asyncio.to_thread(self.refresh, relationship)

    async def _refresh_logged(self, relationship: FederationRelationship) -> None:
        """The loop's refresh: a failure to record the outcome (datastore down) is logged, and retried next poll."""
        try:
            await self.refresh_async(relationship)
        except Exception:
            log.exception("refreshing the federated bundle of %s failed (will retry)", relationship.trust_domain)

    async def run(self, stop: asyncio.Event) -> None:
        """Refreshes whatever is due, every second, until ``stop`` is set. Domains refresh concurrently, so a
        slow endpoint never delays the others."""
        running: dict[str, asyncio.Task[None]] = {}
        try:
            while not stop.is_set():
                try:
                    due = await asyncio.to_thread(self.due)
                except Exception:
                    log.exception("cannot list federation relationships (will retry)")
                    due = []
                for relationship in due:
                    task = running.get(relationship.trust_domain)
                    if task is None or task.done():
                        running[relationship.trust_domain] = asyncio.create_task(self._refresh_logged(relationship))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), POLL_INTERVAL)
        finally:
            for task in running.values():
                task.cancel()
            for task in running.values():
                with contextlib.suppress(BaseException):
                    await task


__all__ = ["DEFAULT_REFRESH_HINT", "FederationRefresher", "refresh_interval", "web_client_context"]
