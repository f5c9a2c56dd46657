"""The ``TrustAdmin`` admin service (proto/tessera/admin.proto): federation relationships and revocation of single
X509-SVIDs. Served on the admin socket next to ``Admin``; validation happens here so every client gets the same
one-line answers. The service also carries ``TaintAuthority`` / ``RevokeAuthority`` (wire names kept): they
belong to the ``ca`` commands and are answered by :class:`~tessera.server.api.ca_admin.CaAdmin`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import grpc

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.sdk.bundle import SpiffeBundle, X509Bundle
from tessera.sdk.errors import BundleError
from tessera.sdk.spiffeid import TrustDomain
from tessera.server.api.ca_admin import CaAdmin
from tessera.server.api.status import ApiError, handle_errors, invalid
from tessera.server.ca.crl import parse_serial, serial_hex
from tessera.server.ca.revocation import RevocationTarget, revoke_x509_svids
from tessera.server.datastore.base import Datastore, FederationRelationship, RevokedCertificate
from tessera.server.errors import NotFound
from tessera.server.federation.fetch import check_endpoint
from tessera.server.federation.refresher import FederationRefresher

log = logging.getLogger("tessera.server.federation.admin")

MAX_BUNDLE_BYTES = 1024 * 1024


def _revoked_to_proto(r: RevokedCertificate) -> apb.RevokedX509SVID:
    return apb.RevokedX509SVID(
        serial=r.serial,
        issuer_key_id=r.issuer_key_id,
        spiffe_id=r.spiffe_id,
        expires_at=r.expires_at,
        revoked_at=r.revoked_at,
    )


class TrustAdminServicer(agrpc.TrustAdminServicer):
    def __init__(
        self,
        *,
        trust_domain: TrustDomain,
        datastore: Datastore,
        ca_admin: CaAdmin,
        refresher: FederationRefresher,
        on_revocation: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._td = trust_domain
        self._ds = datastore
        self._ca_admin = ca_admin
        self._refresher = refresher
        self._on_revocation = on_revocation
        self._clock = clock

    # ------------------------------------------------------------------------------------------ federation

    def _to_proto(self, r: FederationRelationship) -> apb.FederationRelationship:
        message = apb.FederationRelationship(
            trust_domain=r.trust_domain,
            bundle_endpoint_url=r.bundle_endpoint_url,
            profile=r.profile,
            endpoint_spiffe_id=r.endpoint_spiffe_id,
            last_refresh=r.last_refresh,
            next_refresh=r.next_refresh,
            last_error=r.last_error,
        )
        try:
            stored = self._ds.get_bundle(r.trust_domain)
            bundle = SpiffeBundle.from_document(r.trust_domain, stored.document)
        except (NotFound, BundleError):
            return message
        message.has_bundle = True
        message.bundle_sequence = bundle.sequence
        message.x509_authorities = len(bundle.x509_authorities)
        message.jwt_authorities = len(bundle.jwt_authorities)
        return message

    def _check(
        self, request: apb.CreateFederationRelationshipRequest, *, updating: bool = False
    ) -> tuple[FederationRelationship, bytes | None]:
        r = request.relationship
        profile = r.profile or "https_web"
        try:
            endpoint = check_endpoint(r.trust_domain, r.bundle_endpoint_url, profile, r.endpoint_spiffe_id)
        except ValueError as exc:
            raise invalid(str(exc)) from None
        if endpoint.trust_domain == self._td:
            raise invalid(f"trust_domain: {self._td} is this server's own trust domain")
        document: bytes | None = None
        if request.bundle:
            if len(request.bundle) > MAX_BUNDLE_BYTES:
                raise invalid(f"bundle is larger than {MAX_BUNDLE_BYTES} bytes")
            td = endpoint.trust_domain
            try:
                if request.bundle_format == apb.BundleFormat.BUNDLE_FORMAT_SPIFFE:
                    bundle = SpiffeBundle.from_document(td, request.bundle)
                else:
                    bundle = SpiffeBundle(td, X509Bundle.parse_pem(td, request.bundle).authorities, {})
            except (BundleError, ValueError) as exc:
                raise invalid(f"bundle: not a valid bundle for {td}: {exc}") from None
            if not bundle.x509_authorities and not bundle.jwt_authorities:
                raise invalid("bundle: it holds no authority")
            document = bundle.to_document()
        elif profile == "https_spiffe" and not (updating and self._holds_bundle(endpoint.trust_domain.name)):
            raise invalid(
                "bundle: the https_spiffe profile needs the foreign trust domain's bundle to authenticate its "
                "endpoint (give --bundle-file)"
            )
        relationship = FederationRelationship(
            trust_domain=endpoint.trust_domain.name,
            bundle_endpoint_url=endpoint.url,
            profile=profile,
            endpoint_spiffe_id=str(endpoint.endpoint_id) if endpoint.endpoint_id else "",
            next_refresh=int(self._clock()),
        )
        return relationship, document

    def _holds_bundle(self, trust_domain: str) -> bool:
        try:
            self._ds.get_bundle(trust_domain)
        except NotFound:
            return False
        return True

    @handle_errors
    async def CreateFederationRelationship(
        self, request: apb.CreateFederationRelationshipRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.FederationRelationship:
        relationship, document = self._check(request)
        stored = await asyncio.to_thread(self._ds.create_federation_relationship, relationship)
        if document is not None:
            await asyncio.to_thread(self._ds.set_bundle, stored.trust_domain, document)
        log.info(
            "federation relationship created",
            extra={"trust_domain": stored.trust_domain, "url": stored.bundle_endpoint_url, "profile": stored.profile},
        )
        return await asyncio.to_thread(self._to_proto, stored)

    @handle_errors
    async def UpdateFederationRelationship(
        self, request: apb.CreateFederationRelationshipRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.FederationRelationship:
        relationship, document = await asyncio.to_thread(self._check, request, updating=True)
        current = await asyncio.to_thread(self._ds.get_federation_relationship, relationship.trust_domain)
        updated = replace(
            current,
            bundle_endpoint_url=relationship.bundle_endpoint_url,
            profile=relationship.profile,
            endpoint_spiffe_id=relationship.endpoint_spiffe_id,
            next_refresh=relationship.next_refresh,
            last_error="",
        )
        stored = await asyncio.to_thread(self._ds.update_federation_relationship, updated)
        if document is not None:
            await asyncio.to_thread(self._ds.set_bundle, stored.trust_domain, document)
        log.info("federation relationship updated", extra={"trust_domain": stored.trust_domain})
        return await asyncio.to_thread(self._to_proto, stored)

    def _name(self, text: str) -> str:
        try:
            return TrustDomain.parse(text).name
        except Exception as exc:
            raise invalid(f"trust_domain: {exc}") from None

    @handle_errors
    async def GetFederationRelationship(
        self, request: apb.GetFederationRelationshipRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.FederationRelationship:
        stored = await asyncio.to_thread(self._ds.get_federation_relationship, self._name(request.trust_domain))
        return await asyncio.to_thread(self._to_proto, stored)

    @handle_errors
    async def ListFederationRelationships(
        self, request: apb.ListFederationRelationshipsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ListFederationRelationshipsResponse:
        def build() -> list[apb.FederationRelationship]:
            return [self._to_proto(r) for r in self._ds.list_federation_relationships()]

        return apb.ListFederationRelationshipsResponse(relationships=await asyncio.to_thread(build))

    @handle_errors
    async def DeleteFederationRelationship(
        self, request: apb.GetFederationRelationshipRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.DeleteFederationRelationshipResponse:
        name = self._name(request.trust_domain)
        await asyncio.to_thread(self._ds.delete_federation_relationship, name)
        log.warning("federation relationship deleted; its bundle is no longer trusted", extra={"trust_domain": name})
        return apb.DeleteFederationRelationshipResponse()

    @handle_errors
    async def RefreshFederatedBundle(
        self, request: apb.GetFederationRelationshipRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.FederationRelationship:
        stored = await asyncio.to_thread(self._ds.get_federation_relationship, self._name(request.trust_domain))
        refreshed = await self._refresher.refresh_async(stored)
        if refreshed.last_error:
            raise ApiError(
                grpc.StatusCode.UNAVAILABLE, f"refresh of {refreshed.trust_domain} failed: {refreshed.last_error}"
            )
        return await asyncio.to_thread(self._to_proto, refreshed)

    # ---------------------------------------------------- authorities (the `ca` commands: api/ca_admin.py)

    @handle_errors
    async def TaintAuthority(
        self, request: apb.AuthorityRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.AuthorityResponse:
        return await self._ca_admin.taint(request)

    @handle_errors
    async def RevokeAuthority(
        self, request: apb.AuthorityRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.AuthorityResponse:
        return await self._ca_admin.revoke(request)

    # ----------------------------------------------------------------------------------- X509-SVIDs

    @handle_errors
    async def RevokeX509SVIDs(
        self, request: apb.RevokeX509SVIDsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.RevokeX509SVIDsResponse:
        which = request.WhichOneof("target")
        if which is None:
            raise invalid("give one of serial, entry_id or agent_id")
        if which == "serial":
            try:
                target = RevocationTarget(serial=serial_hex(parse_serial(request.serial)))
            except ValueError as exc:
                raise invalid(f"serial: {exc}") from None
            if request.cut_off:
                raise invalid("cut_off applies to entry_id or agent_id; to stop an entry, revoke by entry id")
        elif not getattr(request, which):
            raise invalid(f"{which} is empty")  # the oneof is set, but to an empty value
        elif which == "entry_id":
            target = RevocationTarget(entry_id=request.entry_id)
            await asyncio.to_thread(self._ds.get_entry, request.entry_id)  # NotFound for an unknown entry
        else:
            target = RevocationTarget(agent_id=request.agent_id)
        now = int(self._clock())
        try:
            revoked = await asyncio.to_thread(revoke_x509_svids, self._ds, target, now)
        except NotFound:
            if not request.cut_off:
                raise
            revoked = []  # nothing live to revoke, but the operator still wants the entry / agent stopped
        if request.cut_off and target.entry_id:
            await asyncio.to_thread(self._ds.delete_entry, target.entry_id)
            log.warning("entry deleted after revoking its SVIDs", extra={"entry_id": target.entry_id})
        elif request.cut_off and target.agent_id:
            await asyncio.to_thread(self._ds.ban_agent, target.agent_id)
            log.warning("agent banned after revoking its SVIDs", extra={"agent_id": target.agent_id})
        self._on_revocation()
        return apb.RevokeX509SVIDsResponse(revoked=[_revoked_to_proto(r) for r in revoked])

    @handle_errors
    async def ListRevokedX509SVIDs(
        self, request: apb.ListRevokedX509SVIDsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> apb.ListRevokedX509SVIDsResponse:
        revoked = await asyncio.to_thread(self._ds.list_revoked_certificates, unexpired_at=int(self._clock()))
        return apb.ListRevokedX509SVIDsResponse(revoked=[_revoked_to_proto(r) for r in revoked])


__all__ = ["TrustAdminServicer"]
