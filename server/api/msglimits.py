"""How large a request each node API method may receive, and the interceptor that holds each method to it.

- gRPC's ``max_receive_message_length`` is one number per server, and a message under it is buffered whole
  before any handler (or certificate check) runs. At 64 MiB for every method, 24 concurrent 60 MiB ``Sync``
  calls without a client certificate took the server from 66 MB to 1.7 GB resident, never given back.
- So each internal gRPC server receives at most the largest request of the methods it serves
  (:func:`server_limit`): the one reached by connections without a client certificate serves ``Attest`` and
  health only (64 KiB); the one for agents serves everything, at most a batch of CSRs (1 MiB). gRPC refuses a
  larger message from its length prefix, before buffering it.
- Within a server each method is held to its own size (:class:`MessageLimitInterceptor`), sized from what
  agents send (agent/node.py, agent/sync.py) with a wide margin, so a method that needs 100 bytes is never
  the way to make the server hold a megabyte.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import grpc

from tessera.sdk.grpc import rewrap_handler
from tessera.server.api.status import ApiError

KiB = 1024
MiB = 1024 * KiB
NODE = "/tessera.node.v1.Node/"

METHOD_LIMITS: dict[str, int] = {
    # x509pop: the host certificate chain (DER, a few KB) and a CSR; then signatures over challenges.
    NODE + "Attest": 64 * KiB,
    # One CSR for the agent's new key (about 250 bytes for the P-256 keys agents make).
    NODE + "RenewAgent": 16 * KiB,
    # Two revisions and a page token the server issued.
    NODE + "Sync": 16 * KiB,
    # Up to 500 CSRs (api.node.MAX_BATCH) with their entry ids: measured 116 KB for the agent's P-256 keys,
    # about 560 KB if they were RSA-4096.
    NODE + "BatchSignX509SVID": 1 * MiB,
    # An entry id and at most 16 audiences of at most 1 KiB each.
    NODE + "MintJWTSVID": 64 * KiB,
    "/grpc.health.v1.Health/Check": 1 * KiB,
    "/grpc.health.v1.Health/Watch": 1 * KiB,
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": 16 * KiB,
}
DEFAULT_LIMIT = 4 * KiB
"""Any method not in the table (none is registered today)."""


def limit_for(method: str) -> int:
    return METHOD_LIMITS.get(method, DEFAULT_LIMIT)


def server_limit(methods: Iterable[str]) -> int:
    """The ``max_receive_message_length`` of a server serving ``methods``: the largest of their limits."""
    return max((limit_for(m) for m in methods), default=DEFAULT_LIMIT)


class RequestTooLarge(ApiError):
    """A request over its method's limit; also the marker a unary method's deserializer hands its behaviour."""

    def __init__(self, method: str, size: int, limit: int) -> None:
        super().__init__(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"request of {size} bytes is larger than the {limit}-byte limit of {method}",
        )


def _checked(
    deserializer: Callable[[bytes], Any] | None, method: str, limit: int, streaming: bool
) -> Callable[[bytes], Any]:
    """A deserializer that refuses requests over ``limit`` before parsing them. A unary request is deserialized
    before the behaviour runs, where an exception would answer UNKNOWN: it becomes a marker the behaviour
    answers instead. A request stream is read by the servicer, where the exception (an ApiError) answers."""

    def deserialize(raw: bytes) -> Any:
        if len(raw) > limit:
            too_large = RequestTooLarge(method, len(raw), limit)
            if streaming:
                raise too_large
            return too_large
        return raw if deserializer is None else deserializer(raw)

    return deserialize


class MessageLimitInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Answers RESOURCE_EXHAUSTED to a request larger than its method's limit (:data:`METHOD_LIMITS`)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        streaming = bool(handler.request_streaming)
        return rewrap_handler(
            handler,
            _refuse_marker,
            _refuse_marker_stream,
            request_deserializer=_checked(handler.request_deserializer, method, limit_for(method), streaming),
        )


def _refuse_marker(behavior: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if isinstance(request, RequestTooLarge):
            await context.abort(request.code, request.message)
        try:
            return await behavior(request, context)
        except RequestTooLarge as exc:  # a request stream's message, read by a servicer that let it through
            await context.abort(exc.code, exc.message)

    return wrapper


def _refuse_marker_stream(behavior: Callable[..., Any]) -> Callable[..., Awaitable[None]]:
    async def wrapper(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        if isinstance(request, RequestTooLarge):
            await context.abort(request.code, request.message)
        try:
            result = behavior(request, context)
            if inspect.isasyncgen(result):
                async for response in result:
                    await context.write(response)
            else:  # a behaviour that writes through the context (Attest, or another interceptor's wrapper)
                await result
        except RequestTooLarge as exc:
            await context.abort(exc.code, exc.message)

    return wrapper


__all__ = ["METHOD_LIMITS", "MessageLimitInterceptor", "RequestTooLarge", "limit_for", "server_limit"]
