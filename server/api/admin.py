"""The admin API servicer (proto/tessera/admin.proto), served on the local Unix socket.

Every request is validated here or by the validators it calls (entries, selectors, IDs, bundles), so a
malformed request gets InvalidArgument with a message naming the field, and nothing a client sends can stop
the daemon.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.sdk.bundle import SpiffeBundle, X509Bundle
from tessera.sdk.errors import BundleError, SpiffeIdError
from tessera.sdk.spiffeid import SpiffeId, TrustDomain
from tessera.server.api.authority import Authority
from tessera.server.api.ca_admin import CaAdmin
from tessera.server.api.convert import agent_to_proto, entry_from_proto, entry_to_proto, selectors_from_proto
from tessera.server.api.status import handle_errors, invalid, not_found
from tessera.server.attestation.join_token import default_agent_id
from tessera.server.datastore.base import Datastore, EntryFilter, RegistrationEntry, SelectorMatch
from tessera.server.entries import validate_entry

log = logging.getLogger("tessera.server.api.admin")

DEFAULT_PAGE_SIZE = 500
MAX_PAGE_SIZE = 1000
MAX_TOKEN_TTL = 30 * 86400
MAX_BUNDLE_BYTES = 1024 * 1024


@dataclass(frozen=True, slots=True)
class AdminSettings:
    trust_domain: TrustDomain
    join_token_ttl: float

    @property
    def server_id(self) -> SpiffeId:
        return self.trust_domain.spiffe_id("tessera", "server")


def _parse_id(text: str, field: str) -> SpiffeId:
    if not text:
        raise invalid(f"{field} is required")
    try:
        return SpiffeId.parse(text)
    except SpiffeIdError as exc:
        raise invalid(f"{field}: {exc}") from None


def _trust_domain(text: str, field: str = "id") -> TrustDomain:
    if not text:
        raise invalid(f"{field} is required (spiffe://<trust domain>)")
    try:
        return TrustDomain.parse(text)
    except SpiffeIdError as exc:
        raise invalid(f"{field}: {exc}") from None


def _page_size(value: int) -> int:
    if value < 0:
        raise invalid("page_size must not be negative")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def _federated(trust_domain: str, document: bytes) -> apb.FederatedBundle:
    bundle = SpiffeBundle.from_document(trust_domain, document)
    return apb.FederatedBundle(
        trust_domain=trust_domain,
        document=document,
        x509_authorities=len(bundle.x509_authorities),
        jwt_authorities=len(bundle.jwt_authorities),
    )


class AdminServicer(agrpc.AdminServicer):
    def __init__(
        self,
        *,
        settings: AdminSettings,
        datastore: Datastore,
        authority: Authority,
        ca_admin: CaAdmin,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._settings = settings
        self._td = settings.trust_domain
        self._ds = datastore
        self._ca = authority
        self._ca_admin = ca_admin
        self._clock = clock

    # ------------------------------------------------------------------------------------------- entries

    def _validated(self, message: Any) -> RegistrationEntry:
        return validate_entry(entry_from_proto(message), trust_domain=self._td, now=int(self._clock()))

    @handle_errors
    async def CreateEntry(
        self, request: apb.CreateEntryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.CreateEntryResponse:
        if request.entry.id:
            raise invalid("id is assigned by the server; leave it empty on create")
        entry = self._validated(request.entry)
        created = await asyncio.to_thread(self._ds.create_entry, entry)
        log.info("entry created", extra={"entry_id": created.id, "spiffe_id": created.spiffe_id})
        return apb.CreateEntryResponse(entry=entry_to_proto(created))

    @handle_errors
    async def GetEntry(
        self, request: apb.GetEntryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.GetEntryResponse:
        if not request.id:
            raise invalid("id is required")
        entry = await asyncio.to_thread(self._ds.get_entry, request.id)
        return apb.GetEntryResponse(entry=entry_to_proto(entry))

    @handle_errors
    async def ListEntries(
        self, request: apb.ListEntriesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ListEntriesResponse:
        spiffe_id = str(_parse_id(request.spiffe_id, "spiffe_id")) if request.spiffe_id else None
        parent_id = str(_parse_id(request.parent_id, "parent_id")) if request.parent_id else None
        selectors = selectors_from_proto(request.selectors) if request.selectors else None
        entry_filter = EntryFilter(
            spiffe_id=spiffe_id, parent_id=parent_id, selectors=selectors, selector_match=SelectorMatch.SUPERSET
        )
        page = await asyncio.to_thread(
            self._ds.list_entries, entry_filter, page_size=_page_size(request.page_size), page_token=request.page_token
        )
        return apb.ListEntriesResponse(
            entries=[entry_to_proto(e) for e in page.items], next_page_token=page.next_page_token
        )

    @handle_errors
    async def UpdateEntry(
        self, request: apb.UpdateEntryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.UpdateEntryResponse:
        if not request.entry.id:
            raise invalid("entry.id is required")
        entry = self._validated(request.entry)
        updated = await asyncio.to_thread(self._ds.update_entry, entry)
        log.info("entry updated", extra={"entry_id": updated.id, "spiffe_id": updated.spiffe_id})
        return apb.UpdateEntryResponse(entry=entry_to_proto(updated))

    @handle_errors
    async def DeleteEntry(
        self, request: apb.DeleteEntryRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.DeleteEntryResponse:
        if not request.id:
            raise invalid("id is required")
        deleted = await asyncio.to_thread(self._ds.delete_entry, request.id)
        log.info("entry deleted", extra={"entry_id": deleted.id, "spiffe_id": deleted.spiffe_id})
        return apb.DeleteEntryResponse()

    # -------------------------------------------------------------------------------------------- agents

    @handle_errors
    async def ListAgents(
        self, request: apb.ListAgentsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ListAgentsResponse:
        page = await asyncio.to_thread(
            self._ds.list_agents, page_size=_page_size(request.page_size), page_token=request.page_token
        )
        return apb.ListAgentsResponse(
            agents=[agent_to_proto(a) for a in page.items], next_page_token=page.next_page_token
        )

    @handle_errors
    async def GetAgent(
        self, request: apb.GetAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.GetAgentResponse:
        agent_id = _parse_id(request.spiffe_id, "spiffe_id")
        agent = await asyncio.to_thread(self._ds.get_agent, str(agent_id))
        return apb.GetAgentResponse(agent=agent_to_proto(agent))

    @handle_errors
    async def EvictAgent(
        self, request: apb.EvictAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.EvictAgentResponse:
        agent_id = _parse_id(request.spiffe_id, "spiffe_id")
        await asyncio.to_thread(self._ds.evict_agent, str(agent_id))
        log.info("agent evicted", extra={"agent_id": str(agent_id)})
        return apb.EvictAgentResponse()

    @handle_errors
    async def BanAgent(
        self, request: apb.BanAgentRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.BanAgentResponse:
        agent_id = _parse_id(request.spiffe_id, "spiffe_id")
        await asyncio.to_thread(self._ds.ban_agent, str(agent_id))
        log.warning("agent banned", extra={"agent_id": str(agent_id)})
        return apb.BanAgentResponse()

    # ---------------------------------------------------------------------------------------- join tokens

    @handle_errors
    async def CreateJoinToken(
        self, request: apb.CreateJoinTokenRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.CreateJoinTokenResponse:
        if request.ttl < 0:
            raise invalid("ttl must not be negative")
        if request.ttl > MAX_TOKEN_TTL:
            raise invalid(f"ttl must be at most {MAX_TOKEN_TTL // 86400} days")
        ttl = request.ttl or self._settings.join_token_ttl
        agent_id: SpiffeId | None = None
        if request.spiffe_id:
            agent_id = _parse_id(request.spiffe_id, "spiffe_id")
            if not agent_id.member_of(self._td):
                raise invalid(f"spiffe_id: {agent_id} is not in trust domain {self._td}")
            if not agent_id.is_workload_id():
                raise invalid("spiffe_id: an agent ID needs a path")
            if agent_id == self._settings.server_id:
                raise invalid("spiffe_id: that is the server's own ID")
        secret = secrets.token_urlsafe(32)
        while secret.startswith("-"):  # `--join-token -x...` would read as a missing value on any CLI
            secret = secrets.token_urlsafe(32)
        expires_at = int(self._clock() + ttl)
        record = await asyncio.to_thread(
            self._ds.create_join_token, secret, expires_at, spiffe_id=str(agent_id) if agent_id else None
        )
        resolved = agent_id or default_agent_id(self._td, record.id)
        log.info("join token created", extra={"token_id": record.id, "agent_id": str(resolved)})
        return apb.CreateJoinTokenResponse(
            token=secret, id=record.id, expires_at=record.expires_at, spiffe_id=str(resolved)
        )

    # ------------------------------------------------------------------------------------------- bundles

    @handle_errors
    async def GetBundle(
        self, request: apb.GetBundleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.GetBundleResponse:
        bundle = await asyncio.to_thread(self._ca.trust_bundle)
        if request.format == apb.BundleFormat.BUNDLE_FORMAT_SPIFFE:
            data = bundle.to_document()
        else:
            data = bundle.x509_bundle().pem()
        return apb.GetBundleResponse(trust_domain=self._td.name, data=data)

    @handle_errors
    async def ListFederatedBundles(
        self, request: apb.ListFederatedBundlesRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ListFederatedBundlesResponse:
        bundles = await asyncio.to_thread(self._ds.list_bundles)
        return apb.ListFederatedBundlesResponse(
            bundles=[_federated(b.trust_domain, b.document) for b in bundles if b.trust_domain != self._td.name]
        )

    @handle_errors
    async def SetFederatedBundle(
        self, request: apb.SetFederatedBundleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.SetFederatedBundleResponse:
        td = _trust_domain(request.id)
        if td == self._td:
            raise invalid(f"id: {td} is this server's own trust domain; its bundle is managed by the CA")
        if not request.data:
            raise invalid("data is empty: give a PEM bundle or a SPIFFE bundle document")
        if len(request.data) > MAX_BUNDLE_BYTES:
            raise invalid(f"data is larger than {MAX_BUNDLE_BYTES} bytes")
        try:
            if request.format == apb.BundleFormat.BUNDLE_FORMAT_SPIFFE:
                bundle = SpiffeBundle.from_document(td, request.data)
            else:
                x509_bundle = X509Bundle.parse_pem(td, request.data)
                bundle = SpiffeBundle(td, x509_bundle.authorities, {})
        except (BundleError, ValueError) as exc:
            raise invalid(f"data: not a valid bundle for {td}: {exc}") from None
        if not bundle.x509_authorities and not bundle.jwt_authorities:
            raise invalid("data: the bundle holds no authority")
        stored = await asyncio.to_thread(self._ds.set_bundle, td.name, bundle.to_document())
        log.info("federated bundle set", extra={"trust_domain": td.name})
        return apb.SetFederatedBundleResponse(bundle=_federated(stored.trust_domain, stored.document))

    @handle_errors
    async def DeleteFederatedBundle(
        self, request: apb.DeleteFederatedBundleRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.DeleteFederatedBundleResponse:
        td = _trust_domain(request.id)
        if td == self._td:
            raise invalid(f"id: {td} is this server's own trust domain; its bundle cannot be deleted")
        await asyncio.to_thread(self._ds.delete_bundle, td.name)
        log.info("federated bundle deleted", extra={"trust_domain": td.name})
        return apb.DeleteFederatedBundleResponse()

    # ---------------------------------------------------------------- CA (the `ca` commands: api/ca_admin.py)

    @handle_errors
    async def GetCA(self, request: apb.GetCARequest, context: grpc.aio.ServicerContext[Any, Any]) -> apb.GetCAResponse:
        return apb.GetCAResponse(slots=await self._ca_admin.show())

    @handle_errors
    async def PrepareCA(
        self, request: apb.PrepareCARequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.PrepareCAResponse:
        return apb.PrepareCAResponse(slots=await self._ca_admin.prepare())

    @handle_errors
    async def ActivateCA(
        self, request: apb.ActivateCARequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ActivateCAResponse:
        return apb.ActivateCAResponse(slots=await self._ca_admin.activate())


__all__ = ["AdminServicer", "AdminSettings", "not_found"]
