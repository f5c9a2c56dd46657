"""The daemons' one accept loop (tessera._daemon.accept), with real Unix sockets: a refused connection is closed in
the reader callback and never reaches ``serve``; an admitted one reaches ``serve`` with its key; running out of
descriptors pauses accepting (logged at a bounded rate) instead of spinning; a failing ``serve`` does not stop the
loop; and ``close()`` leaves no socket open, including those admitted whose ``serve`` never ran."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import shutil
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from support.procs import short_dir

from tessera._daemon.accept import AcceptLoop, Refused
from tessera._daemon.ratelog import RateLimitedLog


def run(coro: Any) -> Any:
    return asyncio.run(asyncio.wait_for(coro, 30))


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def eventually(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def client(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)  # completes at once on a listening Unix socket, accepted or not
    s.setblocking(False)
    return s


async def closed_by_server(s: socket.socket, timeout: float = 5.0) -> bool:
    try:
        data = await asyncio.wait_for(asyncio.get_running_loop().sock_recv(s, 16), timeout)
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return data == b""


def listening(path: str, kind: type[socket.socket] = socket.socket) -> socket.socket:
    sock = kind(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen(128)
    return sock


@asynccontextmanager
async def directory() -> AsyncIterator[str]:
    d = short_dir("tacc-")
    try:
        yield str(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


class Served:
    """A ``serve`` that holds each connection until told to go, then closes it."""

    def __init__(self) -> None:
        self.keys: list[int] = []
        self.release = asyncio.Event()

    async def __call__(self, conn: socket.socket, _addr: object, key: int) -> None:
        self.keys.append(key)
        try:
            await self.release.wait()
        finally:
            conn.close()


def test_refused_connections_are_closed_at_once_and_never_served() -> None:
    async def main() -> None:
        async with directory() as d:
            seen: list[socket.socket] = []  # held here, so only an explicit close() closes them

            def admit(conn: socket.socket, _addr: object) -> int | Refused:
                seen.append(conn)
                n = len(seen) - 1
                return Refused(f"client {n}", "odd ones are refused") if n % 2 else n

            served = Served()
            loop = AcceptLoop[int]("test API", admit, served)
            before = open_fds()
            loop.start([listening(f"{d}/s")])
            clients = [client(f"{d}/s") for _ in range(10)]
            await eventually(lambda: len(seen) == 10 and len(served.keys) == 5)
            assert served.keys == [0, 2, 4, 6, 8]
            for i, s in enumerate(clients):
                assert await closed_by_server(s, timeout=5 if i % 2 else 0.1) == bool(i % 2), i
            assert [conn.fileno() == -1 for conn in seen] == [bool(i % 2) for i in range(10)]
            assert loop.tasks == 5
            served.release.set()
            await eventually(lambda: loop.tasks == 0)
            for s in clients:
                s.close()
            await loop.close()
            assert open_fds() <= before  # the listener too

    run(main())


def test_refusals_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with directory() as d:
            ratelog = RateLimitedLog(logging.getLogger("test.accept"), burst=3, interval=60)
            loop = AcceptLoop[int](
                "test API", lambda _c, _a: Refused("someone", "over the cap"), Served(), ratelog=ratelog
            )
            loop.start([listening(f"{d}/s")])
            clients = [client(f"{d}/s") for _ in range(20)]
            for s in clients:
                assert await closed_by_server(s)
                s.close()
            await loop.close()

    with caplog.at_level(logging.WARNING, logger="test.accept"):
        run(main())
    lines = [r.getMessage() for r in caplog.records if r.name == "test.accept"]
    assert lines == ["test API: closed a new connection from someone: over the cap"] * 3


class _Exhausted(socket.socket):
    """A listening socket whose ``accept()`` fails like a process at its descriptor limit, ``failures`` times."""

    failures = 0
    calls = 0

    def accept(self) -> tuple[socket.socket, Any]:
        type(self).calls += 1
        if type(self).failures > 0:
            type(self).failures -= 1
            raise OSError(errno.EMFILE, "Too many open files")
        return super().accept()


def test_out_of_descriptors_pauses_accepting_then_resumes(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with directory() as d:
            served = Served()
            served.release.set()
            loop = AcceptLoop[int]("test API", lambda _c, _a: 7, served, retry_delay=0.3)
            _Exhausted.failures, _Exhausted.calls = 1, 0
            loop.start([listening(f"{d}/s", _Exhausted)])
            s = client(f"{d}/s")
            started = asyncio.get_running_loop().time()
            await eventually(lambda: served.keys == [7])
            waited = asyncio.get_running_loop().time() - started
            assert 0.25 <= waited < 3, waited  # paused for the retry delay, then the pending connection
            assert _Exhausted.calls <= 3  # one failure, then the accept that worked (and the one that found none)
            assert await closed_by_server(s)
            s.close()
            await loop.close()

    with caplog.at_level(logging.ERROR, logger="tessera._daemon.accept"):
        run(main())
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
        "test API: cannot accept connections: [Errno 24] Too many open files; retrying in 1s"
    ]


def test_a_failing_serve_is_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        async with directory() as d:
            keys: list[int] = []

            async def serve(conn: socket.socket, _addr: object, key: int) -> None:
                keys.append(key)
                conn.close()
                raise RuntimeError("a bug in serve")

            counter = iter(range(100))
            loop = AcceptLoop[int]("test API", lambda _c, _a: next(counter), serve)
            loop.start([listening(f"{d}/s")])
            clients = [client(f"{d}/s") for _ in range(3)]
            await eventually(lambda: keys == [0, 1, 2] and loop.tasks == 0)
            for s in clients:
                assert await closed_by_server(s)
                s.close()
            await loop.close()

    with caplog.at_level(logging.ERROR, logger="tessera._daemon.accept"):
        run(main())
    failures = [r for r in caplog.records if r.getMessage() == "test API: a connection failed"]
    assert len(failures) == 3 and all(r.exc_info for r in failures)


def test_close_cancels_serving_and_closes_what_serve_never_took() -> None:
    """The loop closes while a connection is admitted but its ``serve`` has not run yet: that socket is closed by
    the loop; one being served is cancelled (and its ``serve`` closes it); the listener is closed."""

    async def main() -> None:
        async with directory() as d:
            served = Served()
            closing: list[asyncio.Task[None]] = []
            holder: list[AcceptLoop[int]] = []
            accepted: list[socket.socket] = []  # held here, so only an explicit close() closes them

            def admit(conn: socket.socket, _addr: object) -> int:
                accepted.append(conn)
                if len(served.keys) == 1 and not closing:
                    # Runs before the task of this connection takes its first step: serve never starts.
                    closing.append(asyncio.get_running_loop().create_task(holder[0].close()))
                return len(served.keys)

            loop = AcceptLoop[int]("test API", admit, served)
            holder.append(loop)
            before = open_fds()
            loop.start([listening(f"{d}/s")])
            first = client(f"{d}/s")
            await eventually(lambda: served.keys == [0])
            second = client(f"{d}/s")
            await eventually(lambda: bool(closing) and closing[0].done())
            assert served.keys == [0]  # serve never ran for the second
            assert await closed_by_server(first) and await closed_by_server(second)
            assert loop.sockets == [] and loop.tasks == 0
            assert [conn.fileno() for conn in accepted] == [-1, -1]
            for s in (first, second):
                s.close()
            assert open_fds() <= before
            late = listening(f"{d}/t")
            with pytest.raises(RuntimeError, match="closed"):
                loop.start([late])
            late.close()

    run(main())
