"""The five Workload API RPCs, with the semantics of SPIFFE.md section 2.

Callers are identified only through the relay's peer registry: the facts captured when their connection was
accepted. Each call first checks that the connecting process is still that process (not exec'd, moved or
exited) and, while an entry selects by executable, that no other process holds the connection; a caller that
fails either is refused with PERMISSION_DENIED and the reason. Then the attestors run over the facts.
Streams send their first message at once and a complete new message on every change, wake on the cache's
shared change event, and never end with OK: PermissionDenied when the caller's last identity goes away,
Unavailable when the agent shuts down.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, NoReturn

import grpc
from google.protobuf import struct_pb2

from tessera.agent.attestors.base import WorkloadAttestor, attest
from tessera.agent.cache import CachedJwt, EntryRecord, WorkloadCache
from tessera.agent.endpoint.holders import ConnectionGuard
from tessera.agent.endpoint.relay import PeerRegistry
from tessera.agent.errors import AgentError, AttestationError, CallerRefused
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.errors import SpiffeIdError, SvidError, VerificationError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.workloadapi.wire import SECURITY_HEADER_KEY, SECURITY_HEADER_VALUE

log = logging.getLogger(__name__)

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
        self.attestations = 0

    def shutdown(self) -> None:
        """Ends every open stream with Unavailable (woken through the cache's change event)."""
        self.shutting_down = True
        self.cache._bump()

    # -- caller identity -------------------------------------------------------------------------------

    async def _abort(self, context: grpc.aio.ServicerContext, code: grpc.StatusCode, details: str) -> NoReturn:
        await context.abort(code, details)
        raise AssertionError("unreachable")  # context.abort always raises

    async def _check_header(self, context: grpc.aio.ServicerContext) -> None:
        values = [v for k, v in (context.invocation_metadata() or ()) if k == SECURITY_HEADER_KEY]
        if values != [SECURITY_HEADER_VALUE]:
            await self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"security header missing from request: send metadata {SECURITY_HEADER_KEY}: {SECURITY_HEADER_VALUE}",
            )

    async def _caller(self, context: grpc.aio.ServicerContext) -> frozenset[str]:
        await self._check_header(context)
        if self.shutting_down:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, "agent is shutting down")
        process = self.registry.lookup(context.peer())
        if process is None:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, "caller could not be identified; retry")
        try:
            verify = None if self.guard is None else self.guard.verify
            selectors = await attest(process, self.attestors, self.proc_root, verify=verify)
        except CallerRefused as exc:
            await self._abort(context, grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except AttestationError as exc:
            await self._abort(context, grpc.StatusCode.UNAVAILABLE, f"workload attestation failed: {exc}")
        self.attestations += 1
        return selectors

    async def _wait_ready(self, context: grpc.aio.ServicerContext) -> None:
        deadline = time.monotonic() + self.first_response_timeout
        while not self.cache.ready:
            event = self.cache.changed()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.shutting_down:
                await self._abort(context, grpc.StatusCode.UNAVAILABLE, "agent has not synced with the server yet")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    # -- streams ---------------------------------------------------------------------------------------

    async def _stream(self, context: grpc.aio.ServicerContext, kind: str) -> AsyncIterator[Any]:
        selectors = await self._caller(context)
        await self._wait_ready(context)
        cache = self.cache
        last: Any = None
        deadline = time.monotonic() + self.first_response_timeout
        with cache.watch(selectors):
            while True:
                event = cache.changed()
                if self.shutting_down:
                    await self._abort(context, grpc.StatusCode.UNAVAILABLE, "agent is shutting down")
                ent = cache.entitlement(selectors)
                if not ent.has_identity:
                    await self._abort(context, grpc.StatusCode.PERMISSION_DENIED, "no identity issued to this workload")
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
                        await self._abort(
                            context, grpc.StatusCode.UNAVAILABLE, "identity not yet available from the server; retry"
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(event.wait(), remaining)
                else:
                    await event.wait()

    async def FetchX509SVID(
        self, request: wpb.X509SVIDRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for message in self._stream(context, "x509"):
            yield message

    async def FetchX509Bundles(
        self, request: wpb.X509BundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for message in self._stream(context, "x509_bundles"):
            yield message

    async def FetchJWTBundles(
        self, request: wpb.JWTBundlesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[Any]:
        async for message in self._stream(context, "jwt_bundles"):
            yield message

    # -- unary -----------------------------------------------------------------------------------------

    async def FetchJWTSVID(self, request: wpb.JWTSVIDRequest, context: grpc.aio.ServicerContext) -> wpb.JWTSVIDResponse:
        selectors = await self._caller(context)
        audience = [a for a in request.audience if a]
        if not audience:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience is required")
        if len(audience) > MAX_AUDIENCES or any(len(a.encode()) > MAX_AUDIENCE_BYTES for a in audience):
            # The server refuses these too; saying so here keeps it a caller error rather than "unavailable".
            await self._abort(
                context,
                grpc.StatusCode.INVALID_ARGUMENT,
                f"at most {MAX_AUDIENCES} audiences of at most {MAX_AUDIENCE_BYTES} bytes each",
            )
        if request.spiffe_id:
            try:
                SpiffeId.parse(request.spiffe_id)
            except SpiffeIdError as exc:
                await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, f"spiffe_id is not valid: {exc}")
        await self._wait_ready(context)
        entries = self.cache.matching_entries(selectors)
        if request.spiffe_id:
            entries = [e for e in entries if e.spiffe_id == request.spiffe_id]
        if not entries:
            await self._abort(context, grpc.StatusCode.PERMISSION_DENIED, "no identity issued to this workload")
        key = frozenset(audience)
        svids = []
        for entry in entries:
            cached = self.cache.cached_jwt(entry.id, key)
            if cached is None:
                if self.minter is None:
                    await self._abort(context, grpc.StatusCode.UNAVAILABLE, "JWT-SVIDs cannot be minted right now")
                try:
                    cached = await self.minter(entry, sorted(audience))
                except AgentError as exc:
                    await self._abort(context, grpc.StatusCode.UNAVAILABLE, f"could not mint a JWT-SVID: {exc}")
                self.cache.put_jwt(entry.id, key, cached)
            svids.append(wpb.JWTSVID(spiffe_id=entry.spiffe_id, svid=cached.token, hint=entry.hint))
        return wpb.JWTSVIDResponse(svids=svids)

    async def ValidateJWTSVID(
        self, request: wpb.ValidateJWTSVIDRequest, context: grpc.aio.ServicerContext
    ) -> wpb.ValidateJWTSVIDResponse:
        await self._check_header(context)
        if not request.audience:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "audience is required")
        if not request.svid:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, "svid is required")
        try:
            now = dt.datetime.fromtimestamp(self.cache.now(), dt.UTC)
            svid = JwtSvid.parse_and_validate(request.svid, self.cache.jwt_bundles, request.audience, now=now)
        except (SvidError, VerificationError) as exc:
            await self._abort(context, grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        struct = struct_pb2.Struct()
        struct.update(svid.claims)
        return wpb.ValidateJWTSVIDResponse(spiffe_id=str(svid.spiffe_id), claims=struct)
