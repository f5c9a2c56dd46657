"""The SPIFFE Workload API on the wire: method paths, message types and handler/stub plumbing.

The messages are generated under the private proto package ``tessera.workload`` (so the ``spiffe`` PyPI
package can live in the same process), but standard clients call ``/SpiffeWorkloadAPI/<Method>``. This
module is the one place that maps the two, for both the agent's server and the SDK's client.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import grpc

from tessera.proto import workload_pb2 as pb
from tessera.sdk.rundir import describe_runtime_path, runtime_path

SERVICE_NAME = "SpiffeWorkloadAPI"
SECURITY_HEADER_KEY = "workload.spiffe.io"
SECURITY_HEADER_VALUE = "true"
SECURITY_METADATA: tuple[tuple[str, str], ...] = ((SECURITY_HEADER_KEY, SECURITY_HEADER_VALUE),)
ENDPOINT_SOCKET_ENV = "SPIFFE_ENDPOINT_SOCKET"
_AGENT_SOCKET_UNDER_RUN = "tessera-agent/public/api.sock"
_AGENT_SOCKET_UNDER_HOME = "agent/api.sock"
DEFAULT_SOCKET_RULE = describe_runtime_path(_AGENT_SOCKET_UNDER_RUN, _AGENT_SOCKET_UNDER_HOME)
"""Where tessera-agent serves the Workload API when not told, in words (help texts, README)."""
CLIENT_SOCKET_RULE = (
    f"the socket of an agent run by the same user if there is one ({DEFAULT_SOCKET_RULE}), "
    f"else /run/{_AGENT_SOCKET_UNDER_RUN}"
)
"""Which socket clients call when not told, in words."""

Kind = Literal["unary_unary", "unary_stream"]


@dataclass(frozen=True, slots=True)
class Method:
    name: str
    kind: Kind
    request: Any  # generated message class
    response: Any

    @property
    def path(self) -> str:
        return f"/{SERVICE_NAME}/{self.name}"


METHODS: Mapping[str, Method] = {
    m.name: m
    for m in (
        Method("FetchX509SVID", "unary_stream", pb.X509SVIDRequest, pb.X509SVIDResponse),
        Method("FetchX509Bundles", "unary_stream", pb.X509BundlesRequest, pb.X509BundlesResponse),
        Method("FetchJWTSVID", "unary_unary", pb.JWTSVIDRequest, pb.JWTSVIDResponse),
        Method("FetchJWTBundles", "unary_stream", pb.JWTBundlesRequest, pb.JWTBundlesResponse),
        Method("ValidateJWTSVID", "unary_unary", pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse),
    )
}


def generic_handler(servicer: object) -> grpc.GenericRpcHandler:
    """Registers ``servicer``'s methods (named like the RPCs) under the wire service name.

    Works for ``grpc.server`` and ``grpc.aio.server`` alike: the aio server accepts coroutine and async
    generator behaviours in the same handler objects.
    """
    handlers: dict[str, grpc.RpcMethodHandler] = {}
    for method in METHODS.values():
        behaviour: Callable[..., Any] = getattr(servicer, method.name)
        factory = (
            grpc.unary_unary_rpc_method_handler
            if method.kind == "unary_unary"
            else grpc.unary_stream_rpc_method_handler
        )
        handlers[method.name] = factory(
            behaviour,
            request_deserializer=method.request.FromString,
            response_serializer=method.response.SerializeToString,
        )
    return grpc.method_handlers_generic_handler(SERVICE_NAME, handlers)


class WorkloadApiStub:
    """Multi-callables for the five RPCs on a channel (sync or aio); callers add SECURITY_METADATA."""

    def __init__(self, channel: grpc.Channel | grpc.aio.Channel) -> None:
        for method in METHODS.values():
            make = channel.unary_unary if method.kind == "unary_unary" else channel.unary_stream
            setattr(
                self,
                method.name,
                make(
                    method.path,
                    request_serializer=method.request.SerializeToString,
                    response_deserializer=method.response.FromString,
                ),
            )

    FetchX509SVID: Any
    FetchX509Bundles: Any
    FetchJWTSVID: Any
    FetchJWTBundles: Any
    ValidateJWTSVID: Any


def default_socket_path(*, euid: int | None = None) -> str:
    """The socket tessera-agent serves by default when run by ``euid`` (this process's by default):
    ``/run/tessera-agent/public/api.sock`` as root, else a directory of the user's own (tessera.sdk.rundir)."""
    return runtime_path(_AGENT_SOCKET_UNDER_RUN, _AGENT_SOCKET_UNDER_HOME, euid=euid)


def client_socket_path() -> str:
    """The socket a client (``tessera-agent api ...``, ``healthcheck``, tessera-helper) calls when neither a
    flag nor ``SPIFFE_ENDPOINT_SOCKET`` names one: an agent this user runs itself when its socket exists, else
    the host's agent (root's default; a workload usually runs as another user than the agent)."""
    own = default_socket_path()
    system = default_socket_path(euid=0)
    return own if own == system or os.path.exists(own) else system


def default_address() -> str:
    """:func:`client_socket_path` as a Workload API address (``unix:///...``)."""
    return "unix://" + client_socket_path()


def endpoint_to_target(address: str) -> str:
    """Turns a Workload API address (``unix:///path``, ``unix:/path`` or a bare absolute path) into a
    gRPC target, refusing forms this implementation does not serve."""
    if address.startswith("unix://"):
        path = address[len("unix://") :]
    elif address.startswith("unix:"):
        path = address[len("unix:") :]
    elif address.startswith("/"):
        path = address
    elif address.startswith("tcp://"):
        return address[len("tcp://") :]
    else:
        raise ValueError(f"workload API address {address!r} must be unix:///absolute/path (or tcp://IP:port)")
    if not path.startswith("/"):
        raise ValueError(f"workload API address {address!r} must name an absolute socket path")
    return "unix:" + path
