"""Real tessera-server and tessera-agent processes for one trust domain, and mTLS between workloads.

Imported by the federation end-to-end tests. Workloads are this test process (uid 0) watching an agent's
Workload API socket through the SDK, so the agents attest them with ``unix:uid:0``.
"""

from __future__ import annotations

import os
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from support.procs import TesseraAgent, TesseraServer, free_port, wait_for

from tessera.sdk.source import X509Source, pick_by_id
from tessera.sdk.tls import authorize_any, client_context, peer_spiffe_id, server_context

SYNC_INTERVAL = 1.0


def issuer_key_id(cert: x509.Certificate) -> str:
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    return aki.hex() if aki else ""


class Domain:
    """One trust domain: a server (with its bundle endpoint) and one agent, in a private temp directory."""

    def __init__(self, trust_domain: str, root: Path) -> None:
        self.td = trust_domain
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.federation_port = free_port()
        self.socket = str(root / "public" / "api.sock")
        self.agent_id = f"spiffe://{trust_domain}/host/agent"
        self.server = TesseraServer(
            trust_domain, data_dir=root / "server", admin_socket=str(root / "admin" / "api.sock"),
            log=root / "server.log", name=f"{trust_domain} server",
            extra=("--federation-bind-address", f"127.0.0.1:{self.federation_port}",
                   "--federation-profile", "https_spiffe", "--federation-refresh-hint", "2s"),
        )  # fmt: skip
        self.port = self.server.port
        self.admin_socket = self.server.admin_socket
        self.agent: TesseraAgent | None = None

    @property
    def address(self) -> str:
        return f"unix://{self.socket}"

    @property
    def endpoint_url(self) -> str:
        return f"https://127.0.0.1:{self.federation_port}/"

    @property
    def endpoint_id(self) -> str:
        return f"spiffe://{self.td}/tessera/server"

    def admin_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.server.admin_cmd(*args, check=check)

    def admin(self, *args: str) -> str:
        return self.server.admin(*args)

    def start(self) -> None:
        self.server.start()
        self.server.wait_healthy()
        self.server.write_bundle(self.root / "bundle.pem")
        self.agent = TesseraAgent(
            self.td, servers=self.server.address, trust_bundle=self.root / "bundle.pem",
            join_token=self.server.join_token(self.agent_id), data_dir=self.root / "agent", socket=self.socket,
            log=self.root / "agent.log", sync_interval=f"{SYNC_INTERVAL}s", name=f"{self.td} agent",
        )  # fmt: skip
        self.agent.start()
        self.agent.wait_healthy()

    def stop(self) -> None:
        if self.agent is not None:
            self.agent.stop()
        self.server.stop()

    def entry(self, path: str, *, federates_with: tuple[str, ...] = (), selector: str = "unix:uid:0") -> str:
        args = ["entry", "create", "--spiffe-id", f"spiffe://{self.td}{path}", "--parent-id", self.agent_id]
        args += ["--selector", selector]
        for td in federates_with:
            args += ["--federates-with", td]
        return self.admin(*args).splitlines()[-1].strip()

    def source(self, path: str) -> X509Source:
        """A workload's X509Source picking the SVID of ``path`` (all entries here match uid 0)."""
        sid = f"spiffe://{self.td}{path}"
        source: X509Source = wait_for(
            lambda: _try_source(self.address, sid), timeout=60, what=f"an SVID for {sid} from the {self.td} agent"
        )
        return source


def _try_source(address: str, sid: str) -> X509Source | None:
    try:
        return X509Source(address=address, picker=pick_by_id(sid), timeout=5)
    except Exception:
        return None


@contextmanager
def domains(*names: str) -> Iterator[list[Domain]]:
    base = Path(tempfile.mkdtemp(prefix="tfed-", dir="/tmp"))
    started: list[Domain] = []
    try:
        for name in names:
            d = Domain(name, base / name.split(".")[0])
            started.append(d)
            d.start()
        yield started
    finally:
        for d in started:
            d.stop()
        if os.environ.get("TESSERA_KEEP_E2E"):
            print("federation e2e logs in", base)
        else:
            shutil.rmtree(base, ignore_errors=True)


class EchoServer:
    """An mTLS echo server on the SDK's server context (answers ``ok <peer id>``)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._sock.getsockname()[1])
        self._context = context
        self.refused: list[str] = []
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(raw,), daemon=True).start()

    def _one(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            with self._context.wrap_socket(raw, server_side=True) as tls:
                data = tls.recv(100)
                tls.sendall(b"ok " + str(peer_spiffe_id(tls)).encode() + b" " + data)
        except (OSError, ssl.SSLError) as exc:
            self.refused.append(str(exc))
        finally:
            raw.close()

    def close(self) -> None:
        self._sock.close()


def call(port: int, context: ssl.SSLContext) -> str:
    """One mTLS request; raises on any failure (handshake refused, peer refused, no answer)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, context.wrap_socket(raw) as tls:
        tls.sendall(b"ping")
        answer = tls.recv(200)
    if not answer.startswith(b"ok "):
        raise ConnectionError(f"no answer from the echo server (got {answer!r})")
    return answer.decode()


def serve(source: X509Source, authorizer: Callable[..., None] | None = None) -> EchoServer:
    return EchoServer(server_context(source, authorizer or authorize_any()))


def client(source: Any, authorizer: Callable[..., None] | None = None) -> ssl.SSLContext:
    return client_context(source, authorizer or authorize_any())
