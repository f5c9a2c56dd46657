"""A tessera-server in this process (ServerApp on its own event loop thread) for tests that want plain
synchronous gRPC clients and direct access to the app's internals."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from tessera.proto import admin_pb2 as apb
from tessera.proto import admin_pb2_grpc as agrpc
from tessera.proto import node_pb2 as npb
from tessera.sdk.config import load_settings
from tessera.server.app import ServerApp
from tessera.server.config import SETTINGS, ServerConfig, build_config

TD = "example.org"


def server_config(**values: Any) -> ServerConfig:
    """A ServerConfig from settings as the [server] table of the config file would give them."""
    return build_config(load_settings("server", SETTINGS, None, values))


def make_config(data_dir: Path, socket_path: Path, **overrides: Any) -> ServerConfig:
    """The config of a test server for TD on a free port (``overrides``: more [server] settings)."""
    values: dict[str, Any] = {
        "trust_domain": TD,
        "data_dir": str(data_dir),
        "bind_address": "127.0.0.1:0",
        "socket": str(socket_path),
        # Every test agent attests from 127.0.0.1: the per-address limit is for real fleets (tests that check
        # it pass a value).
        "attestation_rate_limit": 0,
    }
    values.update({k: v for k, v in overrides.items()})
    return server_config(**values)


def free_socket_dir() -> Path:
    """A fresh directory under /tmp for an admin socket (Unix socket paths must stay under 107 bytes)."""
    return Path(tempfile.mkdtemp(prefix="tsapi-", dir="/tmp"))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


class RunningServer:
    """A ServerApp on its own event loop thread, so tests can use plain (sync) gRPC clients."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.app = ServerApp(config)
        try:
            self._run(self._start())
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()
            raise

    async def _start(self) -> None:
        await self.app.start()
        await self.app.serve_ready()

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    @property
    def port(self) -> int:
        return self.app.node_port

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self) -> None:
        try:
            self._run(self.app.stop())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(30)
            self.loop.close()

    def admin(self) -> AdminClient:
        return AdminClient(str(self.config.socket_path))

    def bundle_pem(self) -> bytes:
        with self.admin() as admin:
            data: bytes = admin.stub.GetBundle(apb.GetBundleRequest()).data
            return data


class AdminClient:
    def __init__(self, socket_path: str) -> None:
        self.channel = grpc.insecure_channel(f"unix:{socket_path}")
        self.stub = agrpc.AdminStub(self.channel)  # type: ignore[no-untyped-call]

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.channel.close()

    def create_entry(
        self, spiffe_id: str, parent_id: str, selectors: Sequence[str] = ("unix:uid:1000",), **kw: Any
    ) -> npb.Entry:
        sels = [npb.Selector(type=s.split(":", 1)[0], value=s.split(":", 1)[1]) for s in selectors]
        entry = npb.Entry(spiffe_id=spiffe_id, parent_id=parent_id, selectors=sels, **kw)
        created: npb.Entry = self.stub.CreateEntry(apb.CreateEntryRequest(entry=entry)).entry
        return created

    def token(self, ttl: int = 0, spiffe_id: str = "") -> apb.CreateJoinTokenResponse:
        response: apb.CreateJoinTokenResponse = self.stub.CreateJoinToken(
            apb.CreateJoinTokenRequest(ttl=ttl, spiffe_id=spiffe_id)
        )
        return response
