"""The public Workload API socket: learns each caller from the kernel, then relays bytes to gRPC.

grpcio does not expose a Unix socket peer's credentials, so the agent owns the public socket itself. For
every accepted connection it reads SO_PEERCRED and captures the facts about the process that connected
(start time, executable, cgroup: :func:`~tessera.agent.attestors.process.process_for`), then connects to the
internal gRPC server from a socket *bound to a fresh path* inside a private 0700 directory. The internal
server's ``context.peer()`` reads ``unix:<that path>``, which :class:`PeerRegistry` maps back to the
recorded caller. Nothing the client sends takes part in identifying it.

The internal connection is opened on the first byte from the client, so idle connections cost only a file
descriptor and never a gRPC transport.

Local users may flood the socket (measured before these limits: 9,000 connections from ``nobody`` pinned the
agent at its descriptor limit, ~3,500 descriptors stayed leaked after the attacker left, the log grew 125 MB a
minute). So:

- Each caller uid may hold a bounded number of connections, decided at accept by the daemons' one accept loop
  (:mod:`tessera._daemon.accept`): the uid is read from SO_PEERCRED in the loop's reader callback and one more
  connection is closed there and then, before asyncio makes a transport for it. With asyncio's own
  ``create_unix_server`` the cap came after the transport: 6,000 connections from ``nobody`` took the agent to
  6,015 descriptors before it settled to the cap; now they stay within the cap plus one accept batch.
- A connection that sends nothing within the first-request timeout is closed; every failure path closes both
  sides (the internal connection attempt has a timeout, so a paused caller is never left waiting) and gives
  the uid's count back exactly once; refusals are logged at a bounded rate.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import itertools
import logging
import os
import socket
import struct

from tessera._daemon.accept import AcceptLoop, Refused
from tessera._daemon.errors import SocketClaimError
from tessera._daemon.ratelog import RateLimitedLog
from tessera._daemon.sockets import PUBLIC_DIR_MODE, PUBLIC_SOCKET_MODE, ClaimedSocket, claim_socket
from tessera.agent.attestors.process import PeerCredentials, ProcessInfo, process_for
from tessera.agent.endpoint.holders import ConnectionGuard
from tessera.agent.errors import AgentError, WorkloadAttestationError
from tessera.agent.limits import (
    DEFAULT_FIRST_REQUEST_TIMEOUT,
    DEFAULT_MAX_CONNECTIONS_PER_CALLER,
    ConcurrencyLimiter,
    StreamLimitExceeded,
)

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")
_BACKLOG = 4096
SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux 6.5+; Python names it from 3.13
INTERNAL_CONNECT_TIMEOUT = 5.0
CLOSE_GRACE = 5.0


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def peer_pidfd(sock: socket.socket) -> int | None:
    """A pidfd for the very process that connected (None where the kernel has no SO_PEERPIDFD)."""
    try:
        return int(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError:
        return None


def capture_caller(sock: socket.socket, proc_root: str = "/proc") -> ProcessInfo:
    """The facts about the process at the other end of an accepted connection, kept with the connection."""
    creds = peer_credentials(sock)
    pidfd = peer_pidfd(sock)
    try:
        return process_for(creds, proc_root, pidfd=pidfd, socket_inode=os.fstat(sock.fileno()).st_ino)
    finally:
        if pidfd is not None:
            os.close(pidfd)


class PeerRegistry:
    """Maps the relay's bound client paths (as gRPC reports them) to the callers they carry."""

    def __init__(self) -> None:
        self._peers: dict[str, ProcessInfo] = {}

    def register(self, path: str, process: ProcessInfo) -> None:
        self._peers["unix:" + path] = process

    def unregister(self, path: str) -> None:
        self._peers.pop("unix:" + path, None)

    def lookup(self, peer: str) -> ProcessInfo | None:
        return self._peers.get(peer)

    def __len__(self) -> int:
        return len(self._peers)


class _Pipe:
    """One relayed connection: the caller's transport and, once opened, the internal one."""

    def __init__(self, relay: WorkloadRelay, caller_uid: int) -> None:
        self.relay = relay
        self.public: asyncio.Transport | None = None
        self.internal: asyncio.Transport | None = None
        self.process: ProcessInfo | None = None
        self.pending: list[bytes] = []
        self.connecting = False
        self.bound_path = ""
        self.closed = False
        self.caller_uid: int | None = caller_uid  # counted against the per-uid cap (at accept) while set
        self.idle_timer: asyncio.TimerHandle | None = None

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.cancel_idle_timer()
        if self.public is not None:
            self.public.close()  # flushes what the caller has not read yet, but not for longer than this:
            asyncio.get_running_loop().call_later(CLOSE_GRACE, self.public.abort)
        if self.internal is not None:
            self.internal.close()
        if self.bound_path:
            self.relay.registry.unregister(self.bound_path)
        if self.process is not None and self.relay.guard is not None:
            self.relay.guard.closed(self.process)
        if self.caller_uid is not None:
            self.relay.per_caller.release(self.caller_uid)
            self.caller_uid = None
        self.relay.connections.discard(self)

    def cancel_idle_timer(self) -> None:
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None

    def idle_timeout(self) -> None:
        """The caller sent nothing within the first-request timeout: its connection is closed."""
        self.idle_timer = None
        if not self.closed and not self.connecting:
            if self.public is not None:
                self.public.abort()  # nothing to flush; the descriptor back at once
            self.close()


class _Side(asyncio.Protocol, abc.ABC):
    """What both ends of a pipe do alike: an EOF or a loss on either end closes the whole pipe (both sides, the
    bound path, the uid's count), and an end that cannot keep up pauses reading from the other one."""

    pipe: _Pipe

    @abc.abstractmethod
    def other_end(self) -> asyncio.Transport | None:
        """The transport at the pipe's other end, once there is one."""

    def eof_received(self) -> bool | None:
        self.pipe.close()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.pipe.close()

    def pause_writing(self) -> None:
        other = self.other_end()
        if other is not None:
            other.pause_reading()

    def resume_writing(self) -> None:
        other = self.other_end()
        if other is not None and not self.pipe.closed:
            other.resume_reading()


class _PublicSide(_Side):
    def __init__(self, relay: WorkloadRelay, caller_uid: int) -> None:
        self.pipe = _Pipe(relay, caller_uid)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        pipe = self.pipe
        if pipe.closed:  # the relay closed while the transport was being made
            transport.abort()
            return
        pipe.public = transport
        pipe.relay.connections.add(pipe)
        sock = transport.get_extra_info("socket")
        if pipe.relay.first_request_timeout > 0:
            pipe.idle_timer = asyncio.get_running_loop().call_later(pipe.relay.first_request_timeout, pipe.idle_timeout)
        try:
            pipe.process = capture_caller(sock, pipe.relay.proc_root)
        except (OSError, WorkloadAttestationError) as exc:
            # The caller vanished (or exec'd) before we could look at it; nothing to serve.
            pipe.relay.ratelog.info("dropping connection: %s", exc)
            pipe.close()
            return
        if pipe.relay.guard is not None:
            pipe.relay.guard.accepted(pipe.process)

    def data_received(self, data: bytes) -> None:
        pipe = self.pipe
        if pipe.internal is not None:
            pipe.internal.write(data)
            return
        pipe.pending.append(data)
        if pipe.public is not None:
            pipe.public.pause_reading()  # hold the rest in the kernel until the internal side is up
        if not pipe.connecting and not pipe.closed:
            pipe.cancel_idle_timer()
            pipe.connecting = True
            task = asyncio.get_running_loop().create_task(pipe.relay.open_internal(pipe))
            pipe.relay.tasks.add(task)
            task.add_done_callback(pipe.relay.tasks.discard)

    def other_end(self) -> asyncio.Transport | None:
        return self.pipe.internal


class _InternalSide(_Side):
    def __init__(self, pipe: _Pipe) -> None:
        self.pipe = pipe

    def data_received(self, data: bytes) -> None:
        if self.pipe.public is not None:
            self.pipe.public.write(data)

    def other_end(self) -> asyncio.Transport | None:
        return self.pipe.public


class WorkloadRelay:
    def __init__(
        self,
        public_path: str,
        internal_path: str,
        client_dir: str,
        registry: PeerRegistry,
        *,
        proc_root: str = "/proc",
        socket_mode: int = PUBLIC_SOCKET_MODE,
        guard: ConnectionGuard | None = None,
        max_connections_per_caller: int = DEFAULT_MAX_CONNECTIONS_PER_CALLER,
        first_request_timeout: float = DEFAULT_FIRST_REQUEST_TIMEOUT,
        internal_connect_timeout: float = INTERNAL_CONNECT_TIMEOUT,
    ) -> None:
        self.public_path = public_path
        self.internal_path = internal_path
        self.client_dir = client_dir
        self.registry = registry
        self.proc_root = proc_root
        self.socket_mode = socket_mode
        self.guard = guard
        self.per_caller = ConcurrencyLimiter(max_connections_per_caller, "Workload API connections open")
        self.first_request_timeout = first_request_timeout
        self.internal_connect_timeout = internal_connect_timeout
        self.ratelog = RateLimitedLog(log)
        self.connections: set[_Pipe] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self._accept: AcceptLoop[int] | None = None
        self._claim: ClaimedSocket | None = None
        self._ids = itertools.count(1)

    async def start(self) -> None:
        """Claims the public socket (see tessera._daemon.sockets: checked directories, final mode at bind time)
        and starts accepting. Raises AgentError with the one line the operator sees."""
        os.mkdir(self.client_dir, 0o700)  # inside the endpoint's fresh private directory
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

        def bind(path: str) -> None:
            sock.bind(path)
            sock.listen(_BACKLOG)

        try:
            # Every local user may call the Workload API; who they are is decided per connection.
            self._claim = claim_socket(self.public_path, bind, dir_mode=PUBLIC_DIR_MODE, socket_mode=self.socket_mode)
            sock.setblocking(False)
            accept = AcceptLoop[int]("Workload API", self.admit, self._serve, ratelog=self.ratelog)
            accept.start([sock])  # the loop owns the socket from here
            self._accept = accept
        except BaseException as exc:
            sock.close()
            if self._claim is not None:
                self._claim.release()
                self._claim = None
            if isinstance(exc, SocketClaimError):
                raise AgentError(str(exc)) from None
            raise

    def admit(self, conn: socket.socket, _addr: object) -> int | Refused:
        """At accept, before any transport: counts a new connection against its caller uid's cap and returns the
        uid, or counts nothing and says why the accept loop must close it at once (over the cap, or gone)."""
        try:
            uid = peer_credentials(conn).uid
        except OSError as exc:
            return Refused("a caller", f"cannot read its credentials: {exc}")
        try:
            self.per_caller.acquire(uid)
        except StreamLimitExceeded as exc:
            return Refused(f"uid {uid}", str(exc))
        return uid

    async def _serve(self, conn: socket.socket, _addr: object, uid: int) -> None:
        """An admitted connection, counted for ``uid``: its transport and :class:`_PublicSide` from here on (the
        pipe releases the count when it closes)."""
        side = _PublicSide(self, uid)
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: side, sock=conn)
        except BaseException:
            conn.close()
            side.pipe.close()  # releases the uid's count, once
            raise

    async def open_internal(self, pipe: _Pipe) -> None:
        if pipe.process is None or pipe.closed:
            pipe.close()
            return
        loop = asyncio.get_running_loop()
        path = os.path.join(self.client_dir, f"c{next(self._ids)}")
        sock: socket.socket | None = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # EMFILE here too must close the caller
            sock.bind(path)
            sock.setblocking(False)
            pipe.bound_path = path
            self.registry.register(path, pipe.process)
            # Bounded: the caller's reading is paused meanwhile, which would hide its EOF for as long as it lasts.
            await asyncio.wait_for(loop.sock_connect(sock, self.internal_path), self.internal_connect_timeout)
            # The peer address stays recorded in the connected socket; the name is no longer needed.
            os.unlink(path)
            transport, _ = await loop.create_unix_connection(lambda: _InternalSide(pipe), sock=sock)
        except (OSError, TimeoutError) as exc:
            self.ratelog.warning("cannot reach the internal Workload API server: %s", str(exc) or "timed out")
            if sock is not None:
                sock.close()
            with contextlib.suppress(OSError):
                os.unlink(path)
            pipe.close()
            return
        except BaseException:
            if sock is not None:
                sock.close()
            pipe.close()
            raise
        if pipe.closed:
            transport.close()
            return
        pipe.internal = transport
        for chunk in pipe.pending:
            transport.write(chunk)
        pipe.pending.clear()
        if pipe.public is not None:
            pipe.public.resume_reading()

    async def close(self) -> None:
        if self._accept is not None:
            self._accept.stop_accepting()
        if self._claim is not None:
            self._claim.release()  # only if the name still holds our socket
            self._claim = None
        for pipe in list(self.connections):
            pipe.close()
        for task in list(self.tasks):
            task.cancel()
        if self._accept is not None:
            await self._accept.close()  # connections admitted whose transport is not made yet
            self._accept = None
