"""The node API's TCP listener: every accepted connection passes the gate, or is closed before it costs anything.

- ``asyncio.start_server`` accepts up to ``backlog`` connections per wake-up and gives each a transport, a
  protocol and a task before any code of ours sees it: under a flood, thousands of descriptors were in
  flight at once whatever the caps said (measured: 2,500 with a cap of 200).
- So the accept loop is ours: in the loop's reader callback, a bounded batch of ``accept()``, and for each
  connection the :class:`~tessera.server.limits.ConnectionGate` decides at once; a refused socket is closed in
  the same callback (no transport, no task), an admitted one is handed to ``serve`` as a task.
- A failed ``accept()`` for lack of descriptors or memory pauses accepting for a second (as asyncio does),
  logged at a bounded rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable

from tessera._daemon.ratelog import RateLimitedLog
from tessera.server.limits import ConnectionGate

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64
ACCEPT_RETRY_DELAY = 1.0
BACKLOG = 1024
_OUT_OF_RESOURCES = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

Serve = Callable[[socket.socket, str, str], Awaitable[None]]
"""``serve(sock, source, address)``: one admitted connection (non-blocking), its source IP and ``ip:port``.
It owns the socket and must release the gate's count for ``source`` when the connection stops counting."""


def _address(addr: object) -> tuple[str, str]:
    if isinstance(addr, tuple) and len(addr) >= 2:
        host = str(addr[0])
        return host, f"[{host}]:{addr[1]}" if ":" in host else f"{host}:{addr[1]}"
    return str(addr), str(addr)


class GatedListener:
    def __init__(self, gate: ConnectionGate, serve: Serve, ratelog: RateLimitedLog | None = None) -> None:
        self.gate = gate
        self._serve = serve
        self._ratelog = ratelog or RateLimitedLog(log)
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    async def start(self, host: str, port: int) -> int:
        """Binds every address ``host`` resolves to (one port for all) and starts accepting; the port."""
        loop = self._loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                self._sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(self._sockets) > 1:  # the kernel's choice for the first, for all
                    address = (address[0], self._sockets[0].getsockname()[1], *address[2:])
                sock.bind(address)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except BaseException:
            for sock in self._sockets:
                sock.close()
            self._sockets.clear()
            raise
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        return int(self._sockets[0].getsockname()[1])

    def _accept(self, listener: socket.socket) -> None:
        assert self._loop is not None
        for _ in range(ACCEPT_BATCH):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_RESOURCES:
                    self._ratelog.log(logging.ERROR, "node API: cannot accept connections: %s; retrying in 1s", exc)
                    self._loop.remove_reader(listener.fileno())
                    self._loop.call_later(ACCEPT_RETRY_DELAY, self._resume, listener)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            source, address = _address(addr)
            refused = self.gate.admit(source)
            if refused is not None:
                conn.close()  # at once: no handshake, no transport, the descriptor back now
                self._ratelog.warning("node API: closed a new connection from %s: %s", source, refused)
                continue
            conn.setblocking(False)
            task = self._loop.create_task(self._run(conn, source, address))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: socket.socket, source: str, address: str) -> None:
        try:
            await self._serve(conn, source, address)
        except asyncio.CancelledError:
            pass  # close() at shutdown
        except Exception:
            log.exception("node API connection from %s failed", address)

    def _resume(self, listener: socket.socket) -> None:
        if not self._closed and self._loop is not None and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    async def close(self) -> None:
        self._closed = True
        for sock in self._sockets:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._tasks, return_exceptions=True)


__all__ = ["GatedListener"]
