"""The node API's TLS listener: terminates TLS itself and relays each connection to an internal gRPC server.

Why not gRPC's own TLS: the node API needs client certificates *requested but optional* (an agent that has
no SVID yet must reach ``Attest``; every other call needs its agent SVID), and grpcio's server credentials
can only either require a verified client certificate or not ask for one at all (then ``auth_context()`` never
shows one). Python's ``ssl`` can do exactly what is needed (``CERT_OPTIONAL``: ask, verify when given).

How the peer reaches the servicer: for every accepted TLS connection the front opens a Unix socket *bound to
a unique path* in a private 0700 directory and connects it to the internal gRPC server's socket; the
servicer's ``context.peer()`` then reads ``unix:<that path>``, which :class:`PeerRegistry` maps to the
certificate verified during this connection's handshake. Nothing the client sends can choose that path.

Nothing unbounded before a client certificate (ARCHITECTURE.md, "The trust boundary"):

- Two internal gRPC servers: a connection whose client certificate is the current SVID of an attested agent
  (checked once, right after the handshake) goes to the one serving every node API method; any other goes to
  a small one serving only ``Attest`` and health, whose receive limit is small
  (:mod:`tessera.server.api.msglimits`). So nobody but an agent makes the server buffer more than that,
  whatever method it names. (Every call is still authorized on its own: a ban takes effect at once.)
- A connection costs one descriptor until its first byte after the handshake, three once it is relayed. Those
  not yet proven (in handshake, or anonymous) are capped in total and per source address
  (:class:`~tessera.server.limits.ConnectionGate`, applied at accept by
  :class:`~tessera.server.api.listener.GatedListener`: one more is closed at once), the handshake and the first
  request each have a timeout, and an anonymous connection lives at most :data:`UNAUTHENTICATED_LIFETIME`.
  Agents leave the count once their certificate verifies, so a flood never cuts an agent's open connection.
- Refusals are logged at a bounded rate (:mod:`tessera._daemon.ratelog`); every end closes both sides.

Rotation: one fixed front context whose ``sni_callback`` (which runs on every handshake, SNI or not) swaps
in the current context; a new server SVID or trust bundle means building a new context and swapping the
reference. A context already serving connections is never reconfigured (that crashed CPython under
concurrent handshakes), and roots can only be replaced by a new context. Both come from the SDK's one
context factory (:mod:`tessera.sdk.tlscontext`), which decides the TLS floor and keeps the key off the disk.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from tessera._daemon.ratelog import RateLimitedLog
from tessera.sdk.keys import PrivateKey
from tessera.sdk.tlscontext import build_context, switching_server_context
from tessera.server.api.listener import GatedListener
from tessera.server.limits import ConnectionGate

log = logging.getLogger(__name__)

RELAY_CHUNK = 256 * 1024
UNAUTHENTICATED_LIFETIME = 120.0
INNER_CONNECT_TIMEOUT = 5.0
SHUTDOWN_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the TLS handshake proved about a connection: the verified client leaf, or None (no certificate)."""

    leaf: x509.Certificate | None
    address: str
    refusal: str | None = None  # why the leaf is not a current agent SVID (None: it is, or there is no leaf)


class PeerRegistry:
    """Maps the internal ``unix:<path>`` peer string of a relayed connection to its TLS peer."""

    def __init__(self) -> None:
        self._peers: dict[str, PeerInfo] = {}

    def add(self, peer: str, info: PeerInfo) -> None:
        self._peers[peer] = info

    def remove(self, peer: str) -> None:
        self._peers.pop(peer, None)

    def lookup(self, peer: str) -> PeerInfo | None:
        return self._peers.get(peer)

    def __len__(self) -> int:
        return len(self._peers)


def build_server_context(
    chain: Sequence[x509.Certificate], key: PrivateKey, roots: Sequence[x509.Certificate]
) -> ssl.SSLContext:
    """A fresh, never-again-modified server context: our SVID chain, client roots, optional client certs, HTTP/2."""
    return build_context(True, chain=chain, key=key, roots=roots, verify_mode=ssl.CERT_OPTIONAL, alpn=("h2",))


AgentCheck = Callable[[x509.Certificate], Awaitable[str | None]]
"""None when a verified client leaf is the current SVID of an attested agent, else why not."""


@dataclass(frozen=True, slots=True)
class FrontLimits:
    """What one node API connection may cost before it proves anything (see the module docstring)."""

    handshake_timeout: float = 10.0
    first_request_timeout: float = 10.0
    max_unauthenticated: int = 1024  # <= 0: no cap
    max_unauthenticated_per_source: int = 64  # <= 0: no cap
    unauthenticated_lifetime: float = UNAUTHENTICATED_LIFETIME


@dataclass(frozen=True, slots=True)
class InnerServers:
    """The internal gRPC servers' sockets: ``agents`` for connections whose client certificate verified,
    ``anonymous`` (Attest and health only, small messages) for the others."""

    agents: Path
    anonymous: Path


class TlsFront:
    """Accepts TCP on ``host:port``, runs the TLS handshake itself, and relays plaintext HTTP/2 to the internal
    gRPC server the client's certificate (or the lack of one) calls for."""

    def __init__(
        self,
        inner: InnerServers,
        registry: PeerRegistry,
        context: ssl.SSLContext,
        limits: FrontLimits | None = None,
        ratelog: RateLimitedLog | None = None,
        authorize: AgentCheck | None = None,
    ) -> None:
        self._inner = inner
        self._authorize = authorize
        self._registry = registry
        self._current = context
        # The front's verify mode is the one OpenSSL applies: ask for a client certificate, never require one.
        self._front: ssl.SSLContext = switching_server_context(lambda: self._current, verify_mode=ssl.CERT_OPTIONAL)
        self.limits = limits or FrontLimits()
        self.gate = ConnectionGate(self.limits.max_unauthenticated, self.limits.max_unauthenticated_per_source)
        self._ratelog = ratelog or RateLimitedLog(log)
        self._listener = GatedListener(self.gate, self._serve, self._ratelog)
        self._client_dir = Path(tempfile.mkdtemp(prefix="tessera-relay-", dir="/tmp"))
        os.chmod(self._client_dir, 0o700)
        self._counter = itertools.count()
        self.port = 0

    def set_context(self, context: ssl.SSLContext) -> None:
        """New handshakes use ``context`` from now on (existing connections keep theirs)."""
        self._current = context

    async def start(self, host: str, port: int) -> int:
        self.port = await self._listener.start(host, port)
        return self.port

    async def close(self) -> None:
        await self._listener.close()
        with contextlib.suppress(OSError):
            for leftover in self._client_dir.iterdir():
                leftover.unlink()
            self._client_dir.rmdir()

    async def _serve(self, conn: socket.socket, source: str, address: str) -> None:
        """One connection the gate admitted (counted for ``source`` until an agent certificate verifies)."""
        loop = asyncio.get_running_loop()
        counted = True
        path = self._client_dir / str(next(self._counter))
        peer_key = f"unix:{path}"
        writer: asyncio.StreamWriter | None = None
        inner_writer: asyncio.StreamWriter | None = None
        graceful = False
        try:
            reader = asyncio.StreamReader(limit=RELAY_CHUNK)
            protocol = asyncio.StreamReaderProtocol(reader)
            # From here the transport owns the socket (and closes it, whatever happens).
            transport, _ = await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=self._front,
                ssl_handshake_timeout=self.limits.handshake_timeout,
                ssl_shutdown_timeout=SHUTDOWN_TIMEOUT,
            )
            writer = asyncio.StreamWriter(transport, protocol, reader, loop)
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            leaf = x509.load_der_x509_certificate(der) if der else None
            refusal = None
            if leaf is not None and self._authorize is not None:
                # Any SVID of the trust domain verifies; only an agent's opens the full node API.
                refusal = await asyncio.wait_for(self._authorize(leaf), INNER_CONNECT_TIMEOUT)
            agent = leaf is not None and refusal is None
            if agent:
                self.gate.release(source)
                counted = False
            first = await asyncio.wait_for(reader.read(RELAY_CHUNK), self.limits.first_request_timeout)
            if not first:
                return
            target = self._inner.agents if agent else self._inner.anonymous
            inner_reader, inner = await asyncio.wait_for(self._open_inner(path, target), INNER_CONNECT_TIMEOUT)
            inner_writer = inner
            self._registry.add(peer_key, PeerInfo(leaf=leaf, address=address, refusal=refusal))
            inner.write(first)
            relay = asyncio.gather(_pump(reader, inner), _pump(inner_reader, writer))
            if not agent:
                # Attest and health need seconds; nothing keeps an anonymous connection open longer.
                await asyncio.wait_for(relay, self.limits.unauthenticated_lifetime)
            else:
                await relay
            graceful = True
        except TimeoutError:
            log.debug("node API connection from %s timed out", address)
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.debug("node API connection from %s ended: %s", address, exc)
        finally:
            if counted:
                self.gate.release(source)
            self._registry.remove(peer_key)
            for w in (inner_writer, writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        # A relay that ended normally flushes what is left; every other end (timeout, error,
                        # shutdown) drops it, so a client that never reads cannot hold the descriptor.
                        w.close() if graceful else w.transport.abort()
            with contextlib.suppress(OSError):
                path.unlink()

    async def _open_inner(self, path: Path, target: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A connection to the internal server from a socket bound to ``path`` (the peer name gRPC reports)."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(target))
            return await asyncio.open_unix_connection(sock=sock, limit=RELAY_CHUNK)
        except BaseException:
            sock.close()
            raise


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            data = await reader.read(RELAY_CHUNK)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            else:
                writer.close()
