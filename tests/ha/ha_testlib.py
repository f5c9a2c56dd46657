"""Daemons for the high-availability tests: several tessera-server processes on one PostgreSQL database, and
agents pointed at all of them."""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography import x509
from support.procs import TesseraAgent, TesseraServer

from tessera.proto import workload_pb2 as wpb
from tessera.sdk.bundle import X509Bundle
from tessera.sdk.errors import TesseraError
from tessera.sdk.spiffeid import TrustDomain
from tessera.sdk.svid import parse_der_certificates
from tessera.sdk.verify import verify_x509_svid
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

TD = "example.org"


class Server(TesseraServer):
    """One of several servers under ``root`` (its own data dir, admin socket and log) on a shared datastore."""

    def __init__(self, name: str, root: Path, datastore: str, *extra: str) -> None:
        super().__init__(
            TD, data_dir=root / name / "data", admin_socket=str(root / name / "admin.sock"), log=root / f"{name}.log",
            extra=("--datastore", datastore, *extra), name=name,
        )  # fmt: skip


def start_servers(*servers: Server) -> None:
    """Starts them all, then waits for each to be healthy (they start up side by side)."""
    for server in servers:
        server.start()
    for server in servers:
        server.wait_healthy()


def ca_ids(server: Server) -> dict[str, str]:
    """X.509 authority key IDs of a server's CA -> their state (active / prepared / old)."""
    slots = json.loads(server.admin("ca", "show", "--output", "json"))
    items = slots["slots"] if isinstance(slots, dict) else slots
    return {s["key_id"]: s["state"] for s in items if s.get("kind", "x509") == "x509"}


def bundle_roots(server: Server) -> set[str]:
    pem = server.admin("bundle", "show").encode()
    return {
        x509.SubjectKeyIdentifier.from_public_key(c.public_key()).digest.hex()
        for c in x509.load_pem_x509_certificates(pem)
    }


def start_agent(root: Path, addresses: list[str], token: str, name: str = "agent") -> tuple[TesseraAgent, str]:
    """A tessera-agent (join token, bootstrap bundle root/bundle.pem) with every server address; its socket."""
    sock = str(root / f"{name}-pub" / "api.sock")
    agent = TesseraAgent(
        TD, servers=",".join(addresses), trust_bundle=root / "bundle.pem", join_token=token,
        data_dir=root / f"{name}-data", socket=sock, log=root / f"{name}.log", name=name,
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
