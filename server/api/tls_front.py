"""The node API's TLS listener: terminates TLS itself and relays each connection to an internal gRPC server.

Why not gRPC's own TLS: the node API needs client certificates *requested but optional* (an agent that has
no SVID yet must reach ``Attest``; every other call needs its agent SVID), and grpcio's server credentials
can only either require a verified client certificate or not ask for one at all (then ``auth_context()`` never
shows one). Python's ``ssl`` can do exactly what is needed (``CERT_OPTIONAL``: ask, verify when given).

How the peer reaches the servicer: for every accepted TLS connection the front opens a Unix socket *bound to
a unique path* in a private 0700 directory and connects it to the internal gRPC server's socket; the
servicer's ``context.peer()`` then reads ``unix:<that path>``, which :class:`PeerRegistry` maps to the
certificate verified during this connection's handshake. Nothing the client sends can choose that path.

Rotation: one fixed front context whose ``sni_callback`` (which runs on every handshake, SNI or not) swaps
in the current context; a new server SVID or trust bundle means building a new context and swapping the
reference. A context already serving connections is never reconfigured (that crashed CPython under
concurrent handshakes), and roots can only be replaced by a new context.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from tessera.sdk.keys import PrivateKey

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 15.0
RELAY_CHUNK = 256 * 1024


@dataclass(frozen=True, slots=True)
class PeerInfo:
    """What the TLS handshake proved about a connection: the verified client leaf, or None (no certificate)."""

    leaf: x509.Certificate | None
    address: str


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


def _pem_chain(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def build_server_context(
    chain: Sequence[x509.Certificate], key: PrivateKey, roots: Sequence[x509.Certificate]
) -> ssl.SSLContext:
    """A fresh, never-again-modified server context: our SVID chain, client roots, optional client certs."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    # load_cert_chain only takes paths: an anonymous memory file keeps the key off the disk.
    fd = os.memfd_create("tessera-server-svid", os.MFD_CLOEXEC)
    try:
        os.write(fd, _pem_chain(chain) + key_pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    if roots:
        ctx.load_verify_locations(cadata=_pem_chain(roots).decode())
    ctx.set_alpn_protocols(["h2"])
    return ctx


class TlsFront:
    """Accepts TLS on ``host:port`` and relays plaintext HTTP/2 to the gRPC server at ``inner_socket``."""

    def __init__(self, inner_socket: Path, registry: PeerRegistry, context: ssl.SSLContext) -> None:
        self._inner = str(inner_socket)
        self._registry = registry
        self._current = context
        self._front = context  # replaced in start() by a dedicated front context
        self._server: asyncio.Server | None = None
        self._client_dir = Path(tempfile.mkdtemp(prefix="tessera-relay-", dir="/tmp"))
        os.chmod(self._client_dir, 0o700)
        self._counter = itertools.count()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    def set_context(self, context: ssl.SSLContext) -> None:
        """New handshakes use ``context`` from now on (existing connections keep theirs)."""
        self._current = context

    def _sni(self, sslobj: ssl.SSLObject | ssl.SSLSocket, _name: str | None, _ctx: ssl.SSLContext) -> None:
        sslobj.context = self._current

    async def start(self, host: str, port: int, front: ssl.SSLContext) -> int:
        front.sni_callback = self._sni
        self._front = front
        self._server = await asyncio.start_server(
            self._handle, host, port, ssl=front, ssl_handshake_timeout=HANDSHAKE_TIMEOUT, limit=RELAY_CHUNK
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)
        with contextlib.suppress(OSError):
            for leftover in self._client_dir.iterdir():
                leftover.unlink()
            self._client_dir.rmdir()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        path = self._client_dir / str(next(self._counter))
        peer_key = f"unix:{path}"
        inner_writer: asyncio.StreamWriter | None = None
        try:
            sslobj = writer.get_extra_info("ssl_object")
            der = sslobj.getpeercert(binary_form=True) if sslobj is not None else None
            leaf = x509.load_der_x509_certificate(der) if der else None
            peername = writer.get_extra_info("peername")
            address = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(str(path))
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, self._inner)
            except OSError:
                sock.close()
                raise
            self._registry.add(peer_key, PeerInfo(leaf=leaf, address=address))
            inner_reader, inner_writer = await asyncio.open_unix_connection(sock=sock, limit=RELAY_CHUNK)
            await asyncio.gather(_pump(reader, inner_writer), _pump(inner_reader, writer))
        except (OSError, ssl.SSLError, ValueError) as exc:
            log.debug("node API connection ended: %s", exc)
        except asyncio.CancelledError:
            # close() cancels open connections at shutdown; ending quietly here keeps asyncio's stream
            # callback (which reads the task's exception) from logging a spurious traceback.
            pass
        finally:
            self._registry.remove(peer_key)
            for w in (inner_writer, writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        w.close()
            with contextlib.suppress(OSError):
                path.unlink()
            if task is not None:
                self._tasks.discard(task)


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
