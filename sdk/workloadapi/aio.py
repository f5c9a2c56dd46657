"""asyncio Workload API client: the same calls as :class:`WorkloadApiClient`, with watches as async iterators.

``async for ctx in client.watch_x509_context(): ...`` yields every update and reconnects on its own with
exponential backoff and jitter; it ends only when the consumer stops iterating (or its task is cancelled)
or the agent answers InvalidArgument, which is raised. An agent ending a stream without an error is
treated as a broken connection and reported to ``on_error`` before reconnecting.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

import grpc
import grpc.aio

from tessera.proto import workload_pb2 as pb
from tessera.sdk.bundle import BundleSet, JwtBundle, X509Bundle
from tessera.sdk.errors import WorkloadApiError
from tessera.sdk.jwtsvid import JwtSvid
from tessera.sdk.spiffeid import SpiffeId
from tessera.sdk.svid import X509Svid
from tessera.sdk.workloadapi.client import ErrorCallback, _audiences, _report
from tessera.sdk.workloadapi.common import (
    BackoffPolicy,
    WorkloadApiClosedError,
    WorkloadApiResponseError,
    WorkloadApiStreamEndedError,
    X509Context,
    channel_options,
    decode_jwt_bundles_response,
    decode_jwt_svid_response,
    decode_validate_response,
    decode_x509_bundles_response,
    decode_x509_svid_response,
    error_from_rpc,
    is_final,
    resolve_address,
)
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

log = logging.getLogger(__name__)

T = TypeVar("T")


class AsyncWorkloadApiClient:
    """asyncio client for the SPIFFE Workload API. Create it inside a running event loop."""

    def __init__(
        self,
        address: str | None = None,
        *,
        timeout: float | None = 30.0,
        backoff: BackoffPolicy | None = None,
    ) -> None:
        self.address, self._target = resolve_address(address)
        self._timeout = timeout
        self._backoff = backoff or BackoffPolicy()
        self._channel = grpc.aio.insecure_channel(self._target, options=channel_options(self._backoff))
        self._stub = WorkloadApiStub(self._channel)
        self._closed = False

    def _check_open(self) -> None:
        if self._closed:
            raise WorkloadApiClosedError(f"Workload API client for {self.address} is closed")

    async def _first(self, rpc_name: str, request: Any, decode: Callable[[Any], T]) -> T:
        self._check_open()
        call = getattr(self._stub, rpc_name)(request, metadata=SECURITY_METADATA, timeout=self._timeout)
        try:
            resp = await call.read()
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, rpc_name, self.address) from None
        finally:
            call.cancel()
        if resp is grpc.aio.EOF:
            raise WorkloadApiStreamEndedError(
                f"Workload API {rpc_name} at {self.address} ended the stream before sending anything"
            )
        return decode(resp)

    async def _unary(self, rpc_name: str, request: Any) -> Any:
        self._check_open()
        try:
            return await getattr(self._stub, rpc_name)(request, metadata=SECURITY_METADATA, timeout=self._timeout)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc, rpc_name, self.address) from None

    async def fetch_x509_context(self) -> X509Context:
        return await self._first("FetchX509SVID", pb.X509SVIDRequest(), decode_x509_svid_response)

    async def fetch_x509_svids(self) -> list[X509Svid]:
        return list((await self.fetch_x509_context()).svids)

    async def fetch_x509_svid(self) -> X509Svid:
        return (await self.fetch_x509_context()).default_svid

    async def fetch_x509_bundles(self) -> BundleSet[X509Bundle]:
        return await self._first("FetchX509Bundles", pb.X509BundlesRequest(), decode_x509_bundles_response)

    async def fetch_jwt_bundles(self) -> BundleSet[JwtBundle]:
        return await self._first("FetchJWTBundles", pb.JWTBundlesRequest(), decode_jwt_bundles_response)

    async def fetch_jwt_svids(
        self, audiences: str | list[str] | tuple[str, ...], spiffe_id: SpiffeId | str | None = None
    ) -> list[JwtSvid]:
        auds = _audiences(audiences)
        request = pb.JWTSVIDRequest(audience=list(auds), spiffe_id=str(spiffe_id) if spiffe_id else "")
        return decode_jwt_svid_response(await self._unary("FetchJWTSVID", request), auds)

    async def fetch_jwt_svid(
        self, audiences: str | list[str] | tuple[str, ...], spiffe_id: SpiffeId | str | None = None
    ) -> JwtSvid:
        return (await self.fetch_jwt_svids(audiences, spiffe_id))[0]

    async def validate_jwt_svid(self, token: str, audience: str) -> JwtSvid:
        if not token or not audience:
            raise WorkloadApiError("validate_jwt_svid needs a token and an audience")
        resp = await self._unary("ValidateJWTSVID", pb.ValidateJWTSVIDRequest(audience=audience, svid=token))
        return decode_validate_response(resp, token, audience)

    def watch_x509_context(self, on_error: ErrorCallback | None = None) -> AsyncIterator[X509Context]:
        return self._watch("FetchX509SVID", pb.X509SVIDRequest(), decode_x509_svid_response, on_error)

    def watch_x509_bundles(self, on_error: ErrorCallback | None = None) -> AsyncIterator[BundleSet[X509Bundle]]:
        return self._watch("FetchX509Bundles", pb.X509BundlesRequest(), decode_x509_bundles_response, on_error)

    def watch_jwt_bundles(self, on_error: ErrorCallback | None = None) -> AsyncIterator[BundleSet[JwtBundle]]:
        return self._watch("FetchJWTBundles", pb.JWTBundlesRequest(), decode_jwt_bundles_response, on_error)

    async def _watch(
        self, rpc_name: str, request: Any, decode: Callable[[Any], T], on_error: ErrorCallback | None
    ) -> AsyncIterator[T]:
        backoff = self._backoff.start()
        while True:
            self._check_open()
            call = getattr(self._stub, rpc_name)(request, metadata=SECURITY_METADATA)
            error: WorkloadApiError
            try:
                while True:
                    resp = await call.read()
                    if resp is grpc.aio.EOF:
                        error = WorkloadApiStreamEndedError(
                            f"Workload API {rpc_name} at {self.address} ended the stream without an error; "
                            "reconnecting"
                        )
                        break
                    try:
                        update = decode(resp)
                    except WorkloadApiResponseError as exc:
                        _report(on_error, exc, rpc_name)
                        continue
                    backoff.reset()
                    yield update
            except grpc.RpcError as exc:
                if self._closed:
                    raise WorkloadApiClosedError(f"Workload API client for {self.address} is closed") from None
                error = error_from_rpc(exc, rpc_name, self.address)
            finally:
                call.cancel()
            _report(on_error, error, rpc_name)
            if is_final(error):
                raise error
            await asyncio.sleep(backoff.next_delay())

    async def close(self) -> None:
        self._closed = True
        await self._channel.close()

    async def __aenter__(self) -> AsyncWorkloadApiClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
