"""The node API servicer (proto/tessera/node.proto): what agents call.

Every call except ``Attest`` starts by authorizing the peer from its TLS client certificate (see
:mod:`tessera.server.api.peer`), on every call, so an evicted or banned agent is refused at once, not when its
certificate expires. Datastore calls run in worker threads; signing a batch runs in one worker thread so the
event loop keeps serving other agents meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from typing import Any

import grpc
from cryptography import x509

from tessera.proto import node_pb2 as npb
from tessera.proto import node_pb2_grpc as ngrpc
from tessera.sdk.keys import PublicKey
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.sdk.svid import certificates_to_der
from tessera.server.api.authority import Authority
from tessera.server.api.convert import entry_to_proto, selectors_to_proto
from tessera.server.api.peer import AuthorizedAgent, PeerLookup, authorize_agent, serial_hex
from tessera.server.api.status import ApiError, denied, handle_errors, invalid, not_found, status_for
from tessera.server.attestation.base import NodeAttestor
from tessera.server.ca.csr import csr_public_key
from tessera.server.ca.revocation import authority_key_id, issued_svid
from tessera.server.datastore.base import AttestedAgent, Datastore, IssuedSvid, RegistrationEntry
from tessera.server.errors import BadCsrError, NodeAttestationError, NotFound

log = logging.getLogger("tessera.server.api.node")

MAX_BATCH = 500
SYNC_PAGE_SIZE = 10_000  # a 10,000-entry first sync is one response (~2 MB; limits are 64 MiB)
MAX_INCREMENTAL_CHANGES = 5000
ATTEST_STEP_TIMEOUT = 30.0
MAX_AUDIENCES = 16
MAX_AUDIENCE_BYTES = 1024
MAX_CONCURRENT_SIGNING = max(2, min(8, os.cpu_count() or 2))
"""Batches signed at once; more wait their turn, so signing never takes every worker thread from the datastore
calls (syncs, authorization) of other agents, and a burst of rotations queues instead of thrashing."""

_REFUSAL_CODES = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
}


@dataclass(frozen=True, slots=True)
class NodeSettings:
    trust_domain: TrustDomain
    agent_ttl: float
    default_x509_svid_ttl: float
    default_jwt_svid_ttl: float


def join_grace_needed(*, fresh_ca: bool, mine: AbstractSet[str], stored: AbstractSet[str] | None) -> bool:
    """Whether a server starting now must wait before it signs: its CA was just created (no journal before)
    and the stored trust bundle already holds authorities it did not publish, i.e. other servers serve this
    trust domain and their agents do not know the new CA until their next sync.

    ``mine`` and ``stored`` are authority ids (:func:`tessera.server.api.publisher.authority_ids`) of this
    server's bundle and of the stored one (None: nothing stored yet). The first server of a trust domain, and
    a server restarting with its journal (its CA already published), sign at once. JWT keys of a server that
    left for good stay in the bundle, so a server joining after it may wait once for nothing: harmless.
    """
    return fresh_ca and stored is not None and bool(set(stored) - set(mine))


class JoinGrace:
    """The join grace period of a server that just joined a trust domain served by others.

    Until ``until`` (on ``clock``) the signing RPCs answer UNAVAILABLE, which agents treat as "try another
    server or retry", so nothing this server signs reaches a relying party that cannot yet verify it.
    """

    def __init__(self, trust_domain: TrustDomain, until: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._td = trust_domain
        self._until = until
        self._clock = clock

    @classmethod
    def none(cls, trust_domain: TrustDomain) -> JoinGrace:
        return cls(trust_domain, -math.inf)

    def remaining(self) -> float:
        return max(0.0, self._until - self._clock())

    def check(self) -> None:
        """Raises UNAVAILABLE while the grace period lasts."""
        left = self.remaining()
        if left > 0:
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE,
                f"this server just joined trust domain {self._td.name}; its new CA is being published to agents; "
                f"retry in {math.ceil(left)}s",
            )


def _check_csr(csr_der: bytes, what: str) -> PublicKey:
    try:
        return csr_public_key(csr_der)
    except BadCsrError as exc:
        raise invalid(f"{what}: {exc}") from None


def _check_csrs(requests: Sequence[npb.X509SignRequest]) -> list[PublicKey]:
    """Every CSR of a batch is checked before anything is signed: all or nothing."""
    return [_check_csr(req.csr, f"entry {req.entry_id}") for req in requests]


CSR_CHECK_THREADS = max(1, min(4, os.cpu_count() or 1))
_MIN_CSR_CHUNK = 32


async def _check_csrs_parallel(requests: Sequence[npb.X509SignRequest]) -> list[PublicKey]:
    """:func:`_check_csrs` over up to :data:`CSR_CHECK_THREADS` worker threads.

    Verifying a CSR's signature is most of checking it, and OpenSSL runs it with the GIL released (measured:
    two threads check a 500-CSR batch in ~55 % of the time of one), while building the certificates does not
    release it. The first bad CSR in batch order is the one reported, as in a sequential check.
    """
    chunks = max(1, min(CSR_CHECK_THREADS, len(requests) // _MIN_CSR_CHUNK))
    if chunks == 1:
        return await asyncio.to_thread(_check_csrs, requests)
    size = -(-len(requests) // chunks)
    parts = await asyncio.gather(
        *(asyncio.to_thread(_check_csrs, requests[i : i + size]) for i in range(0, len(requests), size)),
        return_exceptions=True,
    )
    keys: list[PublicKey] = []
    for part in parts:
        if isinstance(part, BaseException):
            raise part
        keys.extend(part)
    return keys


_PAGE_MARK = "s1."


def _make_page_token(floor: int, inner: str) -> str:
    """Carries the revision floor of the first page across the pages of one full sync."""
    return f"{_PAGE_MARK}{floor}.{inner}"


def _parse_page_token(token: str) -> tuple[int | None, str]:
    if not token:
        return None, ""
    prefix, _, rest = token.partition(_PAGE_MARK)
    floor_text, sep, inner = rest.partition(".")
    if prefix or not sep or not floor_text.isdigit() or not inner:
        raise invalid("page_token was not issued by this server's Sync; start again without it")
    return int(floor_text), inner


def entry_is_live(entry: RegistrationEntry, now: float) -> bool:
    return entry.expires_at is None or entry.expires_at > now


class EntryCache:
    """Entries by id, valid while the store's entries revision is unchanged.

    Signing looks up every entry of every batch; between changes (the common case) that costs one counter
    read instead of a query for hundreds of ids. The revision is read *before* the entries are fetched, so
    an entry can only be newer than the revision it is filed under, and any change clears the cache.
    """

    MAX_ENTRIES = 200_000

    def __init__(self, datastore: Datastore) -> None:
        self._ds = datastore
        self._lock = threading.Lock()
        self._revision = -1
        self._entries: dict[str, RegistrationEntry] = {}

    def get(self, entry_ids: Sequence[str]) -> dict[str, RegistrationEntry]:
        revision = self._ds.revisions().entries
        with self._lock:
            if revision != self._revision or len(self._entries) > self.MAX_ENTRIES:
                self._entries = {}
                self._revision = revision
            cached = self._entries
            found = {i: cached[i] for i in entry_ids if i in cached}
        missing = [i for i in entry_ids if i not in found]
        if missing:
            fetched = self._ds.get_entries(missing)
            found.update(fetched)
            with self._lock:
                if self._revision == revision:
                    self._entries.update(fetched)
        return found


class RevokedSerials:
    """Serials on the CRLs, re-read when the bundles revision moves (CRL writes bump it)."""

    def __init__(self, datastore: Datastore, clock: Callable[[], float] = time.time) -> None:
        self._ds = datastore
        self._clock = clock
        self._lock = threading.Lock()
        self._revision = -1
        self._serials: frozenset[str] = frozenset()

    def contains(self, serial: str, bundles_revision: int) -> bool:
        with self._lock:
            if bundles_revision != self._revision:
                revoked = self._ds.list_revoked_certificates(unexpired_at=int(self._clock()))
                self._serials = frozenset(r.serial for r in revoked)
                self._revision = bundles_revision
            return serial in self._serials


class _StreamChannel:
    """Adapts the Attest stream to the attestors' ChallengeChannel."""

    def __init__(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._context = context

    async def challenge(self, data: bytes) -> bytes:
        await self._context.write(npb.AttestResponse(challenge=data))
        try:
            message = await asyncio.wait_for(self._context.read(), ATTEST_STEP_TIMEOUT)
        except TimeoutError:
            raise NodeAttestationError("no challenge response within the time allowed", "invalid_argument") from None
        if message is grpc.aio.EOF or not message.HasField("challenge_response"):
            raise NodeAttestationError("expected an AttestRequest.challenge_response", "invalid_argument")
        response: bytes = message.challenge_response
        return response


class NodeServicer(ngrpc.NodeServicer):
    def __init__(
        self,
        *,
        settings: NodeSettings,
        datastore: Datastore,
        authority: Authority,
        attestors: Mapping[str, NodeAttestor],
        peers: PeerLookup,
        clock: Callable[[], float] = time.time,
        join_grace: JoinGrace | None = None,
    ) -> None:
        self._settings = settings
        self._td = settings.trust_domain
        self._ds = datastore
        self._ca = authority
        self._attestors = dict(attestors)
        self._peers = peers
        self._clock = clock
        self._entries = EntryCache(datastore)
        self._revoked = RevokedSerials(datastore)
        self._signing = asyncio.Semaphore(MAX_CONCURRENT_SIGNING)
        self._join_grace = join_grace or JoinGrace.none(settings.trust_domain)

    # ----------------------------------------------------------------------------------------- helpers

    def _address(self, context: grpc.aio.ServicerContext[Any, Any]) -> str:
        """The agent's network address (the relay's internal peer string means nothing in a log)."""
        peer = self._peers.lookup(context.peer())
        return peer.address if peer is not None else context.peer()

    async def _caller(self, context: grpc.aio.ServicerContext[Any, Any]) -> AuthorizedAgent:
        peer = self._peers.lookup(context.peer())
        leaf = peer.leaf if peer is not None else None
        return await asyncio.to_thread(authorize_agent, leaf, self._ds, self._td, self._clock())

    def _parents_now(self, agent: AttestedAgent) -> list[str]:
        """The parent IDs whose entries this agent may use: itself plus the node aliases matching it."""
        aliases = self._ds.node_alias_entries_matching(agent.selectors)
        now = self._clock()
        return [agent.spiffe_id, *sorted({a.spiffe_id for a in aliases if entry_is_live(a, now)})]

    async def _parents(self, agent: AttestedAgent) -> list[str]:
        return await asyncio.to_thread(self._parents_now, agent)

    def _sign_agent(self, key: PublicKey, agent_id: SpiffeId) -> list[x509.Certificate]:
        chain = self._ca.sign_x509_svid(key, agent_id, self._settings.agent_ttl)
        # Remembered (as every SVID the server signs) so an operator can revoke it and a CA revocation can
        # tell whether it is still in use.
        self._ds.record_issued_svids([issued_svid(chain, "", str(agent_id))])
        return chain

    def _agent_svid(self, agent_id: SpiffeId, chain: Sequence[x509.Certificate]) -> npb.AgentSvid:
        return npb.AgentSvid(
            spiffe_id=str(agent_id),
            cert_chain=certificates_to_der(chain),
            expires_at=int(chain[0].not_valid_after_utc.timestamp()),
        )

    # -------------------------------------------------------------------------------------------- Attest

    async def Attest(self, request_iterator: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        try:
            await self._attest(context)
        except grpc.aio.AbortError:
            raise
        except NodeAttestationError as exc:
            log.info("attestation refused: %s", exc, extra={"peer": self._address(context)})
            await context.abort(_REFUSAL_CODES[exc.kind], str(exc))
        except Exception as exc:  # ApiError, datastore and CA errors: the one mapping every RPC uses
            code, message = status_for(exc)
            if code == grpc.StatusCode.INTERNAL:
                log.exception("attestation failed")
            else:
                log.info("attestation refused: %s", message, extra={"peer": self._address(context)})
            await context.abort(code, message)

    async def _attest(self, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self._join_grace.check()  # before reading anything: a refused attempt spends no join token
        try:
            first = await asyncio.wait_for(context.read(), ATTEST_STEP_TIMEOUT)
        except TimeoutError:
            raise invalid("no AttestRequest.params within the time allowed") from None
        if first is grpc.aio.EOF or not first.HasField("params"):
            raise invalid("the first AttestRequest must carry params")
        params = first.params
        attestor = self._attestors.get(params.attestor)
        if attestor is None:
            known = ", ".join(sorted(self._attestors)) or "none"
            raise invalid(f"unknown node attestor {params.attestor!r} (this server accepts: {known})")
        # The CSR is checked before the attestor runs, so a bad CSR never spends a one-time join token.
        key = _check_csr(params.csr, "agent CSR")
        result = await attestor.attest(params.payload, _StreamChannel(context))
        agent_id = result.agent_id
        if not agent_id.member_of(self._td) or not agent_id.is_workload_id():
            raise denied(f"attestor produced agent ID {agent_id} outside trust domain {self._td}")
        if agent_id == self._td.spiffe_id("tessera", "server"):
            raise denied("an agent cannot take the server's own ID")
        try:
            existing = await asyncio.to_thread(self._ds.get_agent, str(agent_id))
        except NotFound:
            existing = None
        if existing is not None and existing.banned:
            raise denied(f"agent {agent_id} is banned; an operator must evict it before it can attest again")
        chain = await asyncio.to_thread(self._sign_agent, key, agent_id)
        leaf = chain[0]
        await asyncio.to_thread(
            self._ds.upsert_agent,
            AttestedAgent(
                spiffe_id=str(agent_id),
                attestor=attestor.name,
                selectors=result.selectors,
                serial=serial_hex(leaf),
                expires_at=int(leaf.not_valid_after_utc.timestamp()),
                reattestable=result.reattestable,
            ),
        )
        bundle = await asyncio.to_thread(self._ca.trust_bundle)
        log.info(
            "agent attested",
            extra={"agent_id": str(agent_id), "attestor": attestor.name, "peer": self._address(context)},
        )
        await context.write(
            npb.AttestResponse(
                result=npb.AttestResult(
                    svid=self._agent_svid(agent_id, chain),
                    node_selectors=selectors_to_proto(result.selectors),
                    trust_bundle=bundle.to_document(),
                    reattestable=result.reattestable,
                )
            )
        )

    # ---------------------------------------------------------------------------------------- RenewAgent

    @handle_errors
    async def RenewAgent(
        self, request: npb.RenewAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> npb.RenewAgentResponse:
        self._join_grace.check()
        caller = await self._caller(context)
        key = _check_csr(request.csr, "agent CSR")
        chain = await asyncio.to_thread(self._sign_agent, key, caller.spiffe_id)
        leaf = chain[0]
        await asyncio.to_thread(
            self._ds.set_agent_serial,
            str(caller.spiffe_id),
            serial_hex(leaf),
            int(leaf.not_valid_after_utc.timestamp()),
            expected_serial=caller.agent.serial,
        )
        log.info("agent SVID renewed", extra={"agent_id": str(caller.spiffe_id)})
        return npb.RenewAgentResponse(svid=self._agent_svid(caller.spiffe_id, chain))

    # ---------------------------------------------------------------------------------------------- Sync

    @handle_errors
    async def Sync(self, request: npb.SyncRequest, context: grpc.aio.ServicerContext[Any, Any]) -> npb.SyncResponse:
        caller = await self._caller(context)
        # All reads and the (possibly 5000-entry) message building run in one worker thread.
        return await asyncio.to_thread(self._sync, caller, request)

    def _sync(self, caller: AuthorizedAgent, request: npb.SyncRequest) -> npb.SyncResponse:
        floor, inner_token = _parse_page_token(request.page_token)
        # Revisions are read before the parents are worked out: an alias change made after this read has a
        # higher revision than what the agent is told it holds, so its next sync is a full one.
        revisions = self._ds.revisions()
        floor = revisions.entries if floor is None else min(floor, revisions.entries)
        parents = self._parents_now(caller.agent)
        response = npb.SyncResponse()
        held = request.entries_revision
        full = bool(request.page_token) or held == 0 or revisions.node_aliases > held or held > revisions.entries
        if not full:
            changes = self._ds.entries_changed_since(parents, held, max_changes=MAX_INCREMENTAL_CHANGES)
            if changes.full_sync_required:
                full = True
            else:
                response.entries.extend(entry_to_proto(e) for e in changes.upserts)
                response.removed_entry_ids.extend(changes.removed_ids)
                response.entries_revision = min(changes.revision, floor)
        if full:
            page = self._ds.entries_for_parents(parents, page_size=SYNC_PAGE_SIZE, page_token=inner_token)
            response.full = True
            response.entries.extend(entry_to_proto(e) for e in page.items)
            response.entries_revision = min(page.revision, floor)
            if page.next_page_token:
                response.next_page_token = _make_page_token(floor, page.next_page_token)
        if request.bundles_revision != revisions.bundles or request.bundles_revision == 0:
            for bundle in self._ds.list_bundles():
                response.bundles["spiffe://" + bundle.trust_domain] = bundle.document
            response.crls.extend(c.crl for c in self._ds.list_crls())
        response.bundles_revision = revisions.bundles
        tainted = self._ca.tainted_x509_authority_ids()
        response.tainted_authorities.extend(tainted)
        response.renew_agent_svid = _issued_by_tainted(caller.leaf, tainted) or self._revoked.contains(
            caller.agent.serial, revisions.bundles
        )
        return response

    # --------------------------------------------------------------------------------- BatchSignX509SVID

    def _refuse_revoked(self, caller: AuthorizedAgent) -> None:
        """A revoked agent SVID may still sync and renew itself, but signs nothing until it has."""
        if self._revoked.contains(caller.agent.serial, self._ds.revisions().bundles):
            raise denied(f"the SVID of agent {caller.spiffe_id} was revoked; renew it (RenewAgent) first")

    async def _authorized_entries(
        self, caller: AuthorizedAgent, entry_ids: Sequence[str]
    ) -> dict[str, RegistrationEntry]:
        if any(not entry_id for entry_id in entry_ids):
            raise invalid("entry_id is required in every request")
        await asyncio.to_thread(self._refuse_revoked, caller)
        entries = await asyncio.to_thread(self._entries.get, list(dict.fromkeys(entry_ids)))
        parents = set(await self._parents(caller.agent))
        for entry_id in entry_ids:
            entry = entries.get(entry_id)
            if entry is not None and (entry.parent_id not in parents or entry.node):
                raise denied(f"entry {entry_id} is not authorized for agent {caller.spiffe_id}")
        now = self._clock()
        for entry_id in entry_ids:
            entry = entries.get(entry_id)
            if entry is None:
                raise not_found(f"entry {entry_id} does not exist (sync again)")
            if not entry_is_live(entry, now):
                raise not_found(f"entry {entry_id} has expired")
        return entries

    @handle_errors
    async def BatchSignX509SVID(
        self, request: npb.BatchSignX509SVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> npb.BatchSignX509SVIDResponse:
        self._join_grace.check()
        caller = await self._caller(context)
        count = len(request.requests)
        if count > MAX_BATCH:
            raise invalid(f"batch holds {count} CSRs; at most {MAX_BATCH} per call")
        requests = list(request.requests)
        started = time.perf_counter()
        # The entry lookup (SQLite, GIL released) overlaps with checking the CSRs (CPU); authorization is
        # decided first, so a caller learns nothing about CSRs of entries it may not use.
        authorized, checked = await asyncio.gather(
            self._authorized_entries(caller, [r.entry_id for r in requests]),
            _check_csrs_parallel(requests),
            return_exceptions=True,
        )
        if isinstance(authorized, BaseException):
            raise authorized
        if isinstance(checked, BaseException):
            raise checked
        async with self._signing:
            results = await asyncio.to_thread(self._sign_batch, str(caller.spiffe_id), requests, checked, authorized)
        log.debug(
            "signed %d X509-SVIDs in %.1f ms",
            len(results),
            (time.perf_counter() - started) * 1000,
            extra={"agent_id": str(caller.spiffe_id)},
        )
        return npb.BatchSignX509SVIDResponse(results=results)

    def _sign_batch(
        self,
        agent_id: str,
        requests: Sequence[npb.X509SignRequest],
        keys: Sequence[PublicKey],
        entries: Mapping[str, RegistrationEntry],
    ) -> list[npb.X509SignResult]:
        results: list[npb.X509SignResult] = []
        issued: list[IssuedSvid] = []
        ids: dict[str, SpiffeId] = {}
        # Reading each new leaf's AKI back would parse all its extensions; the CA signing before and after the
        # batch is the same object in all but a rotation mid-batch, which falls back to reading the leaves.
        signer_before = self._ca.active_x509_authority_id()
        leaves: list[x509.Certificate] = []
        for req, key in zip(requests, keys, strict=True):
            entry = entries[req.entry_id]
            ttl = entry.x509_svid_ttl or self._settings.default_x509_svid_ttl
            sid = ids.get(entry.id)
            if sid is None:
                sid = ids[entry.id] = SpiffeId.parse(entry.spiffe_id)
            chain = self._ca.sign_x509_svid(key, sid, ttl, dns_names=entry.dns_names)
            leaf = chain[0]
            leaves.append(leaf)
            issued.append(
                IssuedSvid(  # built from what is at hand: cheaper than re-reading the leaf's SAN
                    serial=format(leaf.serial_number, "x"),
                    issuer_key_id=signer_before or "",
                    spiffe_id=entry.spiffe_id,
                    entry_id=entry.id,
                    agent_id=agent_id,
                    issued_at=int(leaf.not_valid_before_utc.timestamp()),
                    expires_at=int(leaf.not_valid_after_utc.timestamp()),
                )
            )
            results.append(
                npb.X509SignResult(
                    entry_id=req.entry_id,
                    cert_chain=certificates_to_der(chain),
                    expires_at=issued[-1].expires_at,
                )
            )
        if self._ca.active_x509_authority_id() != signer_before or not signer_before:
            issued = [replace(i, issuer_key_id=authority_key_id(leaf)) for i, leaf in zip(issued, leaves, strict=True)]
        self._ds.record_issued_svids(issued)
        return results

    # --------------------------------------------------------------------------------------- MintJWTSVID

    @handle_errors
    async def MintJWTSVID(
        self, request: npb.MintJWTSVIDRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> npb.MintJWTSVIDResponse:
        self._join_grace.check()
        caller = await self._caller(context)
        audience = list(request.audience)
        if not audience:
            raise invalid("audience is required (at least one)")
        if len(audience) > MAX_AUDIENCES:
            raise invalid(f"at most {MAX_AUDIENCES} audiences per JWT-SVID")
        for aud in audience:
            if not aud or len(aud.encode()) > MAX_AUDIENCE_BYTES:
                raise invalid(f"audience values must be non-empty and at most {MAX_AUDIENCE_BYTES} bytes")
        entry = (await self._authorized_entries(caller, [request.entry_id]))[request.entry_id]
        ttl = entry.jwt_svid_ttl or self._settings.default_jwt_svid_ttl
        token, expires = await asyncio.to_thread(self._ca.mint_jwt_svid, SpiffeId.parse(entry.spiffe_id), audience, ttl)
        return npb.MintJWTSVIDResponse(token=token, expires_at=int(expires.timestamp()))


def _issued_by_tainted(leaf: x509.Certificate, tainted: Sequence[str]) -> bool:
    if not tainted:
        return False
    try:
        aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    except x509.ExtensionNotFound:
        return False
    return aki is not None and aki.hex() in tainted


__all__ = ["MAX_BATCH", "NodeServicer", "NodeSettings"]
