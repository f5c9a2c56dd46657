"""Real tessera-server and tessera-agent processes for one trust domain, and mTLS between workloads.

Imported by the federation end-to-end tests. Workloads are this test process (uid 0) watching an agent's
Workload API socket through the SDK, so the agents attest them with ``unix:uid:0``.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509

from tessera.sdk.source import X509Source, pick_by_id
from tessera.sdk.tls import authorize_any, client_context, peer_spiffe_id, server_context

PY = sys.executable
SYNC_INTERVAL = 1.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def issuer_key_id(cert: x509.Certificate) -> str:
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value.key_identifier
    return aki.hex() if aki else ""


class Daemon:
    def __init__(self, argv: list[str], log: Path) -> None:
        self.argv, self.log = argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, cwd="/tmp")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Domain:
    """One trust domain: a server (with its bundle endpoint) and one agent, in a private temp directory."""

    def __init__(self, trust_domain: str, root: Path) -> None:
        self.td = trust_domain
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.federation_port = free_port()
        self.admin_socket = str(root / "admin" / "api.sock")
        self.socket = str(root / "public" / "api.sock")
        self.agent_id = f"spiffe://{trust_domain}/host/agent"
        self.server = Daemon(
            [
                PY, "-m", "tessera.server", "run", "--trust-domain", trust_domain,
                "--data-dir", str(root / "server"), "--bind-address", f"127.0.0.1:{self.port}",
                "--socket", self.admin_socket, "--federation-bind-address", f"127.0.0.1:{self.federation_port}",
                "--federation-profile", "https_spiffe", "--federation-refresh-hint", "2s",
            ],
            root / "server.log",
        )  # fmt: skip
        self.agent = Daemon(
            [
                PY, "-m", "tessera.agent", "run", "--trust-domain", trust_domain,
                "--server-address", f"127.0.0.1:{self.port}", "--trust-bundle", str(root / "bundle.pem"),
                "--data-dir", str(root / "agent"), "--socket", self.socket,
                "--sync-interval", f"{SYNC_INTERVAL}s", "--sync-max-backoff", "2s",
            ],
            root / "agent.log",
        )  # fmt: skip

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
        out = subprocess.run(
            [PY, "-m", "tessera.server", *args, "--socket", self.admin_socket],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"tessera-server {' '.join(args)} failed: {out.stderr}\n{self.server.output()[-3000:]}"
            )
        return out

    def admin(self, *args: str) -> str:
        return self.admin_cmd(*args).stdout.strip()

    def start(self) -> None:
        self.server.start()

        def server_healthy() -> bool:
            if not self.server.alive():
                raise AssertionError(f"{self.td} server exited:\n" + self.server.output())
            r = subprocess.run(
                [PY, "-m", "tessera.server", "healthcheck", "--socket", self.admin_socket],
                capture_output=True,
                timeout=30,
            )
            return r.returncode == 0

        wait_for(server_healthy, what=f"{self.td} server healthy")
        (self.root / "bundle.pem").write_text(self.admin("bundle", "show") + "\n")
        token = self.admin("token", "generate", "--spiffe-id", self.agent_id).splitlines()[-1].strip()
        self.agent.argv += ["--join-token", token]
        self.agent.start()

        def agent_healthy() -> bool:
            if not self.agent.alive():
                raise AssertionError(f"{self.td} agent exited:\n" + self.agent.output())
            r = subprocess.run(
                [PY, "-m", "tessera.agent", "healthcheck", "--socket", self.socket], capture_output=True, timeout=30
            )
            return r.returncode == 0

        wait_for(agent_healthy, what=f"{self.td} agent healthy")

    def stop(self) -> None:
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
