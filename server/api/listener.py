"""The node API's TCP listener: every address the bind host resolves to, behind the one accept loop.

- The accept loop (:mod:`tessera._daemon.accept`) is shared with the agent: a bounded batch of ``accept()`` per
  wake-up, each connection admitted or closed at once, so a flood never holds more than the caps allow plus
  one batch (``asyncio.start_server`` let 2,500 descriptors be in flight with a cap of 200).
- What is the server's own: binding TCP on every resolved address (one port for all; IPv6 sockets v6-only so an
  IPv4 bind of the same port does not collide), and :class:`~tessera.server.limits.ConnectionGate` deciding per
  source address, whose count ``serve`` releases (early, once an agent certificate verifies).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable

from tessera._daemon.accept import AcceptLoop, Refused
from tessera._daemon.ratelog import RateLimitedLog
from tessera.server.limits import ConnectionGate

BACKLOG = 1024

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
        self._accept = AcceptLoop[str]("node API", self._admit, self._serve_one, ratelog=ratelog)

    @property
    def sockets(self) -> list[socket.socket]:
        return self._accept.sockets

    async def start(self, host: str, port: int) -> int:
        """Binds every address ``host`` resolves to (one port for all) and starts accepting; the port."""
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        try:
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                if port == 0 and len(sockets) > 1:  # the kernel's choice for the first, for all
                    address = (address[0], sockets[0].getsockname()[1], *address[2:])
                sock.bind(address)
                sock.listen(BACKLOG)
                sock.setblocking(False)
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        self._accept.start(sockets)
        return int(sockets[0].getsockname()[1])

    def _admit(self, _conn: socket.socket, addr: object) -> str | Refused:
        source, _ = _address(addr)
        refused = self.gate.admit(source)
        return source if refused is None else Refused(source, refused)

    async def _serve_one(self, conn: socket.socket, addr: object, source: str) -> None:
        await self._serve(conn, source, _address(addr)[1])

    async def close(self) -> None:
        await self._accept.close()


__all__ = ["GatedListener"]
