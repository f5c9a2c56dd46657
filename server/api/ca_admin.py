"""The server side of the ``ca`` commands: show, prepare, activate, taint and revoke the CA's authorities.

- On the wire these calls live in two services (``GetCA`` / ``PrepareCA`` / ``ActivateCA`` in ``Admin``,
  ``TaintAuthority`` / ``RevokeAuthority`` in ``TrustAdmin``), and those names are a contract. Both servicers
  hand the calls to :class:`CaAdmin`, so an authority's whole life as an operator drives it reads in one place.
- It works on the manager that rotates, not on the node API's narrow signing interface: forcing a rotation is
  an operator's act, never an agent's.
- After every change the server publishes the bundle and CRLs and renews its own SVID at once
  (``on_ca_change``). Revoking waits until nothing the authority signed is still in use, unless forced.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tessera.proto import admin_pb2 as apb
from tessera.server.api.status import invalid
from tessera.server.ca.manager import CaManager
from tessera.server.ca.revocation import pending_reissue
from tessera.server.ca.slots import AUTHORITY_KINDS, AuthorityInfo, AuthorityKind
from tessera.server.datastore.base import Datastore
from tessera.server.errors import AuthorityStateError

log = logging.getLogger("tessera.server.api.ca_admin")


def authority_to_proto(info: AuthorityInfo) -> apb.CASlot:
    """One authority as ``ca show`` prints it (the wire names it a slot and its authority ID ``key_id``)."""
    return apb.CASlot(
        kind=info.kind,
        state=str(info.status),
        key_id=info.authority_id,
        not_before=int(info.not_before.timestamp()),
        not_after=int(info.not_after.timestamp()),
        key_type=info.key_kind,
        tainted=info.tainted,
    )


def _kind(request: apb.AuthorityRequest) -> AuthorityKind:
    kind = request.kind or "x509"
    if kind not in AUTHORITY_KINDS:
        raise invalid(f"kind: expected x509 or jwt, got {kind!r}")
    if not request.key_id:
        raise invalid("key_id is required (see `ca show`)")
    return "x509" if kind == "x509" else "jwt"


@dataclass(frozen=True, kw_only=True)
class CaAdmin:
    """The operator's hold on the CA. Each call returns every authority afterwards (what ``ca show`` prints)."""

    manager: CaManager
    datastore: Datastore
    on_ca_change: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.time

    async def show(self) -> list[apb.CASlot]:
        return [authority_to_proto(a) for a in await asyncio.to_thread(self.manager.authorities)]

    async def prepare(self) -> list[apb.CASlot]:
        await asyncio.to_thread(self.manager.prepare)
        self.on_ca_change()
        log.warning("CA prepared on operator request")
        return await self.show()

    async def activate(self) -> list[apb.CASlot]:
        await asyncio.to_thread(self.manager.activate)
        self.on_ca_change()
        log.warning("CA activated on operator request")
        return await self.show()

    async def taint(self, request: apb.AuthorityRequest) -> apb.AuthorityResponse:
        await asyncio.to_thread(self.manager.taint, _kind(request), request.key_id)
        self.on_ca_change()
        return apb.AuthorityResponse(slots=await self.show())

    async def revoke(self, request: apb.AuthorityRequest) -> apb.AuthorityResponse:
        kind = _kind(request)
        authority = await asyncio.to_thread(self.manager.check_revocable, kind, request.key_id)
        authority_id = authority.authority_id
        pending = await self._pending(kind, authority_id, force=request.force)
        await asyncio.to_thread(self.manager.revoke, kind, authority_id)
        self.on_ca_change()
        return apb.AuthorityResponse(slots=await self.show(), pending_svids=pending)

    async def _pending(self, kind: AuthorityKind, authority_id: str, *, force: bool) -> int:
        """How many SVIDs the authority signed are still in use; refuses (unless forced) when any is."""
        now = int(self.clock())
        if kind == "x509":
            waiting = await asyncio.to_thread(pending_reissue, self.datastore, authority_id, now)
            if waiting and not force:
                sample = ", ".join(sorted({w.spiffe_id for w in waiting})[:3])
                raise AuthorityStateError(
                    f"{len(waiting)} unexpired SVIDs signed by X.509 authority {authority_id} have not been "
                    f"re-issued yet (e.g. {sample}); wait for agents to sync after `ca taint`, or pass --force"
                )
            return len(waiting)
        minted_until = self.manager.ca.jwt_minted_until(authority_id)
        if minted_until is None or minted_until.timestamp() <= now:
            return 0
        if not force:
            raise AuthorityStateError(
                f"JWT-SVIDs minted with key {authority_id} are valid until {minted_until.isoformat()}; "
                "wait until then or pass --force"
            )
        return 1
