"""End to end node identity: x509pop attestation and re-attestation after eviction, insecure bootstrap,
failover across server addresses, and a clear stop when a join-token agent can no longer authenticate."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from agent_testlib import socket_dir
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from support.procs import FETCH_SCRIPT, PY, TesseraAgent, free_port, run_as, wait_for
from test_agent_e2e import TD, Env

from tessera.sdk.testing import TestCA

pytestmark = pytest.mark.slow


class NodesEnv(Env):
    def agent_for(self, name: str, *args: str, addresses: str | None = None) -> TesseraAgent:
        return TesseraAgent(
            TD, servers=addresses or self.server.address, data_dir=self.root / f"{name}-data",
            socket=f"{self.root}/{name}-pub/api.sock", log=self.root / f"{name}.log", extra=args, name=name,
        )  # fmt: skip


@pytest.fixture(scope="module")
def nodes() -> Iterator[tuple[NodesEnv, TestCA]]:
    root = Path(socket_dir())
    host_ca = TestCA("hosts.example")
    (root / "host-ca.pem").write_bytes(host_ca.certificate.public_bytes(Encoding.PEM))
    e = NodesEnv(root, str(root))
    # agent SVIDs of 60 s (the server's minimum): renewal at about half life is observable in a test
    e.server.argv += ["--x509pop-ca-bundle", str(root / "host-ca.pem"), "--agent-ttl", "60s"]
    try:
        e.start_server()
        e.server.write_bundle(root / "bundle.pem")
        yield e, host_ca
    finally:
        e.server.stop()
        shutil.rmtree(root, ignore_errors=True)


def served(sock: str) -> str:
    return run_as(0, FETCH_SCRIPT, sock, python=PY)


def test_x509pop_attests_and_reattests_after_eviction(nodes: tuple[NodesEnv, TestCA]) -> None:
    env, host_ca = nodes
    host = host_ca.issue_svid("spiffe://hosts.example/host-1", ttl=3600)
    (env.root / "host.pem").write_bytes(host.chain_pem())
    (env.root / "host.key").write_bytes(host.key_pem())
    agent_id = f"spiffe://{TD}/tessera/agent/x509pop/{hashlib.sha1(host.leaf.public_bytes(Encoding.DER)).hexdigest()}"
    env.admin_cmd("entry", "create", "--spiffe-id", f"spiffe://{TD}/pop-wl", "--parent-id", agent_id,
                  "--selector", "unix:uid:0")
    agent = env.agent_for(
        "pop", "--trust-bundle", str(env.root / "bundle.pem"),
        "--x509pop-cert", str(env.root / "host.pem"), "--x509pop-key", str(env.root / "host.key"),
        "--server-name", "localhost",  # verified against the server SVID's DNS SAN instead of the IP
    )
    sock = f"{env.root}/pop-pub/api.sock"
    agent.start()
    try:
        wait_for(lambda: served(sock) == f"OK spiffe://{TD}/pop-wl", 60, "x509pop agent serving")
        assert f"attested as {agent_id} with x509pop" in agent.output()
        env.admin_cmd("agent", "evict", "--spiffe-id", agent_id)
        wait_for(lambda: agent.output().count("with x509pop") >= 2, 60, "re-attestation after eviction")
        env.admin_cmd("entry", "create", "--spiffe-id", f"spiffe://{TD}/pop-wl2", "--parent-id", agent_id,
                      "--selector", "unix:uid:0")
        wait_for(lambda: f"spiffe://{TD}/pop-wl2" in served(sock), 60, "sync after re-attestation")
        assert agent.alive()
    finally:
        agent.stop()


def test_insecure_bootstrap_and_failover_then_clear_stop_on_eviction(nodes: tuple[NodesEnv, TestCA]) -> None:
    env, _ = nodes
    agent_id = f"spiffe://{TD}/host/insecure"
    token = env.admin_cmd("token", "generate", "--spiffe-id", agent_id).splitlines()[-1].strip()
    env.admin_cmd("entry", "create", "--spiffe-id", f"spiffe://{TD}/boot-wl", "--parent-id", agent_id,
                  "--selector", "unix:uid:0")
    dead = free_port()  # nothing listens there: the agent must fail over to the live server
    agent = env.agent_for(
        "boot", "--insecure-bootstrap", "--join-token", token,
        addresses=f"127.0.0.1:{dead},127.0.0.1:{env.port}",
    )
    sock = f"{env.root}/boot-pub/api.sock"
    agent.start()
    try:
        wait_for(lambda: served(sock) == f"OK spiffe://{TD}/boot-wl", 60, "insecure-bootstrap agent serving")
        assert "INSECURE BOOTSTRAP" in agent.output()
        pinned = (env.root / "boot-data" / "bundle.pem").read_text()
        assert pinned.strip() == (env.root / "bundle.pem").read_text().strip()
        def stored_not_after() -> float:
            pem = (env.root / "boot-data" / "agent.pem").read_bytes()
            return x509.load_pem_x509_certificates(pem)[0].not_valid_after_utc.timestamp()

        first_not_after = stored_not_after()
        # the agent renews its own SVID at about half life and keeps syncing with the new one
        wait_for(lambda: "agent SVID renewed" in agent.output(), 90, "agent SVID renewal")
        env.admin_cmd("entry", "create", "--spiffe-id", f"spiffe://{TD}/boot-wl2", "--parent-id", agent_id,
                      "--selector", "unix:uid:0")
        wait_for(lambda: f"spiffe://{TD}/boot-wl2" in served(sock), 60, "sync with the renewed agent SVID")
        assert stored_not_after() > first_not_after  # the renewed SVID was persisted
        # evicted, and join tokens are one-time: the agent stops with one line saying what to do
        env.admin_cmd("agent", "evict", "--spiffe-id", agent_id)
        wait_for(lambda: not agent.alive(), 60, "agent to stop")
        assert agent.proc is None or agent.proc.returncode != 0
        assert "tessera-server token generate" in agent.output()
    finally:
        agent.stop()
