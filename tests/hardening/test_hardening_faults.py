"""Fault injection with real processes: SIGKILL of the server in the middle of batch signing, SIGKILL and
restart of the agent while workloads stream, a few seconds of clock skew between agent and server (the agent
runs under libfaketime), and an outage longer than the agent SVID's life (x509pop re-attestation)."""

from __future__ import annotations

import datetime as dt
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from hardening_support import agent_proc, server_proc
from support.inproc import TD, AdminClient
from support.nodeapi import Agent, HostPki, csr_der, ec_key
from support.procs import PY, TesseraAgent, TesseraServer, run, wait_for

from tessera.proto import node_pb2 as npb
from tessera.proto import workload_pb2 as wpb
from tessera.sdk.bundle import X509Bundle
from tessera.sdk.svid import parse_der_certificates
from tessera.sdk.verify import verify_x509_svid
from tessera.sdk.workloadapi.wire import SECURITY_METADATA, WorkloadApiStub

pytestmark = pytest.mark.slow

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"


class ServerShim:
    """What support.nodeapi.Agent needs from a server: its address and its trust bundle."""

    def __init__(self, server: TesseraServer) -> None:
        self.server = server

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def bundle_pem(self) -> bytes:
        return self.server.admin("bundle", "show").encode() + b"\n"


def _sqlite_is_intact(path: Path) -> None:
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()


def test_sigkill_during_batch_signing_leaves_no_partial_state(root: Path) -> None:
    server = server_proc(root).start_and_wait()
    try:
        bundle_before = server.admin("bundle", "show")
        agent = Agent(ServerShim(server))  # type: ignore[arg-type]
        agent.attest_join_token(server.join_token(f"spiffe://{TD}/host/batch"))
        with AdminClient(server.admin_socket) as admin:
            entries = [admin.create_entry(f"spiffe://{TD}/batch/{i}", agent.spiffe_id) for i in range(20)]
        requests = [npb.X509SignRequest(entry_id=entries[i % 20].id, csr=csr_der(ec_key())) for i in range(500)]
        batch = npb.BatchSignX509SVIDRequest(requests=requests)
        stub = agent.stub()
        assert len(stub.BatchSignX509SVID(batch, timeout=60).results) == 500  # a batch completes normally
        outcome: dict[str, object] = {}

        def sign_until_killed() -> None:
            try:
                while True:
                    stub.BatchSignX509SVID(batch, timeout=60)
                    outcome["completed"] = int(str(outcome.get("completed", 0))) + 1
            except grpc.RpcError as exc:
                outcome["error"] = exc.code()

        signer = threading.Thread(target=sign_until_killed, daemon=True)
        signer.start()
        time.sleep(0.7)  # well inside a batch (one takes around a second)
        server.kill()
        signer.join(60)
        assert outcome.get("error") == grpc.StatusCode.UNAVAILABLE
        agent.reset_channel()
        _sqlite_is_intact(server.data_dir / "datastore.sqlite3")

        restarted = server_proc(root, port=server.port).start_and_wait()
        server = restarted
        assert restarted.admin("bundle", "show") == bundle_before  # same CA, nothing half-rotated
        listed = restarted.admin("entry", "show", "--output", "json")
        assert sum(f"spiffe://{TD}/batch/" in line for line in listed.split('"spiffe_id"')) == 20
        # The agent's identity survived: it signs a full batch again, and every SVID verifies.
        response = agent.stub().BatchSignX509SVID(batch, timeout=60)
        assert len(response.results) == 500
        x509_bundle = X509Bundle.parse_pem(TD, restarted.admin("bundle", "show").encode())
        for result in response.results[:50]:
            verify_x509_svid(parse_der_certificates(result.cert_chain), x509_bundle)
        agent.close()
    finally:
        server.stop()
    _sqlite_is_intact(server.data_dir / "datastore.sqlite3")


@dataclass
class Watcher:
    """A workload streaming FetchX509SVID, reconnecting (with a short pause) whenever the stream breaks."""

    socket: str
    seen: list[tuple[float, str, dt.datetime]] = field(default_factory=list)  # (when, id, notAfter)
    errors: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with grpc.insecure_channel(f"unix:{self.socket}") as channel:
                    stream = WorkloadApiStub(channel).FetchX509SVID(
                        wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=120
                    )
                    for response in stream:
                        leaf = parse_der_certificates(response.svids[0].x509_svid)[0]
                        self.seen.append((time.monotonic(), response.svids[0].spiffe_id, leaf.not_valid_after_utc))
                        if self.stop.is_set():
                            stream.cancel()
                            return
            except grpc.RpcError as exc:
                self.errors.append(exc.code().name)
            self.stop.wait(0.2)


def test_agent_sigkill_and_restart_while_workloads_stream(root: Path) -> None:
    server = server_proc(root).start_and_wait()
    agent: TesseraAgent | None = None
    watchers: list[Watcher] = []
    try:
        server.write_bundle(root / "bundle.pem")
        agent_id = f"spiffe://{TD}/host/stream"
        server.admin(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/streamer", "--parent-id", agent_id,
            "--selector", "unix:uid:0",
        )  # fmt: skip
        agent = agent_proc(root, server, "agent", "--join-token", server.join_token(agent_id)).start_and_wait()
        watchers = [Watcher(agent.socket) for _ in range(3)]
        threads = [threading.Thread(target=w.run, daemon=True) for w in watchers]
        for t in threads:
            t.start()
        wait_for(lambda: all(w.seen for w in watchers), what="every workload's first SVID")
        before = {id(w): w.seen[-1] for w in watchers}
        agent.kill()
        killed_at = time.monotonic()
        # Restart without a join token: the agent comes back with the identity it stored.
        agent = agent_proc(root, server, "agent").start_and_wait()
        wait_for(
            lambda: all(any(when > killed_at for when, _, _ in w.seen) for w in watchers),
            what="every workload to receive an SVID from the restarted agent",
        )
        for w in watchers:
            _, old_id, old_not_after = before[id(w)]
            after = [(sid, na) for when, sid, na in w.seen if when > killed_at]
            assert all(sid == old_id for sid, _ in after)
            assert all(na >= old_not_after for _, na in after)  # the same SVID or a newer one, never older
            assert set(w.errors) <= {"UNAVAILABLE", "CANCELLED"}, w.errors
    finally:
        for w in watchers:
            w.stop.set()
        if agent is not None:
            agent.stop()
        server.stop()


def _skewed(offset: str) -> dict[str, str]:
    return {**os.environ, "LD_PRELOAD": FAKETIME_LIB, "FAKETIME": offset, "DONT_FAKE_MONOTONIC": "1"}


@pytest.mark.skipif(not os.path.exists(FAKETIME_LIB), reason="libfaketime missing: run scripts/system-deps.sh")
@pytest.mark.parametrize("offset", ["+5s", "-5s"])
def test_clock_skew_of_a_few_seconds_between_agent_and_server(root: Path, offset: str) -> None:
    server = server_proc(root).start_and_wait()
    agent: TesseraAgent | None = None
    try:
        server.write_bundle(root / "bundle.pem")
        agent_id = f"spiffe://{TD}/host/skew"
        server.admin(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/skewed", "--parent-id", agent_id,
            "--selector", "unix:uid:0",
        )  # fmt: skip
        agent = agent_proc(root, server, "agent", "--join-token", server.join_token(agent_id), env=_skewed(offset))
        agent.start_and_wait()
        probe = run(PY, "-c", "import time; print(time.time())", env=_skewed(offset))
        assert abs(abs(float(probe.stdout) - time.time()) - 5) < 2, "libfaketime did not skew the clock"
        fetched = root / "fetched"
        wait_for(
            lambda: run(
                PY, "-m", "tessera.agent", "api", "fetch", "x509", "--socket", agent.socket, "--write", str(fetched)
            ).returncode == 0,
            what="X509-SVID through the skewed agent",
        )  # fmt: skip
        chain = x509.load_pem_x509_certificates((fetched / "svid.0.pem").read_bytes())
        verify_x509_svid(chain, X509Bundle.parse_pem(TD, server.admin("bundle", "show").encode()))
        jwt = run(PY, "-m", "tessera.agent", "api", "fetch", "jwt", "--audience", "db", "--socket", agent.socket)
        assert jwt.returncode == 0, jwt.stderr
        token = next(word for word in jwt.stdout.split() if word.count(".") == 2 and word.startswith("eyJ"))
        # The skewed agent validates a JWT-SVID the (unskewed) server minted, and vice versa for its SVID.
        valid = run(
            PY, "-m", "tessera.agent", "api", "validate", "jwt", "--audience", "db", "--svid", token,
            "--socket", agent.socket,
        )  # fmt: skip
        assert valid.returncode == 0, valid.stderr
        assert "Traceback" not in agent.output() and "ERROR" not in agent.output()
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


def test_outage_longer_than_the_agent_svid_life_recovers_by_x509pop(root: Path) -> None:
    """Agent SVIDs live 30 s (the minimum); the server is down for longer; the agent re-attests on its own."""
    pki = HostPki.create()
    host_key, host_cert = pki.host("node-1.example.org")
    pop_dir = root / "pop"
    pop_dir.mkdir()
    pki.write_root(pop_dir / "root.pem")
    (pop_dir / "host.pem").write_bytes(
        host_cert.public_bytes(serialization.Encoding.PEM) + pki.inter.public_bytes(serialization.Encoding.PEM)
    )
    (pop_dir / "host.key").write_bytes(
        host_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    )  # fmt: skip
    os.chmod(pop_dir / "host.key", 0o600)
    ttl = ("--agent-ttl", "30s", "--default-x509-svid-ttl", "60s")
    server = server_proc(root, "--x509pop-ca-bundle", str(pop_dir / "root.pem"), *ttl).start_and_wait()
    agent: TesseraAgent | None = None
    try:
        server.write_bundle(root / "bundle.pem")
        pop = ["--x509pop-cert", str(pop_dir / "host.pem"), "--x509pop-key", str(pop_dir / "host.key")]
        agent = agent_proc(root, server, "agent", *pop).start_and_wait()
        svid_file = agent.data_dir / "agent.pem"
        agent_id = x509.load_pem_x509_certificates(svid_file.read_bytes())[0]
        first_not_after = agent_id.not_valid_after_utc
        server.stop()
        # Wait for the agent SVID to expire while the server is away (bounded by its 30 s life).
        remaining = (first_not_after - dt.datetime.now(dt.UTC)).total_seconds()
        assert remaining <= 31
        time.sleep(max(0.0, remaining) + 1)
        assert agent.alive(), agent.output()
        server = server_proc(root, "--x509pop-ca-bundle", str(pop_dir / "root.pem"), *ttl, port=server.port)
        server.start_and_wait()

        def reattested() -> bool:
            leaf = x509.load_pem_x509_certificates(svid_file.read_bytes())[0]
            return leaf.not_valid_after_utc > dt.datetime.now(dt.UTC)

        wait_for(reattested, timeout=45, what="the agent to re-attest by itself")
        assert agent.alive()
        assert "x509pop" in agent.output()
    finally:
        if agent is not None:
            agent.stop()
        server.stop()


def test_sigterm_ends_workload_streams_with_unavailable(root: Path) -> None:
    server = server_proc(root).start_and_wait()
    agent: TesseraAgent | None = None
    try:
        server.write_bundle(root / "bundle.pem")
        agent_id = f"spiffe://{TD}/host/graceful"
        server.admin(
            "entry", "create", "--spiffe-id", f"spiffe://{TD}/graceful", "--parent-id", agent_id,
            "--selector", "unix:uid:0",
        )  # fmt: skip
        agent = agent_proc(root, server, "agent", "--join-token", server.join_token(agent_id)).start_and_wait()
        with grpc.insecure_channel(f"unix:{agent.socket}") as channel:
            streams = [
                WorkloadApiStub(channel).FetchX509SVID(wpb.X509SVIDRequest(), metadata=SECURITY_METADATA, timeout=60)
                for _ in range(3)
            ]
            for stream in streams:
                next(stream)
            assert agent.proc is not None
            started = time.monotonic()
            code = agent.stop()
            assert code == 0 and time.monotonic() - started < 15
            for stream in streams:
                with pytest.raises(grpc.RpcError) as info:
                    next(stream)
                assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
        agent = None
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
