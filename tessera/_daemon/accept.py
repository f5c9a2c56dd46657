"""One accept loop for both daemons: a new connection is admitted or closed before it costs more than a descriptor.

- asyncio's ``start_server`` / ``create_unix_server`` accept up to ``backlog`` connections per wake-up and give
  each a transport and a protocol (and, for streams, a task) before any of our code sees it, so a cap applied in
  ``connection_made`` comes too late: under a flood thousands of descriptors were in flight whatever the caps
  said (measured: the server's node API at 2,500 with a cap of 200; the agent at 6,015 under 6,000 connections
  from one uid whose cap was 512).
- So the accept loop is ours: in the event loop's reader callback, a bounded batch of ``accept()``; for each
  connection ``admit(conn, addr)`` decides at once, either counting it under a key (the server: the source
  address; the agent: the caller's uid) or naming a reason to refuse it. A refused socket is closed in the same
  callback (no transport, no task, no protocol), so a flood holds at most what the caps allow plus one batch.
- A failed ``accept()`` for lack of descriptors or memory pauses that listener for a second (as asyncio does,
  but without a traceback per failure); refusals and failures are logged at a bounded rate
  (:mod:`tessera._daemon.ratelog`).

Ownership: the loop owns the listening sockets it is given (it closes them). An admitted connection, with the
count ``admit`` took for it, belongs to ``serve(conn, addr, key)``, which must close it and release the count
exactly once; only when the loop is closed before ``serve`` ever ran does the loop close that socket itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from tessera._daemon.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

ACCEPT_BATCH = 64
"""``accept()`` calls per wake-up: the most connections in flight beyond what the caps admit."""
ACCEPT_RETRY_DELAY = 1.0
OUT_OF_RESOURCES = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})

K = TypeVar("K")


@dataclass(frozen=True, slots=True)
class Refused:
    """``admit``'s answer for a connection that must be closed at once: who it came from and why (logged)."""

    peer: str
    reason: str


Admit = Callable[[socket.socket, Any], K | Refused]
"""``admit(conn, addr)``: the key the new connection is now counted under, or :class:`Refused` (nothing counted).
Runs in the event loop's reader callback: it must be quick and must not block."""

Serve = Callable[[socket.socket, Any, K], Awaitable[None]]
"""``serve(conn, addr, key)``: one admitted, non-blocking connection. It owns the socket and the count under
``key`` from its first step on: it closes the one and releases the other exactly once, whatever happens."""


class AcceptLoop(Generic[K]):
    """Accepts on already bound, listening sockets; ``name`` ("node API", "Workload API") starts its log lines."""

    def __init__(
        self,
        name: str,
        admit: Admit[K],
        serve: Serve[K],
        *,
        ratelog: RateLimitedLog | None = None,
        batch: int = ACCEPT_BATCH,
        retry_delay: float = ACCEPT_RETRY_DELAY,
    ) -> None:
        self.name = name
        self._admit = admit
        self._serve = serve
        self._ratelog = ratelog or RateLimitedLog(log)
        self._batch = max(1, batch)
        self._retry_delay = retry_delay
        self._sockets: list[socket.socket] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._unstarted: dict[asyncio.Task[None], socket.socket] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False

    @property
    def sockets(self) -> list[socket.socket]:
        return list(self._sockets)

    @property
    def tasks(self) -> int:
        """Connections being served right now (``serve`` has not returned)."""
        return len(self._tasks)

    def start(self, sockets: Sequence[socket.socket]) -> None:
        """Starts accepting on ``sockets`` (bound and listening), which the loop owns from now on. Call it from
        the running event loop."""
        if self._closed:
            raise RuntimeError(f"{self.name}: the accept loop is closed")
        loop = self._loop = asyncio.get_running_loop()
        for sock in sockets:
            sock.setblocking(False)
            self._sockets.append(sock)
            loop.add_reader(sock.fileno(), self._accept, sock)

    def _accept(self, listener: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        for _ in range(self._batch):
            try:
                conn, addr = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in OUT_OF_RESOURCES:
                    self._ratelog.log(
                        logging.ERROR,
                        "%s: cannot accept connections: %s; retrying in 1s",
                        self.name,
                        exc,
                        key=(self.name, "accept failed"),
                    )
                    loop.remove_reader(listener.fileno())
                    loop.call_later(self._retry_delay, self._resume, listener)
                    return
                continue  # ECONNABORTED and the like: that client is gone
            try:
                decision = self._admit(conn, addr)
            except BaseException:
                conn.close()
                raise
            if isinstance(decision, Refused):
                conn.close()  # at once: no transport, no task, the descriptor back now
                self._ratelog.warning(
                    "%s: closed a new connection from %s: %s",
                    self.name,
                    decision.peer,
                    decision.reason,
                    key=(self.name, "refused"),
                )
                continue
            conn.setblocking(False)
            task = loop.create_task(self._run(conn, addr, decision))
            self._tasks.add(task)
            self._unstarted[task] = conn
            task.add_done_callback(self._done)

    async def _run(self, conn: socket.socket, addr: Any, key: K) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._unstarted.pop(task, None)  # serve owns the socket from here
        try:
            await self._serve(conn, addr, key)
        except asyncio.CancelledError:
            pass  # close() at shutdown
        except Exception:
            self._ratelog.log(
                logging.ERROR, "%s: a connection failed", self.name, key=(self.name, "serve failed"), exc_info=True
            )

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        conn = self._unstarted.pop(task, None)
        if conn is not None:  # cancelled before serve ever ran: nobody else will close it
            conn.close()

    def _resume(self, listener: socket.socket) -> None:
        if not self._closed and self._loop is not None and listener.fileno() >= 0:
            self._loop.add_reader(listener.fileno(), self._accept, listener)

    def stop_accepting(self) -> None:
        """Closes the listening sockets (no new connection from now on); connections being served go on."""
        self._closed = True
        for sock in self._sockets:
            if self._loop is not None and sock.fileno() >= 0:
                self._loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets.clear()

    async def close(self) -> None:
        """Stops accepting, cancels every ``serve`` still running and waits for them."""
        self.stop_accepting()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            with contextlib.suppress(Exception):
                await asyncio.gather(*tasks, return_exceptions=True)


__all__ = ["ACCEPT_BATCH", "ACCEPT_RETRY_DELAY", "OUT_OF_RESOURCES", "AcceptLoop", "Admit", "Refused", "Serve"]
