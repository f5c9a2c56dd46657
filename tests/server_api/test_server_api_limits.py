"""The node API's limits as units: per-method receive limits on a real aio server, the gate counting connections
without a client certificate, the settings that size them, and one TLS floor (no session resumption) for every
server context Tessera builds."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from tessera.sdk.config import ConfigError, load_settings
from tessera.sdk.source import StaticX509Source
from tessera.sdk.svid import X509Svid
from tessera.sdk.testing import TestCA
from tessera.sdk.tls import authorize_any, server_context
from tessera.server.api.msglimits import METHOD_LIMITS, MessageLimitInterceptor, limit_for, server_limit
from tessera.server.api.tls_front import build_server_context
from tessera.server.config import SETTINGS, build_config
from tessera.server.federation.endpoint import svid_context
from tessera.server.limits import ConnectionGate

NODE = "/tessera.node.v1.Node/"

# ------------------------------------------------------------------------------------ per-method limits


def test_server_limit_is_the_largest_of_its_methods() -> None:
    anonymous = (NODE + "Attest", "/grpc.health.v1.Health/Check")
    assert server_limit(anonymous) == 64 * 1024
    assert server_limit(METHOD_LIMITS) == 1024 * 1024
    assert limit_for(NODE + "Sync") == 16 * 1024
    assert limit_for("/unknown.Service/Method") == 4 * 1024


def _identity(b: bytes) -> bytes:
    return b


async def _serve_limited() -> tuple[grpc.aio.Server, str, str]:
    """A server with Sync (unary), Attest (request stream, read through the context) and a health Watch
    (response stream), behind the limit interceptor and a generous server-wide limit."""

    async def sync(request: bytes, context: Any) -> bytes:
        return b"ok:%d" % len(request)

    async def attest(_requests: Any, context: Any) -> None:
        message = await context.read()
        await context.write(b"got:%d" % len(message))

    async def watch(request: bytes, context: Any) -> Any:
        yield b"watching:%d" % len(request)

    handlers = [
        grpc.method_handlers_generic_handler(
            "tessera.node.v1.Node",
            {
                "Sync": grpc.unary_unary_rpc_method_handler(sync, _identity, _identity),
                "Attest": grpc.stream_stream_rpc_method_handler(attest, _identity, _identity),
            },
        ),
        grpc.method_handlers_generic_handler(
            "grpc.health.v1.Health", {"Watch": grpc.unary_stream_rpc_method_handler(watch, _identity, _identity)}
        ),
    ]
    directory = tempfile.mkdtemp(prefix="tslim-", dir="/tmp")
    server = grpc.aio.server(
        interceptors=[MessageLimitInterceptor()], options=[("grpc.max_receive_message_length", 8 << 20)]
    )
    server.add_generic_rpc_handlers(handlers)
    server.add_insecure_port(f"unix:{directory}/s.sock")
    await server.start()
    return server, f"unix:{directory}/s.sock", directory


def test_each_method_is_held_to_its_own_limit() -> None:
    async def scenario() -> None:
        server, target, directory = await _serve_limited()
        try:
            async with grpc.aio.insecure_channel(target, options=[("grpc.max_send_message_length", -1)]) as ch:
                sync = ch.unary_unary(NODE + "Sync")
                assert await sync(b"x" * (16 * 1024), timeout=10) == b"ok:16384"
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await sync(b"x" * (16 * 1024 + 1), timeout=10)
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "16385 bytes is larger than the 16384-byte limit of /tessera.node.v1.Node/Sync" in (
                    info.value.details() or ""
                )

                attest = ch.stream_stream(NODE + "Attest")
                assert [m async for m in attest(iter([b"y" * 1000]), timeout=10)] == [b"got:1000"]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in attest(iter([b"y" * (64 * 1024 + 1)]), timeout=10):
                        pass
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

                watch = ch.unary_stream("/grpc.health.v1.Health/Watch")
                assert [m async for m in watch(b"svc", timeout=10)] == [b"watching:3"]
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in watch(b"s" * 2000, timeout=10):
                        pass
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            await server.stop(None)
            shutil.rmtree(directory, ignore_errors=True)

    asyncio.run(scenario())


# ----------------------------------------------------------------------------------------- the gate


def test_gate_caps_per_source_and_in_total() -> None:
    gate = ConnectionGate(max_total=5, max_per_source=2)
    assert gate.admit("10.0.0.1") is None and gate.admit("10.0.0.1") is None
    refused = gate.admit("10.0.0.1")
    assert refused is not None and "per-source" in refused and "10.0.0.1" in refused
    assert gate.admit("10.0.0.2") is None and gate.admit("10.0.0.2") is None
    assert gate.admit("10.0.0.3") is None
    refused = gate.admit("10.0.0.4")
    assert refused is not None and "(the cap)" in refused
    assert gate.total == 5 and len(gate) == 3
    gate.release("10.0.0.1")
    assert gate.count("10.0.0.1") == 1 and gate.admit("10.0.0.4") is None
    for source in ("10.0.0.1", "10.0.0.2", "10.0.0.2", "10.0.0.3", "10.0.0.4"):
        gate.release(source)
    assert gate.total == 0 and len(gate) == 0
    gate.release("10.0.0.9")  # never admitted: nothing to release, nothing goes negative
    assert gate.total == 0


def test_gate_without_caps_counts_but_never_refuses() -> None:
    gate = ConnectionGate(0, 0)
    for _ in range(10_000):
        assert gate.admit("192.0.2.1") is None
    assert gate.total == 10_000 and gate.count("192.0.2.1") == 10_000


# ------------------------------------------------------------------------------------------- settings


def _config(tmp_path: Path, **values: object) -> Any:
    base: dict[str, object] = {"trust_domain": "example.org", "data_dir": str(tmp_path / "d"), "socket": "/tmp/x.sock"}
    base.update(values)
    return build_config(load_settings("server", SETTINGS, None, base))


def test_connection_settings_have_safe_defaults_and_accept_durations(tmp_path: Path) -> None:
    ops = _config(tmp_path).ops
    assert ops.node_api_handshake_timeout == 10.0 and ops.node_api_first_request_timeout == 10.0
    assert ops.node_api_max_unauthenticated_connections == 1024
    assert ops.node_api_max_unauthenticated_connections_per_source == 64
    ops = _config(
        tmp_path,
        node_api_handshake_timeout="3s",
        node_api_first_request_timeout="1m",
        node_api_max_unauthenticated_connections="0",
        node_api_max_unauthenticated_connections_per_source="8",
    ).ops
    assert ops.node_api_handshake_timeout == 3.0 and ops.node_api_first_request_timeout == 60.0
    assert ops.node_api_max_unauthenticated_connections == 0
    assert ops.node_api_max_unauthenticated_connections_per_source == 8


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"node_api_handshake_timeout": "0s"}, "node_api_handshake_timeout: must be more than 0s"),
        ({"node_api_first_request_timeout": "1h"}, "node_api_first_request_timeout: must be more than 0s and at"),
        ({"node_api_max_unauthenticated_connections": "-1"}, "node_api_max_unauthenticated_connections: must be 0"),
        ({"node_api_max_unauthenticated_connections_per_source": "x"}, "expected a whole number"),
    ],
)
def test_bad_connection_settings_stop_start_up(tmp_path: Path, values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        _config(tmp_path, **values)
    assert "\n" not in str(info.value)


# ------------------------------------------------------------------------------------- session tickets


def _resumed(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, version: ssl.TLSVersion) -> bool:
    """Two connections to ``server_ctx``; whether the second resumed the first's session."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            try:
                with server_ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(1)
                    tls.sendall(b"y")
            except (OSError, ssl.SSLError):
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx.maximum_version = version
    session = None
    reused = False
    try:
        for _ in range(2):
            with client_ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), session=session) as tls:
                tls.sendall(b"x")
                tls.recv(1)
                reused = tls.session_reused
                session = tls.session
    finally:
        thread.join(10)
        listener.close()
    return reused


def _sdk(svid: X509Svid, ca: TestCA) -> ssl.SSLContext:
    return server_context(StaticX509Source(svid, ca.x509_bundle()), authorize_any())


def _node_api(svid: X509Svid, ca: TestCA) -> ssl.SSLContext:
    return build_server_context(svid.cert_chain, svid.private_key, [ca.certificate])


def _bundle_endpoint(svid: X509Svid, _ca: TestCA) -> ssl.SSLContext:
    return svid_context(svid.cert_chain, svid.private_key)


SERVER_CONTEXTS: dict[str, Callable[[X509Svid, TestCA], ssl.SSLContext]] = {
    "sdk server_context": _sdk,
    "node API": _node_api,
    "bundle endpoint": _bundle_endpoint,
}


@pytest.mark.parametrize("name", sorted(SERVER_CONTEXTS))
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_no_server_context_resumes_a_session(name: str, version: ssl.TLSVersion) -> None:
    """A resumed session skips certificate verification: a CA removed from the bundle would come back."""
    ca = TestCA("example.org")
    client_svid = ca.issue_svid("spiffe://example.org/c")
    client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    client.check_hostname = False
    client.verify_mode = ssl.CERT_NONE
    key_pem, chain_pem = client_svid.key_pem(), client_svid.chain_pem()
    with tempfile.NamedTemporaryFile() as f:
        f.write(chain_pem + key_pem)
        f.flush()
        client.load_cert_chain(f.name)
    server = SERVER_CONTEXTS[name](ca.issue_svid("spiffe://example.org/s"), ca)
    assert not _resumed(server, client, version)
