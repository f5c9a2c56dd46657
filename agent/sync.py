"""Periodic, incremental sync with the server, and signing of workload SVIDs.

Every ``interval`` seconds (sooner when a workload waits for an SVID or one is due for rotation) the agent
asks for the entries and bundles changed since the revisions it holds, then makes keys and CSRs for the
entries that need an SVID and sends them in batches. While the server is unreachable it backs off
exponentially with jitter and keeps serving what it has until it expires.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from tessera.agent.bundles import TrustBundle, parse_bundle_document
from tessera.agent.cache import CachedJwt, CachedSvid, EntryRecord, WorkloadCache, make_cached_svid
from tessera.agent.errors import AgentError, NodeIdentityError, ServerUnavailableError
from tessera.agent.node import NodeClient, make_csr
from tessera.agent.rotation import backoff_delay
from tessera.proto import node_pb2 as npb
from tessera.sdk.errors import TesseraError
from tessera.sdk.keys import PrivateKey, generate_key
from tessera.sdk.svid import parse_der_certificates

log = logging.getLogger(__name__)

MAX_BATCH = 500


def _key_and_csr() -> tuple[PrivateKey, bytes, bytes]:
    key = generate_key("ec-p256")
    key_der = key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption())
    return key, key_der, make_csr(key)


class SyncLoop:
    def __init__(
        self,
        node: NodeClient,
        cache: WorkloadCache,
        *,
        interval: float = 5.0,
        max_backoff: float = 300.0,
        batch_size: int = MAX_BATCH,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.node = node
        self.cache = cache
        self.interval = interval
        self.max_backoff = max_backoff
        self.batch_size = max(1, min(batch_size, MAX_BATCH))
        self._clock = clock
        self._rand = rand
        self.entries_revision = 0
        self.bundles_revision = 0
        self.failures = 0
        self.last_success = 0.0
        self.syncs = 0

    # -- one round -------------------------------------------------------------------------------------

    async def sync_once(self) -> None:
        node = self.node
        if node.expired():
            await node.recover()
        elif node.renew_due():
            try:
                await node.renew()
            except grpc.aio.AioRpcError as exc:
                log.warning("agent SVID renewal failed: %s %s", exc.code().name, exc.details())
        try:
            await self._pull()
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.UNAUTHENTICATED):
                log.error("server refused this agent (%s); trying to re-attest", exc.details())
                await node.recover()
                self.entries_revision = self.bundles_revision = 0
                return
            raise
        await self._sign()
        self.cache.drop_expired()
        self.cache.mark_ready()
        self.last_success = self._clock()
        self.syncs += 1

    async def _pull(self) -> None:
        timeout = self.node.config.call_timeout
        entries_rev, bundles_rev = self.entries_revision, self.bundles_revision
        page_token = ""
        full_entries: list[npb.Entry] = []
        while True:
            request = npb.SyncRequest(
                entries_revision=entries_rev, bundles_revision=bundles_rev, page_token=page_token
            )

            async def sync_call(stub: Any, r: npb.SyncRequest = request) -> npb.SyncResponse:
                result: npb.SyncResponse = await stub.Sync(r, timeout=timeout)
                return result

            response = await self.node.call(sync_call)
            if response.bundles:
                self._apply_bundles(response)
            if response.tainted_authorities:
                n = self.cache.drop_svids_signed_by(response.tainted_authorities)
                if n:
                    log.warning("%d SVIDs were signed by a tainted authority: re-issuing now", n)
            if response.renew_agent_svid:
                log.warning("server asked for an agent SVID renewal (its CA was tainted)")
                await self.node.renew()
            if response.full:
                full_entries.extend(response.entries)
                if response.next_page_token:
                    page_token = response.next_page_token
                    continue
                self.cache.apply_entries(
                    (EntryRecord.from_proto(e) for e in full_entries), full=True
                )
            else:
                self.cache.apply_entries(
                    (EntryRecord.from_proto(e) for e in response.entries), response.removed_entry_ids
                )
            self.entries_revision = response.entries_revision
            self.bundles_revision = response.bundles_revision
            return

    def _apply_bundles(self, response: npb.SyncResponse) -> None:
        bundles: dict[str, TrustBundle] = {}
        for td_id, document in response.bundles.items():
            try:
                bundles[td_id] = parse_bundle_document(td_id, document)
            except AgentError as exc:
                log.error("ignoring bundle: %s", exc)
        own = self.cache.trust_domain_id
        if own not in bundles:
            if own in self.cache.bundles:
                bundles[own] = self.cache.bundles[own]
            else:
                log.error("server sent no bundle for the agent's own trust domain %s", own)
        self.cache.set_bundles(bundles, list(response.crls))
        revoked = _revoked_serials(response.crls)
        n = self.cache.rotate_revoked(revoked)
        if n:
            log.warning("%d SVIDs are on the server's revocation list: re-issuing now", n)
        if own in bundles and bundles[own].x509_authorities:
            self.node.update_roots(list(bundles[own].x509_authorities))

    async def _sign(self) -> None:
        entries = self.cache.entries_to_sign()
        for start in range(0, len(entries), self.batch_size):
            batch = entries[start : start + self.batch_size]
            try:
                self.cache.put_svids(await self._sign_batch(batch))
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.PERMISSION_DENIED:
                    raise
                # One entry the server no longer authorizes (removed since the last sync, say) fails the
                # whole batch: sign the others one by one so they are not held hostage.
                log.warning("server refused a signing batch (%s); retrying entries one by one", exc.details())
                for entry in batch:
                    try:
                        self.cache.put_svids(await self._sign_batch([entry]))
                    except grpc.aio.AioRpcError as single:
                        if single.code() != grpc.StatusCode.PERMISSION_DENIED:
                            raise
                        log.warning("server refused to sign entry %s: %s", entry.id, single.details())

    async def _sign_batch(self, batch: Sequence[EntryRecord]) -> list[CachedSvid]:
        # Key generation and CSR signing are CPU work: off the event loop for large batches.
        if len(batch) > 8:
            material = await asyncio.to_thread(lambda: [_key_and_csr() for _ in batch])
        else:
            material = [_key_and_csr() for _ in batch]
        request = npb.BatchSignX509SVIDRequest(
            requests=[npb.X509SignRequest(entry_id=e.id, csr=m[2]) for e, m in zip(batch, material, strict=True)]
        )
        timeout = self.node.config.call_timeout * 2
        response: npb.BatchSignX509SVIDResponse = await self.node.call(
            lambda stub: stub.BatchSignX509SVID(request, timeout=timeout)
        )
        by_id = {e.id: (e, m) for e, m in zip(batch, material, strict=True)}
        svids: list[CachedSvid] = []
        for result in response.results:
            pair = by_id.get(result.entry_id)
            if pair is None:
                continue
            entry, (_, key_der, _) = pair
            try:
                chain = parse_der_certificates(result.cert_chain)
            except (ValueError, TesseraError) as exc:
                log.error("server returned an unusable chain for entry %s: %s", entry.id, exc)
                continue
            svids.append(make_cached_svid(entry, chain, key_der, self._rand))
        if svids:
            log.info("signed %d workload SVIDs", len(svids))
        return svids

    # -- JWT-SVIDs -------------------------------------------------------------------------------------

    async def mint_jwt(self, entry: EntryRecord, audience: Sequence[str]) -> CachedJwt:
        request = npb.MintJWTSVIDRequest(entry_id=entry.id, audience=list(audience))
        timeout = self.node.config.call_timeout
        try:
            response: npb.MintJWTSVIDResponse = await self.node.call(
                lambda stub: stub.MintJWTSVID(request, timeout=timeout)
            )
        except grpc.aio.AioRpcError as exc:
            raise AgentError(f"server refused: {exc.code().name} {exc.details()}") from exc
        return CachedJwt(response.token, self._clock(), float(response.expires_at))

    # -- the loop --------------------------------------------------------------------------------------

    def _next_delay(self) -> float:
        if self.failures:
            return backoff_delay(self.failures, self.interval, self.max_backoff, self._rand)
        delay = self.interval
        now = self._clock()
        # Only future deadlines: anything already due was attempted this round (and refused if still due).
        due = [s.rotate_at for s in self.cache.svids.values() if s.rotate_at > now]
        if self.node.identity is not None and self.node._renew_at > now:
            due.append(self.node._renew_at)
        if due:
            delay = min(delay, max(0.05, min(due) - now))
        return delay

    async def run(self, stop: asyncio.Event) -> None:
        """Runs until ``stop`` is set; raises NodeIdentityError when the agent cannot go on."""
        while not stop.is_set():
            self.cache.sign_wanted.clear()
            try:
                await self.sync_once()
                if self.failures:
                    log.info("server reachable again; sync resumed")
                self.failures = 0
            except NodeIdentityError:
                raise
            except (ServerUnavailableError, grpc.aio.AioRpcError, AgentError) as exc:
                self.failures += 1
                self.cache.drop_expired()
                log.warning("sync failed (attempt %d): %s", self.failures, _describe(exc))
            delay = self._next_delay()
            waiters: list[Any] = [asyncio.ensure_future(stop.wait())]
            if not self.failures:
                waiters.append(asyncio.ensure_future(self.cache.sign_wanted.wait()))
            _, pending = await asyncio.wait(waiters, timeout=delay, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()


def _revoked_serials(crls: Sequence[bytes]) -> set[int]:
    """Serials on the CRLs the server sent (over the authenticated node API: no signature check needed here;
    workloads verify each CRL against its CA before refusing anyone)."""
    serials: set[int] = set()
    for der in crls:
        try:
            crl = x509.load_der_x509_crl(der)
        except ValueError as exc:
            log.error("ignoring an unreadable CRL from the server: %s", exc)
            continue
        serials.update(r.serial_number for r in crl)
    return serials


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{exc.code().name} {exc.details()}"
    return str(exc)
