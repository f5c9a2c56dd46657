"""The Workload API relay's limits and failure paths, with real Unix sockets and no gRPC behind it: every way a
relayed connection can fail closes both sides and gives back its descriptors, its bound path and its place in
the per-uid count; a connection that sends nothing is closed after the first-request timeout; one over the
per-uid cap is closed at once."""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import types
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from agent_testlib import socket_dir

from tessera.agent.daemon import SETTINGS, AgentSettings
from tessera.agent.endpoint import relay as relay_module
from tessera.agent.endpoint.relay import PeerRegistry, WorkloadRelay
from tessera.sdk.config import ConfigError, load_settings


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 60))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Lets the loop run until ``predicate`` holds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


async def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, path)
    return s


async def closed_by_relay(s: socket.socket, timeout: float = 10.0) -> bool:
    """True when the relay closed its side (EOF or reset); False when it kept the connection open."""
    try:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 1024), timeout)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


@asynccontextmanager
async def relay(internal: str | None = None, **kwargs: Any) -> AsyncIterator[WorkloadRelay]:
    d = socket_dir()
    r = WorkloadRelay(f"{d}/api.sock", internal or f"{d}/no-internal.sock", f"{d}/c", PeerRegistry(), **kwargs)
    await r.start()
    try:
        yield r
    finally:
        await r.close()
        shutil.rmtree(d, ignore_errors=True)


def settled(r: WorkloadRelay) -> bool:
    """Nothing of any connection left: no pipe, no count, no registered peer, no bound path, no task."""
    return (
        not r.connections
        and r.per_caller.total == 0
        and len(r.registry) == 0
        and not os.listdir(r.client_dir)
        and not r.tasks
    )


def test_unreachable_internal_server_closes_the_caller() -> None:
    async def main() -> None:
        async with relay() as r:
            before = open_fds()
            s = await connect(r.public_path)
            await asyncio.get_running_loop().sock_sendall(s, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            assert await closed_by_relay(s)
            s.close()
            await eventually(lambda: settled(r) and open_fds() <= before)

    run(main())


def test_no_descriptor_for_the_internal_side_closes_the_caller(monkeypatch: pytest.MonkeyPatch) -> None:
    """EMFILE when the relay makes its internal socket: the caller is closed, not left paused forever."""

    def no_descriptors(*_args: Any, **_kwargs: Any) -> socket.socket:
        raise OSError(errno.EMFILE, "Too many open files")

    fake = types.SimpleNamespace(**{name: getattr(socket, name) for name in dir(socket) if not name.startswith("_")})
    fake.socket = no_descriptors

    async def main() -> None:
        async with relay() as r:
            before = open_fds()
            s = await connect(r.public_path)
            await asyncio.sleep(0.1)  # accepted (SO_PEERCRED read with the real module)
            monkeypatch.setattr(relay_module, "socket", fake)
            await asyncio.get_running_loop().sock_sendall(s, b"x")
            assert await closed_by_relay(s)
            s.close()
            await eventually(lambda: settled(r) and open_fds() <= before)
            monkeypatch.undo()

    run(main())


def test_caller_eof_while_its_reading_is_paused_is_not_missed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller sends a byte (the relay pauses its reading until the internal side is up), the internal
    connection never completes, the caller leaves: both sides are closed within the connect timeout."""

    async def main() -> None:
        loop = asyncio.get_running_loop()

        async def never(_sock: socket.socket, _address: str) -> None:
            await asyncio.Event().wait()

        async with relay(internal_connect_timeout=0.5) as r:
            before = open_fds()
            monkeypatch.setattr(loop, "sock_connect", never)  # the relay's internal connect hangs
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(r.public_path)  # blocking: completes at once on a listening Unix socket
            s.sendall(b"x")
            await eventually(lambda: any(p.connecting for p in r.connections))
            s.close()  # EOF while the relay is not reading
            await eventually(lambda: settled(r) and open_fds() <= before, timeout=5)

    run(main())


def test_a_connection_that_sends_nothing_is_closed_after_the_first_request_timeout() -> None:
    async def main() -> None:
        async with relay(first_request_timeout=0.5) as r:
            before = open_fds()
            s = await connect(r.public_path)
            started = asyncio.get_running_loop().time()
            assert await closed_by_relay(s, timeout=5)
            assert 0.4 <= asyncio.get_running_loop().time() - started < 4
            s.close()
            await eventually(lambda: settled(r) and open_fds() <= before)

    run(main())


def test_connections_past_the_per_uid_cap_are_closed_at_once() -> None:
    async def main() -> None:
        async with relay(max_connections_per_caller=3, first_request_timeout=60) as r:
            held = [await connect(r.public_path) for _ in range(3)]
            await eventually(lambda: r.per_caller.open_count(os.getuid()) == 3)
            extra = await connect(r.public_path)
            assert await closed_by_relay(extra, timeout=5)
            extra.close()
            for s in held:  # the three within the cap are still open
                assert not await closed_by_relay(s, timeout=0.2)
            held.pop().close()
            await eventually(lambda: r.per_caller.open_count(os.getuid()) == 2)
            again = await connect(r.public_path)
            assert not await closed_by_relay(again, timeout=0.3)
            for s in [*held, again]:
                s.close()
            await eventually(lambda: settled(r))

    run(main())


def test_connections_past_the_per_uid_cap_never_get_a_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    """The cap is applied at accept: a refused connection costs no protocol, no transport, no pipe (asyncio's own
    accept made all three first, which let a flood hold thousands of descriptors past the cap)."""
    made: list[object] = []

    class Counted(relay_module._PublicSide):
        def __init__(self, *args: Any) -> None:
            made.append(self)
            super().__init__(*args)

    monkeypatch.setattr(relay_module, "_PublicSide", Counted)

    async def main() -> None:
        async with relay(max_connections_per_caller=3, first_request_timeout=60) as r:
            held = [await connect(r.public_path) for _ in range(3)]
            await eventually(lambda: len(r.connections) == 3)
            extra = [await connect(r.public_path) for _ in range(20)]
            for s in extra:
                assert await closed_by_relay(s, timeout=5)
                s.close()
            assert len(made) == 3 and len(r.connections) == 3 and r.per_caller.open_count(os.getuid()) == 3
            for s in held:
                s.close()
            await eventually(lambda: settled(r))

    run(main())


def test_closing_the_relay_gives_every_count_back() -> None:
    """Connections admitted (counted) whose transport is still being made when the relay closes: closed, and
    their uid's count released once."""

    async def main() -> None:
        d = socket_dir()
        r = WorkloadRelay(f"{d}/api.sock", f"{d}/none.sock", f"{d}/c", PeerRegistry(), max_connections_per_caller=50)
        await r.start()
        try:
            before = open_fds()
            clients = [await connect(r.public_path) for _ in range(30)]
            await eventually(lambda: r.per_caller.open_count(os.getuid()) > 0)
            await r.close()
            assert r.per_caller.total == 0 and not r.connections and len(r.registry) == 0
            for s in clients:
                assert await closed_by_relay(s, timeout=5)
                s.close()
            await eventually(lambda: open_fds() <= before - 1)  # the listener is gone too
        finally:
            shutil.rmtree(d, ignore_errors=True)

    run(main())


def test_no_cap_means_no_cap() -> None:
    async def main() -> None:
        async with relay(max_connections_per_caller=0) as r:
            held = [await connect(r.public_path) for _ in range(50)]
            await eventually(lambda: len(r.connections) == 50)
            for s in held:
                s.close()
            await eventually(lambda: settled(r))

    run(main())


# ------------------------------------------------------------------------------------------- settings


def _settings(**values: object) -> AgentSettings:
    base: dict[str, object] = {"trust_domain": "example.org", "server_address": "127.0.0.1:8081"}
    base.update(values)
    return AgentSettings.from_values(load_settings("agent", SETTINGS, None, base))


def test_connection_settings_defaults_and_values() -> None:
    settings = _settings()
    assert settings.max_connections_per_caller == 512 and settings.first_request_timeout == 10.0
    settings = _settings(workload_api_max_connections_per_caller="0", workload_api_first_request_timeout="2m")
    assert settings.max_connections_per_caller == 0 and settings.first_request_timeout == 120.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"workload_api_max_connections_per_caller": "-1"}, "workload_api_max_connections_per_caller: must be 0"),
        ({"workload_api_first_request_timeout": "0"}, "workload_api_first_request_timeout: must be more than 0s"),
        ({"workload_api_first_request_timeout": "soon"}, "workload_api_first_request_timeout: expected a duration"),
    ],
)
def test_bad_connection_settings_stop_start_up(values: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(**values)
