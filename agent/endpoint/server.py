"""The Workload API endpoint: public socket relay in front of an internal grpc.aio server."""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Sequence

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from tessera.agent.attestors.base import WorkloadAttestor
from tessera.agent.cache import WorkloadCache
from tessera.agent.endpoint.holders import ConnectionGuard
from tessera.agent.endpoint.relay import PeerRegistry, WorkloadRelay
from tessera.agent.endpoint.service import JwtMinter, WorkloadApiServicer
from tessera.agent.limits import DEFAULT_FIRST_REQUEST_TIMEOUT, DEFAULT_MAX_CONNECTIONS_PER_CALLER
from tessera.proto import workload_pb2
from tessera.sdk.workloadapi.wire import METHODS, SERVICE_NAME, generic_handler

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
INTERNAL_IDLE_MS = 300_000
_PRIVATE_PACKAGE = ".tessera.workload."


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """A descriptor pool describing the service under its wire name.

    The project's messages live in a private proto package (see workload.proto), so reflection gets its
    own pool holding a package-less copy plus the ``SpiffeWorkloadAPI`` service, exactly what standard
    clients see on the wire.
    """
    pool = descriptor_pool.DescriptorPool()
    for module in (struct_pb2, health_pb2, reflection_pb2):
        fdp = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(fdp)
        pool.Add(fdp)
    fdp = descriptor_pb2.FileDescriptorProto()
    workload_pb2.DESCRIPTOR.CopyToProto(fdp)
    fdp.name = "workload.proto"
    fdp.ClearField("package")

    def rename(messages: Sequence[descriptor_pb2.DescriptorProto]) -> None:
        for message in messages:
            for field in message.field:
                if field.type_name.startswith(_PRIVATE_PACKAGE):
                    field.type_name = "." + field.type_name[len(_PRIVATE_PACKAGE) :]
            rename(message.nested_type)

    rename(fdp.message_type)
    service = fdp.service.add(name=SERVICE_NAME)
    for method in METHODS.values():
        service.method.add(
            name=method.name,
            input_type="." + method.request.DESCRIPTOR.name,
            output_type="." + method.response.DESCRIPTOR.name,
            server_streaming=method.kind == "unary_stream",
        )
    pool.Add(fdp)
    return pool


def binary_selectors_in_use(cache: WorkloadCache) -> bool:
    """Whether some entry selects by executable: the selectors a forked or handed-over connection could forge."""
    return cache.uses_selector_type("unix:path") or cache.uses_selector_type("unix:sha256")


class WorkloadEndpoint:
    def __init__(
        self,
        socket_path: str,
        cache: WorkloadCache,
        attestors: Sequence[WorkloadAttestor],
        *,
        minter: JwtMinter | None = None,
        proc_root: str = "/proc",
        first_response_timeout: float = 30.0,
        interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
        max_connections_per_caller: int = DEFAULT_MAX_CONNECTIONS_PER_CALLER,
        first_request_timeout: float = DEFAULT_FIRST_REQUEST_TIMEOUT,
    ) -> None:
        self.socket_path = socket_path
        self._max_connections_per_caller = max_connections_per_caller
        self._first_request_timeout = first_request_timeout
        self._interceptors = list(interceptors)
        self.registry = PeerRegistry()
        # Who holds a connection matters only while some entry selects by executable (unix:path, unix:sha256).
        self.guard = ConnectionGuard(proc_root, lambda: binary_selectors_in_use(cache))
        self.servicer = WorkloadApiServicer(
            cache,
            self.registry,
            attestors,
            minter=minter,
            proc_root=proc_root,
            first_response_timeout=first_response_timeout,
            guard=self.guard,
        )
        self.health = health.aio.HealthServicer()
        self._private_dir = ""
        self._server: grpc.aio.Server | None = None
        self.relay: WorkloadRelay | None = None
        self._proc_root = proc_root

    async def start(self) -> None:
        # Short path under /tmp (Unix socket paths are limited to 107 bytes), owner-only.
        self._private_dir = tempfile.mkdtemp(prefix="tessera-agent-", dir="/tmp")
        internal = f"{self._private_dir}/grpc.sock"
        server = grpc.aio.server(
            interceptors=self._interceptors or None,
            options=[
                ("grpc.max_concurrent_streams", 10000),
                ("grpc.so_reuseport", 0),
                # A connection with no call open this long (one that sent a preface, never a request) is told
                # to go away; clients reconnect on their next call. Its relay then closes both sides.
                ("grpc.max_connection_idle_ms", INTERNAL_IDLE_MS),
            ],
        )
        server.add_generic_rpc_handlers((generic_handler(self.servicer),))
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, HEALTH_SERVICE, reflection.SERVICE_NAME), server, pool=reflection_pool()
        )
        server.add_insecure_port("unix:" + internal)
        await server.start()
        self._server = server
        self.relay = WorkloadRelay(
            self.socket_path,
            internal,
            f"{self._private_dir}/c",
            self.registry,
            proc_root=self._proc_root,
            guard=self.guard,
            max_connections_per_caller=self._max_connections_per_caller,
            first_request_timeout=self._first_request_timeout,
        )
        try:
            await self.relay.start()
        except BaseException:
            # A refused socket (one line for the operator) must not leave the internal server running behind.
            self.relay = None
            await self.stop(grace=0)
            raise
        # Health says SERVING once the cache holds a first sync (the daemon flips it; tests start ready).
        await self.set_serving(self.servicer.cache.ready)
        log.info("Workload API listening on %s", self.socket_path)

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set("", status)
        await self.health.set(SERVICE_NAME, status)

    async def stop(self, grace: float = 2.0) -> None:
        """Streams end with Unavailable (never OK), then the sockets go away."""
        self.servicer.shutdown()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await self.set_serving(False)
            await self._server.stop(grace)
            self._server = None
        if self.relay is not None:
            await self.relay.close()
            self.relay = None
        if self._private_dir:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = ""
