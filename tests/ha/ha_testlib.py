"""Daemons for the high-availability tests: several tessera-server processes on one PostgreSQL database, and
agents pointed at all of them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509

from tessera.proto import workload_pb2 as wpb
from tessera.sdk.bundle import X509Bundle
from tessera.sdk.errors import TesseraError
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.svid import parse_der_certificates
from tessera.sdk.verify import verify_x509_svid
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

PY = sys.executable
TD = "example.org"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def short_dir(prefix: str) -> Path:
    d = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    os.chmod(d, 0o755)
    return Path(d)


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what} (last: {last!r})")


class Daemon:
    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name, self.argv, self.log = name, argv, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, cwd="/tmp")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no goodbye to the database (a crashed or partitioned server)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(20)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class Server(Daemon):
    def __init__(self, name: str, root: Path, datastore: str, *extra: str) -> None:
        self.port = free_port()
        self.admin = str(root / name / "admin.sock")
        super().__init__(
            name,
            [
                PY, "-m", "tessera.server", "run", "--trust-domain", TD, "--data-dir", str(root / name / "data"),
                "--bind-address", f"127.0.0.1:{self.port}", "--socket", self.admin, "--datastore", datastore,
                *extra,
            ],
            root / f"{name}.log",
        )  # fmt: skip

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def admin_cmd(self, *args: str) -> str:
        out = subprocess.run(
            [PY, "-m", "tessera.server", *args, "--socket", self.admin], capture_output=True, text=True, timeout=60
        )
        if out.returncode != 0:
            raise AssertionError(f"[{self.name}] tessera-server {' '.join(args)} failed: {out.stderr}")
        return out.stdout.strip()

    def wait_healthy(self, timeout: float = 60.0) -> None:
        def healthy() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.output()}")
            r = subprocess.run(
                [PY, "-m", "tessera.server", "healthcheck", "--socket", self.admin], capture_output=True, timeout=30
            )
            return r.returncode == 0

        wait_for(healthy, timeout, f"{self.name} healthy")


def ca_ids(server: Server) -> dict[str, str]:
    """X.509 authority key IDs of a server's CA -> their state (active / prepared / old)."""
    slots = json.loads(server.admin_cmd("ca", "show", "--output", "json"))
    items = slots["slots"] if isinstance(slots, dict) else slots
    return {s["key_id"]: s["state"] for s in items if s.get("kind", "x509") == "x509"}


def bundle_roots(server: Server) -> set[str]:
    pem = server.admin_cmd("bundle", "show").encode()
    return {
        x509.SubjectKeyIdentifier.from_public_key(c.public_key()).digest.hex()
        for c in x509.load_pem_x509_certificates(pem)
    }


def start_agent(root: Path, addresses: list[str], token: str, name: str = "agent") -> tuple[Daemon, str]:
    """A tessera-agent (join token, bootstrap bundle root/bundle.pem) with every server address; its socket."""
    sock = str(root / f"{name}-pub" / "api.sock")
    agent = Daemon(
        name,
        [
            PY, "-m", "tessera.agent", "run", "--trust-domain", TD,
            "--server-address", ",".join(addresses), "--trust-bundle", str(root / "bundle.pem"),
            "--join-token", token, "--data-dir", str(root / f"{name}-data"), "--socket", sock,
            "--sync-interval", "1s", "--sync-max-backoff", "2s",
        ],
        root / f"{name}.log",
    )  # fmt: skip
    agent.start()
    return agent, sock


@dataclass
class Observation:
    at: float
    spiffe_id: str
    serial: int
    issuer_ski: str
    error: str = ""


@dataclass
class WorkloadWatcher:
    """A workload holding a FetchX509SVID stream open (reconnecting when it drops) that verifies every SVID of
    every update against the bundle delivered in the same message, as a relying party would."""

    socket_path: str
    trust_domain: TrustDomain = field(default_factory=lambda: TrustDomain.parse(TD))
    observations: list[Observation] = field(default_factory=list)
    stream_errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _call: Any = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="workload-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        call = self._call
        if call is not None:
            call.cancel()
        if self._thread is not None:
            self._thread.join(10)

    def failures(self) -> list[Observation]:
        return [o for o in self.observations if o.error]

    def serials(self) -> list[int]:
        return list(dict.fromkeys(o.serial for o in self.observations if not o.error))

    def _run(self) -> None:
        while not self._stop.is_set():
            with grpc.insecure_channel("unix:" + self.socket_path) as channel:
                stub = WorkloadApiStub(channel)
                try:
                    self._call = stub.FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA)
                    for response in self._call:
                        self._check(response)
                except grpc.RpcError as exc:
                    if not self._stop.is_set():
                        self.stream_errors.append(f"{exc.code().name}: {exc.details()}")
            self._stop.wait(0.3)

    def _check(self, response: wpb.X509SVIDResponse) -> None:
        now = time.time()
        for svid in response.svids:
            try:
                chain = parse_der_certificates(svid.x509_svid)
                bundle = X509Bundle(self.trust_domain, tuple(parse_der_certificates(svid.bundle)))
                verify_x509_svid(chain, bundle)
                error = ""
            except (TesseraError, ValueError) as exc:
                error = f"{type(exc).__name__}: {exc}"
                chain = parse_der_certificates(svid.x509_svid) if svid.x509_svid else []
            leaf = chain[0] if chain else None
            aki = ""
            if leaf is not None:
                try:
                    ext = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
                    aki = (ext.key_identifier or b"").hex()
                except x509.ExtensionNotFound:
                    aki = ""
            self.observations.append(
                Observation(now, svid.spiffe_id, leaf.serial_number if leaf else 0, aki, error)
            )


def cleanup(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
