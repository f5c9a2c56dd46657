"""Shared pieces of the quick-start tests: a real tessera-server + tessera-agent pair (each in its own process
group, on the tests/support harness), and a check that nothing a test started outlives it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

import psutil
import pytest
from support.procs import Daemon, TesseraAgent, TesseraServer

ROOT = Path(__file__).resolve().parents[2]


def processes_mentioning(text: str) -> list[str]:
    """Live processes whose command line contains ``text`` (a per-test temp dir: every daemon gets it)."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            cmdline = proc.info["cmdline"] or []
            if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
                continue
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if any(text in part for part in cmdline):
            found.append(f"{proc.pid}: {' '.join(cmdline)}")
    return found


def require_binaries(*names: str) -> dict[str, str]:
    """Paths of ``names``; installs missing ones with scripts/system-deps.sh (as CI does) and skips the test
    only when they still cannot be found."""

    def locate() -> dict[str, str]:
        found = {}
        for name in names:
            path = shutil.which(name) or next(
                (p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.access(p, os.X_OK)), None
            )
            if path:
                found[name] = path
        return found

    found = locate()
    if len(found) == len(names):
        return found
    result = subprocess.run(
        [str(ROOT / "scripts" / "system-deps.sh")], capture_output=True, text=True, timeout=900, check=False
    )
    found = locate()
    missing = [n for n in names if n not in found]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed and scripts/system-deps.sh could not install them "
            f"(exit {result.returncode}: {(result.stderr or result.stdout).strip()[-300:]})"
        )
    return found


class TesseraEnv:
    """A tessera-server and a tessera-agent (join token), as an operator would start them."""

    def __init__(self, root: Path, trust_domain: str) -> None:
        self.root = root
        self.td = trust_domain
        self.agent_id = f"spiffe://{trust_domain}/agent/test-node"
        self.server = TesseraServer(
            trust_domain, data_dir=root / "server", admin_socket=str(root / "admin" / "api.sock"),
            log=root / "server.log", own_group=True,
        )  # fmt: skip
        self.port = self.server.port
        self.admin_socket = self.server.admin_socket
        self.socket = str(root / "public" / "api.sock")
        self.daemons: list[Daemon] = []

    def admin(self, *args: str) -> str:
        return self.server.admin(*args)

    def start(self) -> None:
        self.add(self.server).start()
        self.server.wait_healthy()
        self.server.write_bundle(self.root / "bundle.pem")

    def start_agent(self) -> None:
        agent = TesseraAgent(
            self.td, servers=self.server.address, trust_bundle=self.root / "bundle.pem",
            data_dir=self.root / "agent", socket=self.socket, log=self.root / "agent.log",
            join_token=self.server.join_token(self.agent_id), sync_max_backoff=None, own_group=True,
        )  # fmt: skip
        self.add(agent).start()
        agent.wait_healthy()

    def entry(self, spiffe_id: str, *selectors: str, ttl: str, dns: Sequence[str] = ()) -> str:
        args = ["entry", "create", "--spiffe-id", spiffe_id, "--parent-id", self.agent_id, "--x509-svid-ttl", ttl]
        for s in selectors:
            args += ["--selector", s]
        for d in dns:
            args += ["--dns-name", d]
        return self.admin(*args).splitlines()[-1].strip()

    def add(self, daemon: Daemon) -> Daemon:
        self.daemons.append(daemon)
        return daemon

    def stop(self) -> None:
        for daemon in reversed(self.daemons):
            daemon.stop()
