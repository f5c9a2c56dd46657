"""What a node API connection without an agent certificate may call: ``Attest``, and health (added by the app).

Such a connection (no client certificate, or one that is not the current SVID of an attested agent) reaches
an internal gRPC server of its own (see :mod:`tessera.server.api.tls_front`), whose receive limit is what
``Attest`` needs. Every other node API method is answered PERMISSION_DENIED there without reading anything
of the request into a parser, with the reason the front recorded (no certificate; banned; not current...).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc

from tessera.proto import node_pb2 as npb
from tessera.server.api.peer import PeerLookup
from tessera.server.api.tls_front import PeerInfo

NODE_SERVICE = "tessera.node.v1.Node"
ANONYMOUS_METHODS = ("Attest",)
NO_CERTIFICATE = "this call needs the agent's SVID as TLS client certificate (attest first)"


def _reason(info: PeerInfo | None) -> str:
    if info is not None and info.refusal:
        return info.refusal
    return NO_CERTIFICATE


def _denier(peers: PeerLookup) -> Callable[..., Any]:
    async def deny(_request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, _reason(peers.lookup(context.peer())))

    return deny


def anonymous_node_handler(attest: Callable[..., Any], peers: PeerLookup) -> grpc.GenericRpcHandler:
    """The node service as anonymous connections see it: ``attest`` (the servicer's Attest) and refusals."""
    service = npb.DESCRIPTOR.services_by_name["Node"]
    deny = _denier(peers)
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in service.methods:
        if method.name == "Attest":
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(
                attest,
                request_deserializer=npb.AttestRequest.FromString,
                response_serializer=npb.AttestResponse.SerializeToString,
            )
            continue
        # Raw bytes in (no deserializer): nothing of a refused request is parsed.
        if method.client_streaming and method.server_streaming:
            handlers[method.name] = grpc.stream_stream_rpc_method_handler(deny)
        elif method.client_streaming:
            handlers[method.name] = grpc.stream_unary_rpc_method_handler(deny)
        elif method.server_streaming:
            handlers[method.name] = grpc.unary_stream_rpc_method_handler(deny)
        else:
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(deny)
    return grpc.method_handlers_generic_handler(NODE_SERVICE, handlers)


__all__ = ["ANONYMOUS_METHODS", "NO_CERTIFICATE", "anonymous_node_handler"]
