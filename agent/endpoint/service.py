"""The five Workload API RPCs, with the semantics of SPIFFE.md section 2.

Callers are identified only through the relay's peer registry: the facts captured when their connection was
accepted. Each call first checks that the connecting process is still that process (not exec'd, moved or
exited) and, while an entry selects by executable, that no other process holds the connection; a caller that
fails either is refused with PERMISSION_DENIED and the reason. Then the attestors run over the facts.
Streams send their first message at once and a complete new message on every change, wake on the cache's
shared change event, and never end with OK: PermissionDenied when the caller's last identity goes away,
Unavailable when the agent shuts down.

Every refusal is raised as one of the agent's errors; the status table (agent/endpoint/status.py) picks the code.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from typing import Any

from google.protobuf import struct_pb2

from tessera.agent.attestors.base import WorkloadAttestor, attest
from tessera.agent.cache import CachedJwt, EntryRecord, WorkloadCache
from tessera.agent.endpoint.holders import ConnectionGuard
from tessera.agent.endpoint.relay import PeerRegistry
from tessera.agent.endpoint.status import WORKLOAD_API_STATUS
from tessera.agent.errors import AgentError, InvalidRequestError, NoIdentityError, NotReadyError
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.errors import SpiffeIdError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.workloadapi.wire import SECURITY_HEADER_KEY, SECURITY_HEADER_VALUE

JwtMinter = Callable[[EntryRecord, Sequence[str]], Awaitable[CachedJwt]]


MAX_AUDIENCES = 16
MAX_AUDIENCE_BYTES = 1024
"""The server's limits on a JWT-SVID's audience (node API MintJWTSVID), checked before asking it."""


class WorkloadApiServicer:
    def __init__(
        self,
        cache: WorkloadCache,
        registry: PeerRegistry,
        attestors: Sequence[WorkloadAttestor],
        *,
        minter: JwtMinter | None = None,
        proc_root: str = "/proc",
        first_response_timeout: float = 30.0,
        guard: ConnectionGuard | None = None,
    ) -> None:
        self.cache = cache
        self.registry = registry
        self.attestors = list(attestors)
        self.minter = minter
        self.proc_root = proc_root
        self.guard = guard
        self.first_response_timeout = first_response_timeout
        self.shutting_down = False

    def shutdown(self) -> None:
        """Ends every open stream with Unavailable (woken through the cache's change event)."""
        self.shutting_down = True
        self.cache._bump()

    # -- caller identity -------------------------------------------------------------------------------

    def _check_header(self, context: Any) -> None:
        values = [v for k, v in (context.invocation_metadata() or ()) if k == SECURITY_HEADER_KEY]
        if values != [SECURITY_HEADER_VALUE]:
            raise InvalidRequestError(
                f"security header missing from request: send metadata {SECURITY_HEADER_KEY}: {SECURITY_HEADER_VALUE}"
            )

    def _check_running(self) -> None:
        if self.shutting_down:
            raise NotReadyError("agent is shutting down")

    async def _caller(self, context: Any) -> frozenset[str]:
        """The caller's selectors; raises CallerRefused or WorkloadAttestationError when it cannot be attested."""
        self._check_header(context)
        self._check_running()
        process = self.registry.lookup(context.peer())
        if process is None:
            raise NotReadyError("caller could not be identified; retry")
        verify = None if self.guard is None else self.guard.verify
        return await attest(process, self.attestors, self.proc_root, verify=verify)

    async def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.first_response_timeout
        while not self.cache.ready:
            event = self.cache.changed()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.shutting_down:
                raise NotReadyError("agent has not synced with the server yet")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    # -- streams ---------------------------------------------------------------------------------------

    async def _stream(self, context: Any, kind: str) -> AsyncGenerator[Any, None]:
        selectors = await self._caller(context)
        await self._wait_ready()
        cache = self.cache
        last: Any = None
        deadline = time.monotonic() + self.first_response_timeout
        with cache.watch(selectors):
            while True:
                event = cache.changed()
                self._check_running()
                ent = cache.entitlement(selectors)
                if not ent.has_identity:
                    raise NoIdentityError("no identity issued to this workload")
                message = getattr(ent, kind)
                if kind == "x509":
                    if message is None:
                        cache.request(cache.missing_svids(ent.entries))
                    else:
                        cache.touch(ent.entries)
                if message is not None and message is not last and message != last:
                    last = message
                    yield message
                if last is None:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise NotReadyError("identity not yet available from the server; retry")
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), remaining)
                else:
                    await event.wait()

    @WORKLOAD_API_STATUS.stream
    async def FetchX509SVID(self, request: wpb.X509SVIDRequest, context: Any) -> AsyncGenerator[Any, None]:
        async for message in self._stream(context, "x509"):
            yield message

    @WORKLOAD_API_STATUS.stream
    async def FetchX509Bundles(self, request: wpb.X509BundlesRequest, context: Any) -> AsyncGenerator[Any, None]:
        async for message in self._stream(context, "x509_bundles"):
            yield message

    @WORKLOAD_API_STATUS.stream
    async def FetchJWTBundles(self, request: wpb.JWTBundlesRequest, context: Any) -> AsyncGenerator[Any, None]:
        async for message in self._stream(context, "jwt_bundles"):
            yield message

    # -- unary -----------------------------------------------------------------------------------------

    @WORKLOAD_API_STATUS.unary
    async def FetchJWTSVID(self, request: wpb.JWTSVIDRequest, context: Any) -> wpb.JWTSVIDResponse:
        selectors = await self._caller(context)
        audience = [a for a in request.audience if a]
        if not audience:
            raise InvalidRequestError("audience is required")
        if len(audience) > MAX_AUDIENCES or any(len(a.encode()) > MAX_AUDIENCE_BYTES for a in audience):
            # The server refuses these too; saying so here keeps it a caller error rather than "unavailable".
            raise InvalidRequestError(f"at most {MAX_AUDIENCES} audiences of at most {MAX_AUDIENCE_BYTES} bytes each")
        if request.spiffe_id:
            try:
                SpiffeId.parse(request.spiffe_id)
            except SpiffeIdError as exc:
                raise InvalidRequestError(f"spiffe_id is not valid: {exc}") from None
        await self._wait_ready()
        entries = self.cache.matching_entries(selectors)
        if request.spiffe_id:
            entries = [e for e in entries if e.spiffe_id == request.spiffe_id]
        if not entries:
            raise NoIdentityError("no identity issued to this workload")
        key = frozenset(audience)
        svids = []
        for entry in entries:
            cached = self.cache.cached_jwt(entry.id, key)
            if cached is None:
                cached = await self._mint(entry, sorted(audience))
                self.cache.put_jwt(entry.id, key, cached)
            svids.append(wpb.JWTSVID(spiffe_id=entry.spiffe_id, svid=cached.token, hint=entry.hint))
        return wpb.JWTSVIDResponse(svids=svids)

    async def _mint(self, entry: EntryRecord, audience: Sequence[str]) -> CachedJwt:
        if self.minter is None:
            raise NotReadyError("JWT-SVIDs cannot be minted right now")
        try:
            return await self.minter(entry, audience)
        except AgentError as exc:  # the server refused or is unreachable: the workload may retry
            raise NotReadyError(f"could not mint a JWT-SVID: {exc}") from exc

    @WORKLOAD_API_STATUS.unary
    async def ValidateJWTSVID(self, request: wpb.ValidateJWTSVIDRequest, context: Any) -> wpb.ValidateJWTSVIDResponse:
        """Validated by the SDK's validator (the one JWT-SVID validator) against every trust bundle the agent
        holds, at the cache's clock; its SvidError or VerificationError is the caller's INVALID_ARGUMENT."""
        self._check_header(context)
        if not request.audience:
            raise InvalidRequestError("audience is required")
        if not request.svid:
            raise InvalidRequestError("svid is required")
        now = dt.datetime.fromtimestamp(self.cache.now(), dt.UTC)
        svid = JwtSvid.parse_and_validate(request.svid, self.cache.jwt_bundles, request.audience, now=now)
        claims = struct_pb2.Struct()
        claims.update(svid.claims)
        return wpb.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=claims)
