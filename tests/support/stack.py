"""One host's Tessera for end-to-end tests that need a workload identity and nothing else: a tessera-server and
a tessera-agent (real processes of this interpreter, so a run under another CPython tests that CPython) and one
entry giving processes of this uid ``spiffe://<trust domain>/workload``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support.procs import TesseraAgent, TesseraServer, short_dir, wait_for
from tessera.sdk.workloadapi import WorkloadApiClient

START_TIMEOUT = 90.0


@dataclass(frozen=True)
class HostStack:
    root: Path
    address: str  # unix:///... of the agent's Workload API socket
    spiffe_id: str  # what a process of this uid is given
    server: TesseraServer
    agent: TesseraAgent


def _serves(agent: TesseraAgent, address: str, spiffe_id: str) -> bool:
    if not agent.alive():
        raise AssertionError("agent exited:\n" + agent.output())
    try:
        with WorkloadApiClient(address, timeout=5) as client:
            return spiffe_id in {str(s.spiffe_id) for s in client.fetch_x509_svids()}
    except Exception:
        return False


@contextmanager
def host_stack(trust_domain: str = "example.org", prefix: str = "tst-") -> Iterator[HostStack]:
    """A started server and agent, the agent serving this uid its SVID; both stopped and their files removed on
    exit (``TESSERA_KEEP_E2E=1`` keeps the logs)."""
    root = short_dir(prefix)
    agent_id = f"spiffe://{trust_domain}/host/stack"
    spiffe_id = f"spiffe://{trust_domain}/workload"
    socket = str(root / "api.sock")
    server = TesseraServer(
        trust_domain, data_dir=root / "server", admin_socket=str(root / "admin.sock"), log=root / "server.log"
    )
    agent: TesseraAgent | None = None
    try:
        server.start_and_wait(START_TIMEOUT)
        bundle = server.write_bundle(root / "bundle.pem")
        token = server.join_token(agent_id)
        server.admin("entry", "create", "--spiffe-id", spiffe_id, "--parent-id", agent_id,
                     "--selector", f"unix:uid:{os.getuid()}")  # fmt: skip
        agent = TesseraAgent(
            trust_domain, servers=server.address, trust_bundle=bundle, data_dir=root / "agent", socket=socket,
            join_token=token, log=root / "agent.log",
        )  # fmt: skip
        agent.start()
        address = f"unix://{socket}"
        wait_for(lambda: _serves(agent, address, spiffe_id), START_TIMEOUT, f"the agent serving {spiffe_id}")
        yield HostStack(root, address, spiffe_id, server, agent)
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
        if os.environ.get("TESSERA_KEEP_E2E"):
            print("e2e logs in", root)
        else:
            shutil.rmtree(root, ignore_errors=True)
